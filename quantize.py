"""
Homemade weight quantization in plain PyTorch (no bitsandbytes), so it runs on CPU, MPS and CUDA alike.

- NF4 (QLoRA, Dettmers et al. 2023): the flattened weight is cut into blocks of 64, each block is divided by its
  absolute maximum and every value is replaced by the nearest of 16 NormalFloat code points; two 4-bit codes share a
  byte. Double quantization stores the per-block absmax constants themselves in 8 bits (blocks of 256, mean
  subtracted first), which brings the cost from 4.5 down to ~4.127 bits per weight.
- int8 weight-only: one absmax scale per output channel. For inference. A tied token embedding and output head
  (tie_embeddings) become one int8 matrix with one scale per row: a row is a token's embedding and an output
  channel of the head, so the embedding gathers int8 rows and the head multiplies by the same int8 weight.

`Linear4bit` / `Linear8bit` keep the packed weight in buffers (so the state dict holds the packed data) and
dequantize on the fly, in row chunks, in forward and again in backward: only the gradient w.r.t. the input is
computed (the base is frozen), which is what QLoRA needs to reach adapters in earlier layers, and no dequantized
weight stays alive between forward and backward. Linear8bit's inference forward (no gradient to the input) reads the
int8 weight directly instead: y = (x q^T) * scale, through PyTorch's int8 weight-only kernel where it is fast.

CLI: python quantize.py --ckpt=checkpoints/sft/ckpt.pt --mode=nf4|int8 [--tied_head=False] [--out=...]
writes a quantized checkpoint that generate.py can chat with, and prints sizes and the change in val loss.
"""
import json
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import prepare
from common import UserError
from model import GPT, ModelConfig

# -----------------------------------------------------------------------------
# The NF4 code: the published NormalFloat4 table. 8 positive and 7 negative quantiles of N(0, 1), normalised to
# [-1, 1], plus an exact zero (so zero padding and zero weights stay exactly zero). nf4_code_from_quantiles()
# rebuilds it from its definition; the tests check the two agree.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# decision boundaries between neighbouring codes: a value on a boundary goes to the upper code (see nf4_encode)
NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2

NF4_BLOCK_SIZE = 64      # weights per absmax constant
ABSMAX_BLOCK_SIZE = 256  # absmax constants per second-level scale (double quantization)
DEQUANT_CHUNK_ELEMS = 1 << 24  # dequantize at most this many weights at a time (64 MB in fp32)


