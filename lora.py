"""
Homemade LoRA (Hu et al. 2021), no peft: chosen linear layers get a trainable low-rank update,

    y = W x + (alpha / r) * B (A (dropout(x)))      A: (r, in) kaiming-uniform, B: (out, r) zeros

so the wrapped model computes exactly the base model until B moves. Everything else is frozen. The base may be an
nn.Linear or a frozen quantize.Linear4bit / Linear8bit (QLoRA: NF4 base, full-precision adapters).

    import lora
    lora.apply_lora(model, r=8, alpha=16)            # wraps attention + MLP linears, freezes the rest
    lora.print_trainable_parameters(model)           # default GPT: "trainable 133,120 of 4,985,088 (2.67%)"
    ... train ...
    ckpt["model"] = lora.merged_state_dict(model)    # plain full-precision GPT state dict, adapters folded in
    lora.save_adapter(model, "checkpoints/sft/adapter.pt")
    with lora.disable_adapters(model): ...           # the frozen base, e.g. as DPO/PPO reference model
"""
import math
import os
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import quantize
from common import UserError, save_checkpoint
from quantize import QuantLinear

# Regexes on module names (re.search). None means every linear layer except those matching EXCLUDE, i.e. all the
# projections in attention and MLP. The output head is wrapped only with include_head=True. model.py fuses q/k/v
# (qkv_proj) and gate/up (gate_up_proj): one adapter then covers the fused output, its A shared by q, k and v.
DEFAULT_TARGETS = None
HEAD_PATTERN = r"(^|\.)lm_head$"
EXCLUDE = (r"(^|\.)router$",)  # MoE routers: tiny, and adapting the routing logits is not what LoRA is for


class LoRALinear(nn.Module):
    def __init__(self, base, r=8, alpha=16.0, dropout=0.0):
        super().__init__()
        assert r > 0, "LoRA rank must be positive"
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # adapters live in the base's float dtype (fp32 for a quantized base) on the base's device
        float_base = isinstance(base, nn.Linear)
        device = base.weight.device if float_base else next(base.buffers()).device
        dtype = base.weight.dtype if float_base else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        # the nn.Linear default init: uniform with bound 1/sqrt(in); B = 0 makes the initial update exactly zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False    # the update is folded into the base weight
        self.disabled = False  # the update is skipped (disable_adapters)
        self._quantized_base = None  # the original quantized module while merged onto a dequantized copy

    def delta_weight(self):
        """(out, in) float32: the update the adapter adds to W."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x):
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight. A quantized base is dequantized into a full-precision nn.Linear (a
        4-bit grid cannot hold W + BA); the quantized module is kept aside so unmerge restores it exactly."""
        if self.merged:
            return
        if isinstance(self.base, QuantLinear):
            q = self.base
            merged = nn.Linear(self.in_features, self.out_features, bias=q.bias is not None, device=self.lora_A.device)
            merged.weight.copy_(q.dequantize(torch.float32) + self.delta_weight())
            if q.bias is not None:
                merged.bias.copy_(q.bias)
            merged.requires_grad_(False)
            object.__setattr__(self, "_quantized_base", q)  # not registered: no duplicate keys in state_dict
            self.base = merged
        else:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): subtract the update again (exact up to float rounding), or bring back the quantized base."""
        if not self.merged:
            return
        if self._quantized_base is not None:
            self.base = self._quantized_base.to(self.lora_A.device)
            object.__setattr__(self, "_quantized_base", None)
        else:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def merged_weight(self):
        """(weight, bias) of a plain full-precision linear equivalent to this layer; the layer is not modified."""
        base = self.base
        bias = base.bias.detach().clone() if base.bias is not None else None
        if self.merged:  # base is an nn.Linear that already holds W + BA
            return base.weight.detach().clone(), bias
        if isinstance(base, QuantLinear):
            return base.dequantize(torch.float32) + self.delta_weight(), bias
        w = base.weight.detach()
        return (w.float() + self.delta_weight()).to(w.dtype), bias

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _is_linear(m):
    return type(m) is nn.Linear or isinstance(m, QuantLinear)


def lora_layers(model):
    """[(name, LoRALinear)] in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, r=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, include_head=False):
    """Wrap the chosen linear layers of `model` in place and freeze everything but the adapters. `targets`: regexes
    matched (re.search) against module names, or None for every linear except the output head and MoE routers.
    Returns the list of wrapped module names. Unfreeze extra parameters (a reward head) after calling this."""
    if lora_layers(model):
        raise UserError("lora: the model already has LoRA adapters")
    if r <= 0 or alpha <= 0:
        raise UserError(f"lora: lora_r and lora_alpha must be positive (got r={r}, alpha={alpha})")
    names = []
    for name, m in model.named_modules():
        if not _is_linear(m):
            continue
        is_head = re.search(HEAD_PATTERN, name) is not None
        if is_head:  # the head only with include_head, and then only if the targets (if any) name it too
            chosen = include_head and (targets is None or any(re.search(p, name) for p in targets))
        elif targets is None:
            chosen = not any(re.search(p, name) for p in EXCLUDE)
        else:
            chosen = any(re.search(p, name) for p in targets)
        if chosen:
            names.append(name)
    if not names:
        raise UserError(f"lora: no linear layer matches targets={targets!r}")
    for name in names:
        m = model.get_submodule(name)
        tied = isinstance(m, quantize.TiedLinear8bit) or isinstance(m, nn.Linear) and any(
            p is m.weight for n, p in model.named_parameters(remove_duplicate=False) if n != name + ".weight")
        if tied:
            # merging into a tied head would silently change the token embedding too (an int8 one: untie them)
            raise UserError(f"lora: {name} shares its weight with the token embedding (tie_embeddings); "
                              f"it cannot carry a LoRA adapter, leave include_head off")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        # keep the model's train/eval mode: a fresh module is in training mode and its dropout would be active
        setattr(parent, child, LoRALinear(base, r, alpha, dropout).train(base.training))
    return names


