"""
The GPT every stage shares: a Llama-style decoder written by hand in PyTorch.

token embedding -> n_layer x [RMSNorm -> grouped-query attention with RoPE -> residual,
                              RMSNorm -> SwiGLU MLP (or a Mixture-of-Experts of SwiGLU MLPs) -> residual]
               -> RMSNorm -> output head (tied to the embedding or not)

The numerics are those of transformers' LlamaForCausalLM (same rotary layout, same norm, same MLP), so its
weights load through `from_hf_llama_state_dict` and give the same logits; tests/test_model.py checks that.
Generation uses a preallocated KV cache: the prompt is run once (prefill), then one token per step.
"""
import math
import numbers
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # bad configs are user input, which the project prints as one line "error: ..."
    from common import UserError
except ImportError:  # model.py copied out on its own
    UserError = ValueError


# the chunked cross entropy (GPT.forward under grad_checkpoint) makes logits of about this many elements at a time:
# 4M fp32 values = 16 MB, the (B, T, V) tensor of a 49k vocabulary at 1024 tokens is 12x that
CE_CHUNK_ELEMS = 1 << 22


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    block_size: int = 512          # max sequence length (RoPE table length)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4             # divides n_head; == n_head is plain MHA
    n_embd: int = 256
    intermediate_size: int = 0     # 0 -> Llama rule: int(2*4*n_embd/3) rounded up to multiple_of
    multiple_of: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    attn_bias: bool = False        # biases on the q, k and v projections (Qwen2 has them; Llama does not)
    n_experts: int = 0             # 0 = dense SwiGLU MLP; >0 = MoE
    n_experts_per_tok: int = 2
    n_shared_experts: int = 0
    moe_aux_coef: float = 0.01

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise UserError(f"ModelConfig: {msg}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        check(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        check(self.n_head % self.n_kv_head == 0, f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        check(self.head_dim % 2 == 0, f"head_dim = n_embd // n_head = {self.head_dim} must be even for RoPE")
        check(self.n_experts == 0 or 1 <= self.n_experts_per_tok <= self.n_experts,
              f"n_experts_per_tok={self.n_experts_per_tok} must be between 1 and n_experts={self.n_experts}")
        check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def ffn_hidden(self):
        if self.intermediate_size > 0:
            return self.intermediate_size
        # Llama: 2/3 of the usual 4*d keeps SwiGLU's three matrices at the cost of a 4*d two-matrix MLP
        hidden = int(2 * 4 * self.n_embd / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"ModelConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like Llama (bf16 squares lose too much); F.rms_norm runs PyTorch's fused kernel where
        # it has one, which in training is several times faster than the written-out pow/mean/rsqrt
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def apply_rope(x, cos, sin):
    # x (B, T, n_heads, head_dim); cos/sin (B or 1, T, 1, head_dim/2). Llama's "rotate half" layout: dimension i is
    # paired with i + head_dim/2 (not with its neighbour), which is what lets HF weights load without a permutation.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Keys and values of every layer, preallocated for batch_size x max_len so decoding never concatenates."""

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device=None, dtype=None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0  # slots filled so far; GPT.hidden_states advances it after all layers have written

    def update(self, layer, k, v):
        # k, v (B, n_kv_head, T, head_dim) for the new tokens -> views over everything cached so far
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self):
        self.pos = 0

    def keep_rows(self, keep):
        """Keep only the batch rows where `keep` ((B,) bool) is True: finished sequences stop costing attention."""
        self.k = [k[keep] for k in self.k]
        self.v = [v[keep] for v in self.v]


class CacheSlot:
    """A KVCache as one fixed-shape decode step sees it (GPT.decode_step): the new token's keys and values go to
    slot `slot` ((1,) long tensor, not a Python int, so the step's code and shapes stay the same from one token
    to the next) and attention reads the whole preallocated buffer, the unwritten slots masked out."""

    def __init__(self, cache, slot):
        self.cache, self.slot = cache, slot

    def update(self, layer, k, v):
        # k, v (B, n_kv_head, 1, head_dim) -> the whole (B, n_kv_head, max_len, head_dim) buffers
        self.cache.k[layer].index_copy_(2, self.slot, k)
        self.cache.v[layer].index_copy_(2, self.slot, v)
        return self.cache.k[layer], self.cache.v[layer]


def decode_attention(q, k, v, mask):
    """Attention of one query per row over a whole preallocated cache: q (B, n_head, 1, head_dim), k and v
    (B, n_kv_head, L, head_dim), mask (B, 1, 1, L) bool (True = attend) -> (B, n_head, 1, head_dim). The same
    softmax(q k^T / sqrt(head_dim)) v as F.scaled_dot_product_attention, written as products and sums that
    torch.compile fuses into a few loops: for a single query, SDPA's CPU kernel is an opaque call whose fixed cost
    outweighs its work (the compiled step ran 1.17x faster at batch 32 this way)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    # sums in fp32 whatever the autocast dtype, as SDPA's kernels accumulate; the casts fuse into the same loops
    qf = q.float().view(B, Hkv, H // Hkv, 1, D)                # each K/V head serves H / Hkv query heads (GQA)
    scores = (qf * k[:, :, None].float()).sum(-1) * D ** -0.5  # (B, Hkv, H/Hkv, L)
    scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1)
    return (probs[..., None] * v[:, :, None].float()).sum(-2).view(B, H, 1, D).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k and v in one matmul ((n_head + 2 * n_kv_head) heads): fewer kernel launches per decoded token, and
        # RoPE rotates q and k in a single call
        self.qkv_proj = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0):
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        # split (not slicing): its backward is one concatenation, where each slice's would zero-fill a full copy
        qk, v = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim).split([H + Hkv, Hkv], dim=2)
        q, k = apply_rope(qk, cos, sin).split([H, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv_head, pos + T, head_dim)
        if isinstance(cache, CacheSlot):  # the compiled decode step
            y = decode_attention(q, k, v, mask)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        # SDPA picks flash / memory-efficient kernels; enable_gqa lets each K/V head serve n_head/n_kv_head queries
        # without materialising repeated copies
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, hidden):
        super().__init__()
        self.gate_up_proj = nn.Linear(n_embd, 2 * hidden, bias=False)  # SwiGLU's gate and up in one matmul
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral style) plus optional always-on shared experts (DeepSeek style)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.k = cfg.n_experts, cfg.n_experts_per_tok
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.n_embd, cfg.ffn_hidden) for _ in range(cfg.n_experts))
        # n shared experts of the same size act like one MLP n times as wide, so they are one MLP here
        self.shared = MLP(cfg.n_embd, cfg.n_shared_experts * cfg.ffn_hidden) if cfg.n_shared_experts else None

    def forward(self, x):
        """(..., C) -> ((..., C), the balancing loss: a 0-dim tensor in training mode, None in eval mode)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                           # (N, C)
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)        # (N, E)
        gate, expert_idx = probs.topk(self.k, dim=-1)                          # (N, k)
        gate = gate / gate.sum(dim=-1, keepdim=True)  # renormalise over the chosen k so the output keeps its scale
        # Sort the N*k (token, expert) pairs by expert: each expert then runs one matmul over a contiguous slice of
        # its own tokens, and no expert ever sees a token it was not chosen for (no dense all-experts compute).
        flat_idx = expert_idx.flatten()                                        # (N*k,)
        order = flat_idx.argsort(stable=True)
        token = order // self.k                                                # token of each sorted pair
        counts = torch.bincount(flat_idx, minlength=self.n_experts)
        chunks = x[token].split(counts.tolist())
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])     # (N*k, C)
        y = y * gate.flatten()[order].unsqueeze(1).to(y.dtype)
        out = torch.zeros(x.shape, dtype=y.dtype, device=x.device).index_add_(0, token, y)
        if self.shared is not None:
            out = out + self.shared(x)
        aux_loss = None
        if self.training:
            # Switch/Mixtral balancing loss: n_experts * sum_i f_i * P_i, f_i the share of routed pairs that went to
            # expert i (no gradient), P_i its mean router probability (the gradient path). Uniform routing gives
            # exactly 1; the more the routing concentrates on few experts, the larger it gets. Padding tokens count.
            f = counts.float() / flat_idx.numel()
            aux_loss = self.n_experts * (f * probs.mean(dim=0)).sum()
        return out.view(shape), aux_loss


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.n_experts > 0 else MLP(cfg.n_embd, cfg.ffn_hidden)
        self.mlp_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, is_causal, cache, layer):
        """-> (x, the MoE balancing loss or None)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache, layer)
        h, aux_loss = self.mlp(self.mlp_norm(x)) if isinstance(self.mlp, MoE) else (self.mlp(self.mlp_norm(x)), None)
        return x + self.mlp_dropout(h), aux_loss


# ----------------------------------------------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE angles for every position, fp32; not saved in checkpoints (derived from the config)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)  # (block_size, head_dim/2)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        # activation (gradient) checkpointing, a training-time setting (the stages' --grad_checkpoint), not part of
        # the config: it changes what is kept for backward, never the result
        self.grad_checkpoint = False

        self.apply(self._init_weights)
        # residual-branch outputs are summed over 2*n_layer branches: scale their init so the residual stream's
        # variance does not grow with depth (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @classmethod
    def from_checkpoint(cls, ckpt):
        """A GPT on the CPU from a checkpoint dict's `model_config` (a plain dict) and `model` (its state dict)."""
        model = cls(ModelConfig.from_dict(ckpt["model_config"]))
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint: the weights do not fit its model_config: {str(e).splitlines()[0]}") from None
        return model

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embedding=False):
        # parameters() yields a tied tensor once
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add), for MFU."""
        cfg = self.config
        attn = cfg.n_embd * cfg.head_dim * (2 * cfg.n_head + 2 * cfg.n_kv_head)
        mlp = 3 * cfg.n_embd * cfg.ffn_hidden
        if cfg.n_experts:  # only the experts a token is routed to do work for it
            mlp = mlp * (cfg.n_experts_per_tok + cfg.n_shared_experts) + cfg.n_embd * cfg.n_experts
        # every weight matrix a token passes through (the head does a matmul; the embedding lookup does not)
        matmul_params = cfg.n_layer * (attn + mlp) + cfg.n_embd * cfg.vocab_size
        # QK^T and AV: with a causal mask a query meets on average seq_len/2 keys (PaLM counts seq_len; we do not
        # inflate the figure)
        attention = cfg.n_layer * 2 * (2 * cfg.n_head * cfg.head_dim * seq_len / 2)
        return 3 * (2 * matmul_params + attention)

    def make_cache(self, batch_size, max_len, device=None, dtype=None):
        cfg = self.config
        if max_len > cfg.block_size:
            raise UserError(f"cache length {max_len} exceeds block_size={cfg.block_size}")
        p = self.norm.weight  # not the embedding's: a quantized one holds int8 codes (quantize.py)
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype)

    def hidden_states(self, idx, attention_mask=None, positions=None, cache=None, return_aux=False):
        """(B, T) token ids -> (B, T, n_embd) after the final norm; with return_aux also the MoE balancing loss
        (moe_aux_coef x the layers' mean; a 0-dim 0 for a dense model or in eval mode). With a cache, idx holds only
        the new tokens and attention_mask (if any) covers everything cached so far plus them."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        total = start + T
        if total > self.config.block_size:
            raise UserError(f"sequence length {total} exceeds block_size={self.config.block_size}")
        if attention_mask is not None and attention_mask.shape != (B, total):
            raise ValueError(f"attention_mask must be (B, {total}), got {tuple(attention_mask.shape)}")

        # rotary angles: positions count real tokens only, so a left-padded row is numbered as if unpadded
        if positions is None and attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        if positions is None:
            cos, sin = self.rope_cos[start:total], self.rope_sin[start:total]       # (T, head_dim/2)
            cos, sin = cos[None, :, None], sin[None, :, None]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2)
        x = self.embed_dropout(self.embed_tokens(idx))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)

        # attention pattern: plain causal needs no mask (fast kernels); padding or a partly filled cache needs one
        mask, is_causal = None, False
        if attention_mask is None:
            if start == 0:
                is_causal = T > 1
            elif T > 1:
                q_pos = torch.arange(start, total, device=idx.device)
                mask = torch.arange(total, device=idx.device)[None, :] <= q_pos[:, None]  # (T, total)
        else:
            q_pos = torch.arange(start, total, device=idx.device)[:, None]
            k_pos = torch.arange(total, device=idx.device)[None, :]
            key_ok = attention_mask.bool()[:, None, None, :]                               # (B, 1, 1, total)
            # a padding query sees itself so that its softmax row is never empty (NaN); its output is never used
            mask = ((k_pos <= q_pos) & key_ok) | (k_pos == q_pos)                          # (B, 1, T, total)

        aux = []
        for i, block in enumerate(self.layers):
            if self.checkpointing() and cache is None:
                # only the block's input is kept; backward reruns the block (preserve_rng_state, on by default,
                # replays the same dropout masks), so activations cost one (B, T, C) tensor per layer
                x, layer_aux = checkpoint(block, x, cos, sin, mask, is_causal, None, i, use_reentrant=False)
            else:
                x, layer_aux = block(x, cos, sin, mask, is_causal, cache, i)
            if layer_aux is not None:
                aux.append(layer_aux)
        if cache is not None:
            cache.pos = total
        if not return_aux:
            return self.norm(x)
        aux_loss = self.config.moe_aux_coef * torch.stack(aux).mean() if aux else torch.zeros((), device=x.device)
        return self.norm(x), aux_loss

    def checkpointing(self):
        """True when the memory-saving training path runs: grad_checkpoint set, training mode, grad enabled."""
        return self.grad_checkpoint and self.training and torch.is_grad_enabled()

    def forward(self, idx, targets=None, loss_mask=None, attention_mask=None, positions=None, cache=None,
                return_logps=False, temperature=1.0):
        """(B, T) ids -> (logits (B, T, V), aux_loss) without targets: aux_loss is the MoE balancing loss alone, for
        a stage's own loss to add. It is moe_aux_coef x the Switch/Mixtral load-balancing term in training mode,
        and 0 for a dense model or in eval mode.

        With targets (already shifted: targets[:, t] follows idx[:, t]; positions where targets is -1 or loss_mask
        is 0 are not counted) the head runs on the counted positions only, so the (B, T, V) logits are never built
        (an SFT batch counts about 1 position in 8: the prompts and the padding are not learned):
        - (None, loss): loss = the mean cross entropy over the counted positions + aux_loss;
        - return_logps=True: (logps, aux_loss), logps (B, T) float32 = log p(targets[:, t] | idx[:, :t + 1]) under
          logits / temperature at the counted positions, 0 elsewhere (DPO's sequence log-probs, PPO's per-token
          ones).
        Under torch.compile the head runs on every position instead (static shapes), with the same result.

        With grad_checkpoint set, in training mode with grad enabled (checkpointing()), each block is recomputed in
        backward, and the head and the cross entropy of the mean loss run over chunks of CE_CHUNK_ELEMS // V
        counted positions, each chunk recomputed in backward."""
        x, aux_loss = self.hidden_states(idx, attention_mask=attention_mask, positions=positions, cache=cache,
                                         return_aux=True)
        if targets is None:
            if return_logps:
                raise ValueError("GPT.forward: return_logps needs targets")
            return self.lm_head(x), aux_loss
        if loss_mask is not None:
            targets = targets.masked_fill(loss_mask == 0, -1)
        if return_logps:
            return self.target_logps(x, targets, temperature), aux_loss
        counted = targets != -1
        n_counted = counted.sum().clamp(min=1)  # a batch with nothing to learn gives 0, not NaN
        if torch.compiler.is_compiling():  # static shapes: every position (the cross entropy ignores the -1s)
            x, targets = x.flatten(0, 1), targets.flatten()
        else:
            x, targets = x[counted], targets[counted]                              # (N, C), (N,)
        if self.checkpointing():
            n = max(1, CE_CHUNK_ELEMS // self.config.vocab_size)
            loss_sum = sum(checkpoint(self._head_loss_sum, xc, tc, use_reentrant=False)
                           for xc, tc in zip(x.split(n), targets.split(n)))
        else:
            loss_sum = self._head_loss_sum(x, targets)
        return None, loss_sum / n_counted + aux_loss

    def target_logps(self, h, targets, temperature=1.0):
        """(B, T, C) final hidden states (hidden_states' output) and (B, T) target ids, -1 where not counted ->
        (B, T) float32 log-probabilities of the targets under lm_head(h) / temperature, 0 where not counted. The
        head runs on the counted positions only (every position under torch.compile)."""
        counted = targets != -1
        if torch.compiler.is_compiling():
            logits = self.lm_head(h).float() / temperature
            nll = F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
            return -nll.view(targets.shape) * counted
        logits = self.lm_head(h[counted]).float() / temperature                     # (N, V), N counted positions
        logps = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
        logps[counted] = -F.cross_entropy(logits, targets[counted], reduction="none")
        return logps

    def _head_loss_sum(self, x, targets):
        # (N, C) states, (N,) targets (-1 ignored) -> 0-dim float32 sum of the token losses
        return F.cross_entropy(self.lm_head(x).float(), targets, ignore_index=-1, reduction="sum")

    # ------------------------------------------------------------------------------------------------------------
    # generation

    def decode_step(self, tok, positions, slot, key_ok, cache):
        """One new token per row against a preallocated cache, with shapes that never change along a generation
        (gpt-fast's design), so that torch.compile traces it once per (batch, cache length) and every later token
        is one fused call. tok (B, 1) ids; positions (B,) their RoPE positions; slot (1,) long, the cache slot
        their keys and values go to; key_ok (B, L) bool, False at prompt padding (slots after `slot` are masked
        here); cache a KVCache of length L -> (B, V) float32 logits of the token after tok."""
        x = self.embed_tokens(tok)                                                            # (B, 1, C)
        cos = self.rope_cos[positions][:, None, None].to(x.dtype)                            # (B, 1, 1, hd/2)
        sin = self.rope_sin[positions][:, None, None].to(x.dtype)
        written = torch.arange(key_ok.shape[1], device=tok.device) <= slot                   # (L,)
        mask = (key_ok & written)[:, None, None]                                             # (B, 1, 1, L)
        view = CacheSlot(cache, slot)
        for i, block in enumerate(self.layers):
            x, _ = block(x, cos, sin, mask, False, view, i)
        return self.lm_head(self.norm(x)[:, -1]).float()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 stop_tokens=(), attention_mask=None, pad_id=0, generator=None, compile=False):
        """(B, T_prompt) -> (B, T_prompt + n_new). After a row's stop token (kept) it gets pad_id."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        stop_tokens, attention_mask, pad_id, generator, compile=compile))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                        stop_tokens=(), attention_mask=None, pad_id=0, generator=None, finished=None,
                        compile=False):
        """Yields a (B,) LongTensor of new tokens per step. Prompts of different lengths: left-pad them (left_pad)
        and pass attention_mask. temperature 0 = greedy.

        Independent rows (a server's requests): `generator` a list of B generators, and temperature, top_k and
        top_p each a scalar or a list of B; each row then samples with its own settings and generator, so a row
        draws the same tokens whichever rows share its batch. `finished` (optional, (B,) bool on idx's device) is
        shared with the caller: a row set True between steps (a client gone, its own length limit) stops, like a
        row that sampled a stop token, and yields pad_id from then on; generation ends once every row is
        finished. With per-row generators finished rows also leave the batch (KV cache included), so the rows
        still running no longer pay for them; with one shared generator the batch keeps its shape, because the
        draws of every row depend on it and a seed must keep giving the same samples.

        compile=True: after the prompt, each token is one call of decode_step compiled by torch.compile (once per
        batch size and cache length, the length rounded up by decode_cache_length; the first call of a shape prints
        its warm-up time on stderr). Greedy outputs are the eager path's. Shapes then stay fixed: finished rows are
        masked (they yield pad_id) but stay in the batch. Where compiling is unavailable (decode_compile_problem)
        it decodes eagerly and says why once."""
        B, T = idx.shape
        if T == 0:
            raise UserError("generate: the prompt is empty; start it with at least one token (e.g. end-of-text)")
        if T + max_new_tokens > self.config.block_size:
            raise UserError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                              f"block_size={self.config.block_size}")
        if max_new_tokens <= 0:
            return
        device = idx.device
        per_row = isinstance(generator, (list, tuple))
        if per_row:  # each computed row's own (temperature, top_k, top_p, generator), indexed by batch row
            def at(v, i):
                return v[i] if isinstance(v, (list, tuple)) else v
            settings = [(at(temperature, i), at(top_k, i), at(top_p, i), generator[i]) for i in range(B)]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the mask-free fast path
        if attention_mask is not None:
            mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=device)
            mask[:, :T] = attention_mask
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:  # positions follow from the cache position
            mask = positions = None
        seen = None
        if repetition_penalty != 1.0:  # which tokens each row has seen (prompt padding excluded)
            real = attention_mask.long() if attention_mask is not None else torch.ones_like(idx)
            seen = torch.zeros(B, self.config.vocab_size, dtype=torch.long, device=device).scatter_add_(1, idx, real) > 0
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        if finished is None:
            finished = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)  # the batch row each computed row stands for
        compiled = compile and _decode_compile_ok(self, device)
        if compiled:  # every token's step reads the whole cache: key_ok masks prompt padding, decode_step the future
            cache_len = decode_cache_length(T + max_new_tokens, self.config.block_size)
            key_ok = torch.ones(B, cache_len, dtype=torch.bool, device=device)
            if attention_mask is not None:
                key_ok[:, :T] = attention_mask.bool()
            else:
                positions = torch.arange(T, device=device).expand(B, T)

        was_training = self.training
        self.eval()  # no dropout while sampling, even if the caller is mid-training (PPO rollouts)
        try:
            cache = self.make_cache(B, cache_len if compiled else T + max_new_tokens)
            if compiled:  # before the prompt's pass, which overwrites the slot the warm-up wrote
                compiled = _warm_up_decode(self, key_ok, cache)
            tok = idx
            for step in range(max_new_tokens):
                if compiled and step > 0:
                    slot = torch.tensor([cache.pos], device=device)
                    logits = _compiled_decode_step(self, tok, positions[:, -1], slot, key_ok, cache)  # (B, V)
                    cache.pos += 1
                else:  # the prompt (any length), or every step when eager
                    x = self.hidden_states(tok, attention_mask=None if mask is None else
                                           mask[:, :cache.pos + tok.shape[1]], positions=positions, cache=cache)
                    logits = self.lm_head(x[:, -1]).float()                                 # (B', V)
                if seen is not None:
                    logits = apply_repetition_penalty(logits, seen, repetition_penalty)
                if per_row:
                    sampled = sample(logits, *map(list, zip(*[settings[r] for r in rows.tolist()])))
                else:
                    sampled = sample(logits, temperature, top_k, top_p, generator)
                next_tok = torch.full((B,), pad_id, dtype=torch.long, device=device)
                next_tok[rows] = sampled
                next_tok = torch.where(finished, torch.full_like(next_tok, pad_id), next_tok)
                yield next_tok
                if len(stop):
                    finished |= torch.isin(next_tok, stop)
                if bool(finished.all()):
                    return
                if seen is not None:
                    seen[torch.arange(len(rows), device=device), sampled] = True
                tok = sampled[:, None]  # finished rows are fed a valid id (pad_id may be any value); unused
                if positions is not None:
                    positions = positions[:, -1:] + 1
                if per_row and not compiled and bool(finished[rows].any()):  # drop finished rows from the work
                    keep = ~finished[rows]
                    rows, tok = rows[keep], tok[keep]
                    cache.keep_rows(keep)
                    mask = None if mask is None else mask[keep]
                    positions = None if positions is None else positions[keep]
                    seen = None if seen is None else seen[keep]
        finally:
            self.train(was_training)


def disable_dropout(model):
    """Switch every dropout of `model` off for good, in training mode too: each nn.Dropout (embedding, residual,
    MLP, and a LoRA adapter's input dropout) and the attention-weight dropout of SDPA. Stages that compare
    log-probabilities of the same tokens from two passes (DPO against its reference, PPO/GRPO against the
    rollout's old log-probs) need this: with dropout on, a policy equal to its reference would already differ
    from it (the PPO ratio would not start at 1). TRL does the same. The model's config keeps its dropout, so the
    next stage that trains with it (SFT) still can. Returns the model."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, Attention):
            m.dropout = 0.0
    return model


class ScoreModel(nn.Module):
    """A GPT trunk with a scalar head on its final hidden states: one number per position. The reward model reads it
    at each sequence's last real token (score); the PPO critic at every response token (values). The trunk's own
    output head is kept (and saved) but unused."""

    def __init__(self, config):
        super().__init__()
        self.gpt = GPT(config)
        self.config = config
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # start every score at 0 (the bias): no random preference before training
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attention_mask=None, lm_targets=None):
        """(B, T) -> (values (B, T) float32 scalars, lm_logps, aux_loss). lm_targets (B, T) target ids (-1 = not
        counted; a reward model regularised with the chosen reply's LM loss): lm_logps the trunk's (B, T)
        language-model log-probabilities of them from the same pass (GPT.target_logps), else None; aux_loss the
        trunk's MoE balancing loss (GPT.forward), for the training loss to add."""
        h, aux_loss = self.gpt.hidden_states(idx, attention_mask=attention_mask, return_aux=True)
        values = self.head(h).squeeze(-1).float()
        return values, (self.gpt.target_logps(h, lm_targets) if lm_targets is not None else None), aux_loss

    def score(self, idx, lengths):
        """(B, T) right-padded ids and (B,) real lengths -> (B,) scores at each row's last real token. The position
        comes from the length, never from the token ids: padding and end-of-turn may share an id."""
        values = self(idx)[0]
        return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)


# ----------------------------------------------------------------------------------------------------------------
# the compiled decode step

_compiled_decode_step = None   # torch.compile(GPT.decode_step), made on first use
_decode_warm = set()           # (model id, device, dtype, batch, cache length) already compiled
_decode_compile_broken = None  # why compiling failed in this process: later generations decode eagerly at once


def decode_cache_length(n, block_size):
    """Cache slots for a generation of n tokens (prompt + new), rounded up to a power of two of at least 64 and
    at most block_size: prompts and reply budgets vary, and each distinct length costs the decode step a compile."""
    return min(block_size, max(64, 1 << (n - 1).bit_length()))


def decode_compile_problem(model, device):
    """None when GPT.decode_step can be compiled for `model` on `device`, else the reason it cannot: torch.compile
    targets CUDA and the CPU here (on MPS and other devices it is missing or experimental); a Mixture-of-Experts
    step has data-dependent shapes; inductor builds C++ kernels on the CPU, so it needs a C++ compiler."""
    kind = torch.device(device).type
    if _decode_compile_broken:
        return _decode_compile_broken
    if kind not in ("cpu", "cuda"):
        return f"torch.compile does not support {kind} here"
    if model.config.n_experts:
        return "a Mixture-of-Experts step has data-dependent shapes"
    if kind == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "no C++ compiler found (inductor builds C++ kernels for the CPU)"
    return None


def _decode_compile_ok(model, device):
    problem = decode_compile_problem(model, device)
    if problem and ("problem", problem) not in _decode_warm:
        _decode_warm.add(("problem", problem))
        print(f"decoding eagerly: {problem}", file=sys.stderr)
    return problem is None


def _warm_up_decode(model, key_ok, cache):
    """Compile the decode step for this shape on its first use, timing it for the progress output; a failed
    compile (no working toolchain, an unsupported layer) leaves eager decoding. -> whether to run compiled."""
    global _compiled_decode_step, _decode_compile_broken
    p = model.norm.weight
    key = (id(model), str(p.device), p.dtype, *key_ok.shape)
    if key in _decode_warm:
        return True
    if _compiled_decode_step is None:
        # fullgraph: a graph break would split the step and bring back the per-op overhead it removes
        _compiled_decode_step = torch.compile(GPT.decode_step, dynamic=False, fullgraph=True)
        # dynamo keeps 8 compiled versions of a function by default and then runs it uncompiled; a server sees a
        # batch size per request count, times a few cache lengths
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    B, L = key_ok.shape
    print(f"compiling the decode step (batch {B}, cache {L})...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tok = torch.zeros(B, 1, dtype=torch.long, device=p.device)
    try:
        _compiled_decode_step(model, tok, tok[:, 0], tok[0], key_ok, cache)
    except Exception as e:  # inductor raises many kinds; any of them means: no compiled step here
        _decode_compile_broken = f"compiling failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        print(f" {_decode_compile_broken}; decoding eagerly", file=sys.stderr)
        return False
    _decode_warm.add(key)
    print(f" {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return True


GREEDY_BELOW = 1e-5  # a temperature this small is greedy: dividing by it would overflow float32 logits


def check_sampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """An error naming the setting (--temperature, --top_k, --top_p, --repetition_penalty) that no sampler can
    honour: a temperature < 0, top_k < 0 (0 or None = off), top_p outside (0, 1], a repetition penalty <= 0, or
    any of them not a finite number."""
    def finite(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if not (finite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not (finite(top_k) and top_k == int(top_k) and top_k >= 0):
        raise UserError(f"--top_k must be a whole number >= 0 (0 = off), got {top_k}")
    if top_p is not None and not (finite(top_p) and 0 < top_p <= 1):
        raise UserError(f"--top_p must be in (0, 1] (1 = off), got {top_p}")
    if not (finite(repetition_penalty) and repetition_penalty > 0):
        raise UserError(f"--repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty}")


def apply_repetition_penalty(logits, seen, penalty):
    """(B, V) float logits, (B, V) bool seen -> (B, V): the seen tokens made less likely whatever the sign of their
    logit (CTRL, Keskar et al. 2019, as in transformers): a positive logit divided by the penalty, a negative one
    multiplied. The result saturates at the dtype's largest finite value, so that no penalty (1e-300 or 1e300)
    yields inf, and inf - inf = NaN, in the softmax that follows."""
    check_sampling(repetition_penalty=penalty)
    # the penalty as a number of the logits' dtype that is neither 0 nor inf (1e300 in float32 is inf, and 0 * inf
    # is NaN); the products are then at worst +-inf, which the clamp turns back into finite values
    info = torch.finfo(logits.dtype)
    penalty = min(max(penalty, info.tiny), info.max)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised.clamp(-info.max, info.max), logits)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) float logits -> (B,) token ids. temperature 0 (or below 1e-5) = greedy (argmax); top_k None or 0 and
    top_p None or 1.0 = no cut. Nucleus sampling: Holtzman et al. 2019. Any setting that check_sampling accepts
    gives finite probabilities; the others raise its error. Independent rows: temperature, top_k and top_p may
    each be a list of B values and generator a list of B generators (sample_rows)."""
    if any(isinstance(v, (list, tuple)) for v in (temperature, top_k, top_p, generator)):
        return sample_rows(logits, temperature, top_k, top_p, generator)
    check_sampling(temperature, top_k, top_p)
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    # shift so the largest logit is 0 before dividing: every scaled logit is then <= 0, so exp() cannot overflow
    # (an inf logit, e.g. from a caller's own penalty, is taken as the largest finite one)
    logits = logits.float().clamp(max=torch.finfo(torch.float32).max)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k and top_k < logits.size(-1):  # None or 0: no top-k cut
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass (the top token always stays)
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_rows(logits, temperature, top_k, top_p, generator):
    """sample() with one setting per row: the same steps batched; only the draws are made row by row."""
    B, V = logits.shape

    def per_row(v):
        return list(v) if isinstance(v, (list, tuple)) else [v] * B
    temps, gens = per_row(temperature), per_row(generator)
    for t, k, p in zip(temps, per_row(top_k), per_row(top_p)):
        check_sampling(t, k, p)
    temps = [0.0 if t < GREEDY_BELOW else t for t in temps]
    ks = [k if k and k < V else V for k in per_row(top_k)]
    ps = [p if p is not None and p < 1.0 else 1.0 for p in per_row(top_p)]
    greedy = logits.argmax(dim=-1)
    # as in sample(): shifted so the largest logit is 0 before dividing, so that exp() cannot overflow
    logits = logits.float().clamp(max=torch.finfo(torch.float32).max)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    logits = logits / torch.tensor([t or 1.0 for t in temps], dtype=logits.dtype, device=logits.device)[:, None]
    if min(ks) < V:
        cut = [k for k in ks if k < V]
        top = logits.topk(max(cut), dim=-1).values                                  # (B, largest k)
        kth = top.gather(1, torch.tensor([min(k, max(cut)) - 1 for k in ks], device=logits.device)[:, None])
        off = torch.tensor([k == V for k in ks], device=logits.device)[:, None]   # rows without a top-k cut
        logits = logits.masked_fill((logits < kth) & ~off, float("-inf"))
    if min(ps) < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        top_p_ = torch.tensor(ps, dtype=probs.dtype, device=logits.device)[:, None]
        drop = (probs.cumsum(dim=-1) - probs > top_p_) & (top_p_ < 1.0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.stack([greedy[i] if temps[i] == 0 else torch.multinomial(probs[i], 1, generator=gens[i])[0]
                        for i in range(B)])


def left_pad(seqs, pad_id):
    """list of token-id lists -> (idx (B, T) long, attention_mask (B, T) long), padded on the left so that every
    row's last prompt token sits in the last column, where generation continues."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            idx[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, T - len(s):] = 1
    return idx, attention_mask


# ----------------------------------------------------------------------------------------------------------------
# transformers interop: LlamaForCausalLM and Qwen2ForCausalLM (a Llama with q/k/v biases). convert.py imports and
# exports through these; tests check the logits agree.

def from_hf_llama_state_dict(sd):
    """transformers LlamaForCausalLM / Qwen2ForCausalLM state dict -> ours (q/k/v and gate/up concatenated, q/k/v
    biases too when present; a tied HF model may omit lm_head.weight). UserError naming a missing tensor."""
    def get(name):
        if name not in sd:
            raise UserError(f"not a Llama state dict: missing {name!r}")
        return sd[name]
    layers = [int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")]
    if not layers:
        raise UserError("not a Llama state dict: no 'model.layers.*' tensors")
    out = {"embed_tokens.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight"),
           "lm_head.weight": sd.get("lm_head.weight", get("model.embed_tokens.weight"))}
    for i in range(1 + max(layers)):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[ours + "attn_norm.weight"] = get(hf + "input_layernorm.weight")
        out[ours + "attn.qkv_proj.weight"] = torch.cat([get(hf + f"self_attn.{p}_proj.weight") for p in "qkv"])
        if hf + "self_attn.q_proj.bias" in sd:
            out[ours + "attn.qkv_proj.bias"] = torch.cat([get(hf + f"self_attn.{p}_proj.bias") for p in "qkv"])
        out[ours + "attn.o_proj.weight"] = get(hf + "self_attn.o_proj.weight")
        out[ours + "mlp_norm.weight"] = get(hf + "post_attention_layernorm.weight")
        out[ours + "mlp.gate_up_proj.weight"] = torch.cat([get(hf + "mlp.gate_proj.weight"),
                                                           get(hf + "mlp.up_proj.weight")])
        out[ours + "mlp.down_proj.weight"] = get(hf + "mlp.down_proj.weight")
    return out


def to_hf_llama_state_dict(sd, config):
    """Our state dict -> transformers LlamaForCausalLM's (Qwen2ForCausalLM's with attn_bias). Dense models only:
    neither has a Mixture-of-Experts MLP."""
    if config.n_experts:
        raise UserError("a Mixture-of-Experts model has no LlamaForCausalLM equivalent")
    qkv_sizes = [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        for suffix in ("weight", "bias") if config.attn_bias else ("weight",):
            q, k, v = sd[ours + f"attn.qkv_proj.{suffix}"].split(qkv_sizes)
            out.update({hf + f"self_attn.q_proj.{suffix}": q, hf + f"self_attn.k_proj.{suffix}": k,
                        hf + f"self_attn.v_proj.{suffix}": v})
        out[hf + "self_attn.o_proj.weight"] = sd[ours + "attn.o_proj.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "mlp_norm.weight"]
        gate, up = sd[ours + "mlp.gate_up_proj.weight"].chunk(2)
        out.update({hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up})
        out[hf + "mlp.down_proj.weight"] = sd[ours + "mlp.down_proj.weight"]
    return out


def to_hf_llama_config(cfg):
    """Keyword arguments for transformers.LlamaConfig (Qwen2Config with attn_bias; its model_type says which)
    describing the same architecture."""
    if cfg.n_experts:
        raise UserError("a Mixture-of-Experts model has no LlamaForCausalLM equivalent")
    d = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
             num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
             head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
             tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout, hidden_act="silu")
    if cfg.attn_bias:
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    else:
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False)
    return d


def from_hf_llama_config(hf):
    """A transformers LlamaConfig or Qwen2Config (the object, its to_dict() or a config.json's dict, of
    transformers 4 or 5) -> ModelConfig. Anything this model does not compute the same way is refused with a
    UserError naming the field: an activation other than SiLU, scaled or partial RoPE, sliding-window attention,
    an output-projection or MLP bias, a head_dim that is not hidden_size / num_attention_heads."""
    d = hf if isinstance(hf, dict) else hf.to_dict()
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "qwen2"):
        raise UserError(f"model_type={model_type!r} is not supported (only llama and qwen2)")

    def refuse(field, why):
        raise UserError(f"{field}={d[field]!r}: {why}; this model cannot represent it")
    for field in ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if field not in d:
            raise UserError(f"missing field {field!r} (not a Llama or Qwen2 config)")
    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only 'silu' (SwiGLU) is implemented")
    # transformers 4 wrote rope_theta and rope_scaling; transformers 5 folds both into rope_parameters
    scaling = d.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        refuse("rope_scaling", "scaled RoPE is not implemented (only plain RoPE)")
    rope = d.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" or set(rope) - {"rope_type", "type", "rope_theta"}:
        refuse("rope_parameters", "scaled or partial RoPE is not implemented (only plain RoPE with rope_theta)")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "RoPE on part of each head is not implemented")
    if d.get("attention_bias"):
        refuse("attention_bias", "Llama's attention bias includes the output projection, which this model lacks")
    if d.get("mlp_bias"):
        refuse("mlp_bias", "MLP biases are not implemented")
    if d.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window attention is not implemented")
    n_head = d["num_attention_heads"]
    if d.get("head_dim") not in (None, d["hidden_size"] // n_head):
        refuse("head_dim", f"only hidden_size // num_attention_heads = {d['hidden_size'] // n_head} is implemented")
    return ModelConfig(vocab_size=d["vocab_size"], block_size=d.get("max_position_embeddings", 2048),
                       n_layer=d["num_hidden_layers"], n_head=n_head,
                       n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=d["hidden_size"],
                       intermediate_size=d["intermediate_size"],
                       rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                       norm_eps=d.get("rms_norm_eps", 1e-6), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                       attn_bias=model_type == "qwen2")