def nf4_code_from_quantiles(offset=0.9677083):
    """The NF4 code from its definition: quantiles of N(0,1) at evenly spaced probabilities, 9 on the positive side
    (the last being 0.5 -> 0) and 8 on the negative side, so that 0 is a code point and the code is asymmetric;
    `offset` = mean of 1 - 1/(2*15) and 1 - 1/(2*16) keeps the outermost quantile finite."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (code / code.abs().max()).float()


def nf4_encode(x):
    """Values in [-1, 1] -> nearest NF4 code index (uint8). Out-of-range values clamp to the end codes; a value exactly
    halfway between two codes goes to the upper one, like round-half-up."""
    x = x.float().clamp(-1.0, 1.0)
    return torch.bucketize(x, NF4_MIDPOINTS.to(x.device), right=True).to(torch.uint8)


def pack_4bit(codes):
    """(n,) uint8 codes < 16, n even -> (n//2,) uint8; element 2i goes to the high nibble, 2i+1 to the low one."""
    assert codes.numel() % 2 == 0, "pack_4bit needs an even number of codes"
    codes = codes.reshape(-1)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed):
    """(m,) uint8 -> (2m,) uint8 codes, the inverse of pack_4bit."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)


def _safe(scale):
    # an all-zero block has absmax 0: divide by 1 instead, its values are all 0 and encode to the exact-zero code
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _check_finite(w):
    if not torch.isfinite(w).all():
        raise UserError("quantize: the weight contains NaN or inf; the checkpoint is broken, nothing to quantize")


def quantize_nf4(w, block_size=NF4_BLOCK_SIZE):
    """Any-shaped float weight -> (packed (ceil(n/bs)*bs/2,) uint8, absmax (n_blocks,) float32). The flattened weight is
    zero-padded to a whole number of blocks; the padding encodes to the zero code and is dropped on dequantization."""
    assert block_size > 0 and block_size % 2 == 0, "block_size must be a positive even number"
    flat = w.detach().float().reshape(-1)
    _check_finite(flat)
    flat = F.pad(flat, (0, (-flat.numel()) % block_size))
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    codes = nf4_encode(blocks / _safe(absmax)[:, None])
    return pack_4bit(codes), absmax


_PAIR_TABLES = {}


def _nf4_pair_table(device):
    # byte -> (code[high nibble], code[low nibble]): one gather dequantizes two weights, no shifting per element.
    # Kept per device outside the modules so that model.to(bfloat16) cannot round the code values.
    key = str(device)
    if key not in _PAIR_TABLES:
        b = torch.arange(256)
        _PAIR_TABLES[key] = torch.stack((NF4_CODE[b >> 4], NF4_CODE[b & 0xF]), dim=1).to(device)  # (256, 2)
    return _PAIR_TABLES[key]


def dequantize_nf4(packed, absmax, numel=None, block_size=NF4_BLOCK_SIZE, dtype=torch.float32):
    """Inverse of quantize_nf4 up to the code rounding: returns the flat (numel,) weight (reshape it yourself)."""
    vals = _nf4_pair_table(packed.device).index_select(0, packed.int())  # (n_bytes, 2)
    w = vals.view(-1, block_size) * absmax.float()[:, None]
    w = w.view(-1)
    return (w if numel is None else w[:numel]).to(dtype)


def quantize_absmax(absmax, block_size=ABSMAX_BLOCK_SIZE):
    """Double quantization: absmax (n,) float32 -> (q (n,) int8, step (ceil(n/bs),) float32, mean () float32).
    The absmax values are all positive, so subtracting their mean first centres them and lets the symmetric int8
    grid spend its 255 levels on the spread rather than on the offset."""
    absmax = absmax.float()
    n = absmax.numel()
    mean = absmax.mean()
    blocks = F.pad(absmax - mean, (0, (-n) % block_size)).view(-1, block_size)
    step = blocks.abs().amax(dim=1) / 127
    q = torch.round(blocks / _safe(step)[:, None]).clamp(-127, 127).to(torch.int8)
    return q.view(-1)[:n].contiguous(), step, mean


def dequantize_absmax(q, step, mean, block_size=ABSMAX_BLOCK_SIZE):
    n = q.numel()
    blocks = F.pad(q.float(), (0, (-n) % block_size)).view(-1, block_size)
    return (blocks * step.float()[:, None]).view(-1)[:n] + mean.float()


def quantize_int8(w):
    """(out, in) float -> (q (out, in) int8, scale (out,) float32) with w ~= q * scale[:, None]."""
    w = w.detach().float()
    _check_finite(w)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / _safe(scale)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q, scale, dtype=torch.float32, row_start=0, row_end=None):
    """Rows row_start:row_end of q (out, in) int8 with scale (out,) -> (rows, in) q * scale[:, None] in `dtype`."""
    w = q[row_start:row_end]
    return (w.float() * scale[row_start:row_end].float()[:, None]).to(dtype)


# -----------------------------------------------------------------------------
# Modules

def _compute_dtype(x):
    # under autocast the matmul runs in the autocast dtype anyway: dequantize straight into it, not into fp32 first
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _DequantLinearFn(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly. Backward dequantizes W again instead of saving it, and returns only
    the input gradient: the quantized weight is frozen, but adapters in earlier layers need grad to flow through."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        outs = [F.linear(x, layer.dequantize(dtype, r0, r1)) for r0, r1 in layer.row_chunks()]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        layer = ctx.layer
        grad_x = None
        for r0, r1 in layer.row_chunks():
            part = grad_out[..., r0:r1] @ layer.dequantize(grad_out.dtype, r0, r1)  # (..., rows) @ (rows, in)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(ctx.x_dtype), None


class QuantLinear(nn.Module):
    """Shared by Linear4bit and Linear8bit: a frozen linear whose weight lives in buffers and is dequantized per
    chunk of output rows. Subclasses implement dequantize(dtype, row_start, row_end) -> (rows, in_features)."""

    def __init__(self, in_features, out_features, bias, device):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.chunk_elems = DEQUANT_CHUNK_ELEMS
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def row_chunks(self):
        step = max(1, self.chunk_elems // self.in_features)
        return [(r, min(r + step, self.out_features)) for r in range(0, self.out_features, step)]

    def forward(self, x):
        y = _DequantLinearFn.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_nbytes(self):
        """Bytes of everything that stores the weight (not the bias)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False) if n != "bias")

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Linear4bit(QuantLinear):
    """Frozen NF4 linear. Buffers: weight_packed (uint8, two codes per byte) and either absmax (float32, one per block)
    or, with double quantization, absmax_q (int8) + absmax_step (float32, one per 256 blocks) + absmax_mean."""

    def __init__(self, in_features, out_features, bias=False, block_size=NF4_BLOCK_SIZE, double_quant=True, device=None):
        super().__init__(in_features, out_features, bias, device)
        assert block_size > 0 and block_size % 2 == 0, "block_size must be a positive even number"
        self.block_size = block_size
        self.double_quant = double_quant
        n_blocks = -(-in_features * out_features // block_size)
        self.register_buffer("weight_packed", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(n_blocks, dtype=torch.int8, device=device))
            self.register_buffer("absmax_step", torch.zeros(-(-n_blocks // ABSMAX_BLOCK_SIZE), device=device))
            self.register_buffer("absmax_mean", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))

    @classmethod
    def from_linear(cls, linear, block_size=NF4_BLOCK_SIZE, double_quant=True):
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, double_quant, w.device)
        packed, absmax = quantize_nf4(w, block_size)
        m.weight_packed.copy_(packed)
        if double_quant:
            q, step, mean = quantize_absmax(absmax)
            m.absmax_q.copy_(q)
            m.absmax_step.copy_(step)
            m.absmax_mean.copy_(mean)
        else:
            m.absmax.copy_(absmax)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def block_absmax(self):
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_step, self.absmax_mean)
        return self.absmax.float()

    def dequantize(self, dtype=torch.float32, row_start=0, row_end=None):
        row_end = self.out_features if row_end is None else row_end
        bs = self.block_size
        start, end = row_start * self.in_features, row_end * self.in_features  # flat element range
        b0, b1 = start // bs, -(-end // bs)  # the blocks that cover it
        packed = self.weight_packed[b0 * bs // 2: b1 * bs // 2]
        w = dequantize_nf4(packed, self.block_absmax()[b0:b1], None, bs, torch.float32)
        return w[start - b0 * bs: end - b0 * bs].view(row_end - row_start, self.in_features).to(dtype)

    def extra_repr(self):
        return super().extra_repr() + f", block_size={self.block_size}, double_quant={self.double_quant}"


class Linear8bit(QuantLinear):
    """Frozen int8 weight-only linear, one scale per output channel. Buffers: weight (int8, out x in), scale (float32)."""

    def __init__(self, in_features, out_features, bias=False, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, device=device))

    @classmethod
    def from_linear(cls, linear):
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        q, scale = quantize_int8(linear.weight)
        m.weight.copy_(q)
        m.scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def dequantize(self, dtype=torch.float32, row_start=0, row_end=None):
        return dequantize_int8(self.weight, self.scale, dtype, row_start, row_end)

    def forward(self, x):
        """x (..., in_features) -> (..., out_features). Without a gradient to x, y = (x q^T) * scale straight from the
        int8 weight q (no dequantized copy): on CUDA, and in bf16 on CPU, PyTorch's int8 weight-only kernel
        aten._weight_int8pack_mm; elsewhere on CPU the int8 rows are widened for the matmul, a block of rows at a
        time (_widened_mm), and the scale is applied to the output (one pass over the weight instead of two).
        Training (a gradient must reach x, as for LoRA on a frozen base) and MPS take QuantLinear's chunked
        dequantize path."""
        if (torch.is_grad_enabled() and x.requires_grad) or x.device.type not in ("cpu", "cuda"):
            return super().forward(x)
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        y = None
        if _int8pack_usable(x.device.type, dtype, self.in_features):
            y = _int8pack_mm(x2, self.weight, self.scale.to(dtype))
        if y is None:
            y = _widened_mm(x2, self.weight) * self.scale.to(dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Embedding8bit(nn.Module):
    """Frozen int8 token embedding, one absmax scale per row (token). Buffers: weight (num_embeddings x
    embedding_dim, int8), scale (num_embeddings,) float32; row i stands for weight[i] * scale[i]. In a tied model
    these rows are also the output head's channels: TiedLinear8bit reads the same two buffers."""

    def __init__(self, num_embeddings, embedding_dim, device=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(num_embeddings, device=device))

    @classmethod
    def from_embedding(cls, embedding):
        if embedding.max_norm is not None:  # nn.Embedding renormalizes such rows in place on lookup
            raise UserError("quantize: an embedding with max_norm cannot be quantized")
        m = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.device)
        q, scale = quantize_int8(embedding.weight)
        m.weight.copy_(q)
        m.scale.copy_(scale)
        return m

    def forward(self, idx):
        """idx (...) long -> (..., embedding_dim) in the scale's dtype (float32, or the model's after .to(dtype)):
        only the looked-up int8 rows are gathered and scaled."""
        return self.weight[idx].to(self.scale.dtype) * self.scale[idx].unsqueeze(-1)

    def dequantize(self, dtype=torch.float32, row_start=0, row_end=None):
        return dequantize_int8(self.weight, self.scale, dtype, row_start, row_end)

    def weight_nbytes(self):
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class TiedLinear8bit(Linear8bit):
    """The int8 output head of a model whose head shares its weight with the token embedding: no buffers of its own,
    it multiplies by the weight (V, d) and scale (V,) of the Embedding8bit it is tied to. The matrix is thus stored,
    saved (under the embedding's name only) and moved by .to() once, and the two can never drift apart."""

    def __init__(self, embedding):
        QuantLinear.__init__(self, embedding.embedding_dim, embedding.num_embeddings, False, None)
        object.__setattr__(self, "embedding", embedding)  # not a submodule: its buffers are listed once, there

    @property
    def weight(self):
        return self.embedding.weight

    @property
    def scale(self):
        return self.embedding.scale

    def weight_nbytes(self):
        return self.embedding.weight_nbytes()


WIDEN_CHUNK_ELEMS = 1 << 20  # int8 weights widened at a time by _widened_mm (4 MB in fp32)


def _widened_mm(x2d, q):
    """x (M, K) float @ q (N, K) int8 ^T -> (M, N) in x's dtype, q widened to x's dtype WIDEN_CHUNK_ELEMS weights at
    a time: each widened block is multiplied while it is still in cache. Widening SmolLM2's 49,152 x 576 head whole
    writes and rereads 113 MB per token (57 ms against fp32's 10 ms at batch 1 on this CPU); in blocks, 4.2 ms."""
    step = max(1, WIDEN_CHUNK_ELEMS // q.shape[1])
    if q.shape[0] <= step:
        return F.linear(x2d, q.to(x2d.dtype))
    return torch.cat([F.linear(x2d, q[r:r + step].to(x2d.dtype)) for r in range(0, q.shape[0], step)], dim=-1)


_INT8PACK_UNSUPPORTED = set()  # (device type, dtype) where the kernel raised: not tried again


def _int8pack_usable(device_type, dtype, in_features):
    # CPU, torch 2.13: only the bf16 kernel is vectorized (the fp32 one is scalar code, ~10x slower than an fp32
    # matmul at batch 1 on AVX-512), fp16 raises, and the bf16 kernel reads out of bounds (segfault) when
    # in_features is not a multiple of 16: used only for in_features % 64 == 0 (SmolLM2's 576 and 1536); other
    # widths take the widened path
    if device_type == "cpu":
        return dtype == torch.bfloat16 and in_features % 64 == 0
    return device_type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16) and in_features % 64 == 0


def _int8pack_mm(x2d, weight, scale):
    """aten._weight_int8pack_mm(x (M, K) fp32/bf16/fp16, int8 weight (N, K), scale (N,) in x's dtype) -> (M, N)
    = x (q * scale[:, None])^T, or None where this PyTorch build has no kernel for the device and dtype."""
    key = (x2d.device.type, x2d.dtype)
    if key in _INT8PACK_UNSUPPORTED:
        return None
    try:
        return torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), weight, scale)
    except (RuntimeError, NotImplementedError, AttributeError):
        _INT8PACK_UNSUPPORTED.add(key)
        return None