def count_parameters(model):
    """(trainable, total). A quantized linear counts as its in*out weights, as if it were the float layer."""
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
                 for m in model.modules() if isinstance(m, QuantLinear))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def trainable_line(model):
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


def print_trainable_parameters(model):
    line = trainable_line(model)
    print(line)
    return line


FINETUNE_MODES = ("full", "lora", "qlora")


def setup_finetune(model, mode, r=8, alpha=16.0, dropout=0.0, include_head=False):
    """Make `model` train the way a fine-tuning stage asks (its `finetune` setting), in place:
    full   every parameter trains;
    lora   adapters on the full-precision linears, everything else frozen;
    qlora  the linears become frozen NF4 (quantize.quantize_model: output head and MoE routers stay in full
           precision), then adapters on top: the base costs ~4.13 bits per weight and gradients reach A and B only.
    Returns the trainable-parameter line ("trainable x of y (z%)")."""
    if mode not in FINETUNE_MODES:
        raise UserError(f"--finetune must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")
    if mode == "qlora":
        quantize.quantize_model(model, "nf4")
    if mode in ("lora", "qlora"):
        apply_lora(model, r, alpha, dropout, include_head=include_head)
    return trainable_line(model)


def merge_lora(model):
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model):
    for _, m in lora_layers(model):
        m.unmerge()
    return model


@contextmanager
def disable_adapters(model):
    """Within the block the model computes its frozen base (e.g. the DPO/PPO reference) without a second copy."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise RuntimeError("disable_adapters: unmerge the adapters first (merged weights cannot be switched off)")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


def merged_state_dict(model):
    """The state dict of the plain model this one is equivalent to: each LoRA layer (and any other quantized linear or
    embedding) becomes `name.weight` (+ `name.bias`) in full precision with the update folded in. The model is not
    modified; this is what a LoRA/QLoRA run saves as its checkpoint's `model`."""
    sd = model.state_dict()
    out = {}
    replaced = {}
    dequantized = {}  # an int8 embedding and the head tied to it share one weight: one float tensor for both, too
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            replaced[name] = m.merged_weight()
        elif (isinstance(m, (QuantLinear, quantize.Embedding8bit))
              and not any(name.startswith(p + ".") for p in replaced)):
            key = id(getattr(m, "weight", m))
            if key not in dequantized:
                dequantized[key] = m.dequantize(torch.float32)
            bias = getattr(m, "bias", None)
            replaced[name] = (dequantized[key], bias.detach().clone() if bias is not None else None)
    for k, v in sd.items():
        if not any(k.startswith(p + ".") for p in replaced):
            out[k] = v
    for name, (w, b) in replaced.items():
        out[name + ".weight"] = w
        if b is not None:
            out[name + ".bias"] = b
    return out


def lora_state_dict(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def lora_config(model):
    layers = lora_layers(model)
    if not layers:
        raise UserError("lora: the model has no LoRA adapters")
    m = layers[0][1]
    dropout = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
    return {"r": m.r, "alpha": m.alpha, "dropout": dropout, "modules": [n for n, _ in layers]}


def save_adapter(model, path, extra=None):
    """Write only the adapters (small): {"lora_config": {r, alpha, dropout, modules}, "adapter": tensors, **extra}.
    Written atomically by common.save_checkpoint; loads with torch.load(weights_only=True)."""
    obj = {"lora_config": lora_config(model), "adapter": lora_state_dict(model)}
    for k, v in (extra or {}).items():
        assert k not in obj, f"save_adapter: extra key {k!r} is reserved"
        obj[k] = v
    save_checkpoint(path, obj)


def load_adapter(model, src):
    """Load an adapter (a path or the dict save_adapter wrote) into `model`. A model without adapters gets them
    first, on exactly the saved modules, with the saved r/alpha/dropout. Returns the model."""
    if isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise UserError(f"lora: adapter file {src} does not exist")
        src = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(src, dict) or "lora_config" not in src or "adapter" not in src:
        raise UserError("lora: not a LoRA adapter file (needs 'lora_config' and 'adapter')")
    cfg = src["lora_config"]
    if not lora_layers(model):
        missing = [n for n in cfg["modules"] if not _has_linear(model, n)]
        if missing:
            raise UserError(f"lora: the adapter targets {missing[0]!r}, which is not a linear layer of this model")
        apply_lora(model, cfg["r"], cfg["alpha"], cfg["dropout"],
                   targets=[f"^{re.escape(n)}$" for n in cfg["modules"]], include_head=True)
    have = lora_state_dict(model)
    if set(have) != set(src["adapter"]):
        extra = sorted(set(src["adapter"]) ^ set(have))
        raise UserError(f"lora: adapter keys do not match the model's adapters (e.g. {extra[0]!r})")
    for k, v in src["adapter"].items():
        if v.shape != have[k].shape:
            raise UserError(f"lora: adapter {k} has shape {tuple(v.shape)}, the model expects {tuple(have[k].shape)}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in src["adapter"].items():
            params[k].copy_(v)
    return model


def _has_linear(model, name):
    try:
        return _is_linear(model.get_submodule(name))
    except AttributeError:
        return False