# -----------------------------------------------------------------------------
# Whole models

# regexes on module names that stay in full precision by default: an untied output head (the most sensitive layer)
# and MoE routers (tiny, and rounding them flips which experts a token gets). A head tied to the embedding is
# quantize_model's `tied_head` setting instead.
DEFAULT_SKIP = (r"(^|\.)lm_head$", r"(^|\.)router$")


def _matches(name, patterns):
    return any(re.search(p, name) for p in patterns)


def _replace_linears(model, names, make):
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def _head_is_tied(model, name):
    w = model.get_submodule(name).weight
    return any(p is w for n, p in model.named_parameters(remove_duplicate=False) if n != name + ".weight")


def _tied_heads(model):
    """{head name: embedding name} for every nn.Linear whose weight is an nn.Embedding's (tie_embeddings)."""
    embeddings = {id(m.weight): n for n, m in model.named_modules() if type(m) is nn.Embedding}
    return {n: embeddings[id(m.weight)] for n, m in model.named_modules()
            if type(m) is nn.Linear and id(m.weight) in embeddings}


def _tie_int8(model, head, embedding, make_embedding):
    """Swap the embedding for make_embedding(it) (an Embedding8bit) and the head for a TiedLinear8bit reading it."""
    _replace_linears(model, [embedding], make_embedding)
    _replace_linears(model, [head], lambda _: TiedLinear8bit(model.get_submodule(embedding)))


def quantize_model(model, mode="nf4", skip=DEFAULT_SKIP, block_size=NF4_BLOCK_SIZE, double_quant=True,
                   tied_head=True):
    """Replace every nn.Linear whose name matches none of the `skip` regexes by Linear4bit (mode 'nf4') or Linear8bit
    (mode 'int8'), in place. In int8 mode with tied_head, an output head that shares its weight with a token
    embedding (tie_embeddings) is quantized too, whatever `skip` says, together with that embedding: one int8 matrix
    with a scale per row (Embedding8bit + TiedLinear8bit). In a small model it is a large share of the bytes a
    decoded token reads (SmolLM2-135M: 28M of 135M weights). NF4 never touches embeddings: QLoRA trains with the
    tied embedding/head in full precision, and NF4 has no fast matmul to decode with. Other embeddings stay too.
    Returns the `quantization` entry of a checkpoint: {"mode", "block_size", "double_quant", "skip", "modules":
    [replaced linear names], "tied": {head name: embedding name} of the tied pairs quantized (int8 only)}.
    Errors: UserError for an unknown mode, a model with LoRA adapters, or a tied head that `skip` leaves to be
    quantized where it cannot be (nf4, or tied_head=False)."""
    if mode not in ("nf4", "int8"):
        raise UserError(f"quantize: mode must be 'nf4' or 'int8', got {mode!r}")
    if any(".lora_A" in n or n.startswith("lora_A") for n, _ in model.named_parameters()):
        raise UserError("quantize: the model already has LoRA adapters; quantize the base first, then add LoRA")
    tied = _tied_heads(model) if mode == "int8" and tied_head else {}
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip) and n not in tied]
    shared = [n for n in names if _head_is_tied(model, n)]
    if shared:
        raise UserError(f"quantize: {shared[0]} shares its weight with another layer (tied embeddings); "
                        f"keep it in full precision (leave it in skip)"
                        + (", or quantize it with the embedding in int8 mode" if mode == "nf4" else ""))
    if mode == "nf4":
        _replace_linears(model, names, lambda lin: Linear4bit.from_linear(lin, block_size, double_quant))
    else:
        _replace_linears(model, names, Linear8bit.from_linear)
        for head, embedding in tied.items():
            _tie_int8(model, head, embedding, Embedding8bit.from_embedding)
    info = {"mode": mode, "skip": list(skip), "modules": names}
    if mode == "nf4":
        info.update(block_size=block_size, double_quant=double_quant)
    else:
        info["tied"] = tied
    return info


def _empty_quant_linear(lin, q):
    dev = lin.weight.device
    if q["mode"] == "nf4":
        return Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, q["block_size"], q["double_quant"], dev)
    return Linear8bit(lin.in_features, lin.out_features, lin.bias is not None, dev)


def load_quantized_model(ckpt, device):
    """Rebuild a GPT from a quantized checkpoint dict (as written by this file's CLI): build the float model, swap the
    recorded linears (and a tied int8 embedding/head) for empty quantized shells of the same shape, then load the
    packed state dict. UserError for an entry that does not fit the model."""
    q = ckpt.get("quantization")
    if not isinstance(q, dict) or q.get("mode") not in ("nf4", "int8") or not isinstance(q.get("modules"), list):
        raise UserError("checkpoint: 'quantization' must be a dict with mode 'nf4' or 'int8' and a 'modules' list")
    if q["mode"] == "nf4" and not ("block_size" in q and "double_quant" in q):
        raise UserError("checkpoint: an nf4 'quantization' entry needs 'block_size' and 'double_quant'")
    tied = q.get("tied", {})  # absent in int8 checkpoints that kept the tied head in full precision
    if not isinstance(tied, dict) or (tied and q["mode"] != "int8"):
        raise UserError("checkpoint: 'quantization' 'tied' must be a dict {head: embedding}, in int8 mode only")
    model = GPT(ModelConfig.from_dict(ckpt["model_config"]))
    for name in q["modules"]:
        try:
            ok = type(model.get_submodule(name)) is nn.Linear
        except AttributeError:
            ok = False
        if not ok:
            raise UserError(f"checkpoint: quantized module {name!r} is not a linear layer of this model")
    heads = _tied_heads(model)
    for head, embedding in tied.items():
        if heads.get(head) != embedding:
            raise UserError(f"checkpoint: quantized {head!r} is not a head tied to the embedding {embedding!r} in "
                            f"this model")
    _replace_linears(model, q["modules"], lambda lin: _empty_quant_linear(lin, q))
    for head, embedding in tied.items():
        _tie_int8(model, head, embedding,
                  lambda emb: Embedding8bit(emb.num_embeddings, emb.embedding_dim, emb.weight.device))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint: the quantized weights do not fit the model: {str(e).splitlines()[0]}") from None
    return model.to(device)


# -----------------------------------------------------------------------------
# Measurements (used by the CLI below and by bench.py)

def state_dict_nbytes(sd):
    """Bytes of a state dict's tensors, counting storage shared by several keys (tied weights) once."""
    seen, total = set(), 0
    for t in sd.values():
        if not torch.is_tensor(t):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def bits_per_weight(model):
    """Storage bits per quantized weight over all Linear4bit/Linear8bit layers of a model (padding and the scale
    constants included, bias excluded): ~4.127 for NF4 with double quantization, 4.5 without, ~8.0x for int8."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return float("nan")
    nbytes = sum(m.weight_nbytes() for m in layers)
    nweights = sum(m.in_features * m.out_features for m in layers)
    return 8 * nbytes / nweights


def _val_tokens(ckpt):
    """The checkpoint's data set's val.bin as a memmap, or None when it (or the data set name) is not there."""
    dataset = (ckpt.get("train_config") or {}).get("dataset")
    if not isinstance(dataset, str) or not dataset:
        return None, None
    try:
        path, dtype = prepare.token_file(dataset, "val", ckpt["model_config"]["vocab_size"])
    except UserError:
        return None, os.path.join(common.dataset_dir(dataset), "val.bin")
    return np.memmap(path, dtype=dtype, mode="r"), path


@torch.no_grad()
def _val_loss(model, tokens, starts, seq_len, device, autocast):
    """Mean loss over fixed windows of `tokens`: the same windows before and after quantizing."""
    losses = []
    for row in starts:  # one batch of window starts
        batch = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in row]).astype(np.int64)).to(device)
        with autocast:
            _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        losses.append(loss.float().item())
    return sum(losses) / len(losses)


# -----------------------------------------------------------------------------
# CLI settings (--key=value or a config/PRESET.py; the lowercase constants below are the settings)
ckpt = 'checkpoints/sft/ckpt.pt'  # the checkpoint to quantize (a stage folder means its ckpt.pt)
mode = 'nf4'               # nf4 (4-bit NormalFloat, ~4.13 bits/weight) | int8 (per-channel weight-only)
out = ''                   # '' = next to the input: <folder>/ckpt_<mode>.pt
nf4_block = 64             # nf4: weights per absmax constant
double_quant = True        # nf4: store the absmax constants in 8 bits too (4.127 instead of 4.5 bits/weight)
quantize_head = False      # also quantize an untied output head
tied_head = True           # int8: a head tied to the token embedding becomes int8 with it (one matrix, per-row scales)
eval_iters = 20            # val loss before/after on this many batches of data/<dataset>/val.bin; 0 = skip
eval_batch_size = 8
device = 'auto'            # auto = cuda, then mps, then cpu
dtype = 'auto'
seed = 1337
# -----------------------------------------------------------------------------


def main():
    cfg = common.configure(globals())
    if cfg["mode"] not in ("nf4", "int8"):
        raise UserError(f"--mode must be nf4 or int8, got {cfg['mode']!r}")
    if cfg["nf4_block"] <= 0 or cfg["nf4_block"] % 2:
        raise UserError(f"--nf4_block must be a positive even number, got {cfg['nf4_block']}")
    if cfg["eval_iters"] < 0 or cfg["eval_batch_size"] < 1:
        raise UserError("--eval_iters must be >= 0 and --eval_batch_size >= 1")
    path = cfg["ckpt"]
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    src = common.load_checkpoint(path, stages=common.POLICY_STAGES)
    if "quantization" in src:
        raise UserError(f"{path}: already quantized ({src['quantization'].get('mode')}); "
                                f"quantize the full-precision checkpoint instead")
    out_path = cfg["out"] or os.path.join(os.path.dirname(os.path.abspath(path)), f"ckpt_{cfg['mode']}.pt")
    if os.path.abspath(out_path) == os.path.abspath(path):
        raise UserError(f"--out={out_path} would overwrite the checkpoint being quantized")
    rt = common.setup(device=cfg["device"], dtype=cfg["dtype"], seed=cfg["seed"], compile=False)
    model = GPT.from_checkpoint(src).to(rt.device).eval()
    bytes_before = state_dict_nbytes(model.state_dict())

    tokens, val_path = _val_tokens(src) if cfg["eval_iters"] else (None, None)
    seq_len = model.config.block_size
    if tokens is not None:
        seq_len = min(seq_len, len(tokens) - 1)
        if seq_len < 1:
            tokens = None
    if tokens is not None:
        rng = np.random.default_rng(cfg["seed"])
        starts = rng.integers(0, len(tokens) - seq_len, size=(cfg["eval_iters"], cfg["eval_batch_size"]))
        loss_before = _val_loss(model, tokens, starts, seq_len, rt.device, rt.autocast)

    skip = tuple(p for p in DEFAULT_SKIP if not (cfg["quantize_head"] and "lm_head" in p))
    info = quantize_model(model, cfg["mode"], skip, cfg["nf4_block"], cfg["double_quant"], cfg["tied_head"])
    info["bits_per_weight"] = bits_per_weight(model)
    info["source"] = path
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    bytes_after = state_dict_nbytes(sd)
    summary = {"mode": cfg["mode"], "bits_per_weight": round(info["bits_per_weight"], 4),
               "weights_bytes_before": bytes_before, "weights_bytes_after": bytes_after}
    if tokens is not None:
        loss_after = _val_loss(model, tokens, starts, seq_len, rt.device, rt.autocast)
        info.update(val_loss_before=loss_before, val_loss_after=loss_after)
        summary.update(val_loss_before=round(loss_before, 4), val_loss_after=round(loss_after, 4))

    out_ckpt = {"model_config": src["model_config"], "model": sd, "tokenizer": src["tokenizer"],
                "stage": src["stage"], "train_config": src.get("train_config", {}),
                "metrics": src.get("metrics", {}), "quantization": info}
    common.save_checkpoint(out_path, out_ckpt)
    file_before, file_after = os.path.getsize(path), os.path.getsize(out_path)
    summary.update(file_bytes_before=file_before, file_bytes_after=file_after)

    mb = lambda n: f"{n / 2**20:.2f} MB"
    kept = [n for n, m in model.named_modules() if type(m) in (nn.Embedding, nn.Linear)]
    tied = "".join(f" + {h} tied to {e}" for h, e in info.get("tied", {}).items())
    print(f"{len(info['modules'])} linear layers{tied} -> {cfg['mode']}, {info['bits_per_weight']:.3f} bits per "
          f"weight; kept in full precision: {', '.join(kept) or 'nothing'}")
    print(f"model weights:   {mb(bytes_before)} -> {mb(bytes_after)} ({bytes_before / bytes_after:.2f}x smaller)")
    note = " (the source also holds training state)" if "optimizer" in src else ""
    print(f"checkpoint file: {mb(file_before)} -> {mb(file_after)} ({file_before / file_after:.2f}x smaller){note}")
    if tokens is not None:
        print(f"val loss on {val_path} ({cfg['eval_iters']} x {cfg['eval_batch_size']} x {seq_len} tokens): "
              f"{loss_before:.4f} -> {loss_after:.4f} ({loss_after - loss_before:+.4f})")
    elif cfg["eval_iters"]:
        print(f"val loss: skipped, {val_path or 'the checkpoint names no data set'} not found")
    print(f"wrote {out_path}  (chat: python generate.py --ckpt={out_path})")
    print(json.dumps(summary))


if __name__ == "__main__":
    common.cli(main)
