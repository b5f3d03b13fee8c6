import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import quantize as Q
import common
import engine
from model import GPT, ModelConfig
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The NF4 table as printed in the QLoRA paper (appendix E) and shipped by bitsandbytes.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def naive_nf4(w, block_size):
    """Reference blockwise NF4, one block and one value at a time: nearest code by brute force."""
    flat = w.detach().float().reshape(-1).tolist()
    flat += [0.0] * ((-len(flat)) % block_size)
    codes, absmaxes = [], []
    for b in range(0, len(flat), block_size):
        block = flat[b:b + block_size]
        a = max(abs(v) for v in block)
        absmaxes.append(a)
        for v in block:
            x = torch.tensor(v / a if a > 0 else 0.0).item()
            codes.append(min(range(16), key=lambda k: (abs(x - PUBLISHED_NF4[k]), -k)))
    return torch.tensor(codes, dtype=torch.uint8), torch.tensor(absmaxes)


def test_nf4_code_is_the_published_table():
    # guards against a typo in the table: every weight would dequantize to a slightly wrong value
    assert Q.NF4_CODE.tolist() == torch.tensor(PUBLISHED_NF4).tolist()
    # and against a table that is not the NormalFloat construction (quantiles of N(0,1), exact zero, asymmetric)
    assert torch.allclose(Q.nf4_code_from_quantiles(), Q.NF4_CODE, atol=1e-6, rtol=0)
    assert (Q.NF4_CODE == 0).sum() == 1 and (Q.NF4_CODE[1:] > Q.NF4_CODE[:-1]).all()


def test_nf4_roundtrip_is_exact_for_code_points_times_absmax():
    # a value that is already representable must come back bit for bit (no off-by-one code, no scale drift)
    g = torch.Generator().manual_seed(0)
    bs, n_blocks = 64, 40
    absmax = torch.rand(n_blocks, generator=g) * 3 + 0.01
    codes = torch.randint(0, 16, (n_blocks, bs), generator=g, dtype=torch.uint8)
    codes[:, 5] = torch.where(torch.rand(n_blocks, generator=g) < 0.5, 0, 15).to(torch.uint8)  # block max is +-absmax
    w = Q.NF4_CODE[codes.long()] * absmax[:, None]
    packed, am = Q.quantize_nf4(w, bs)
    assert torch.equal(am, absmax)
    assert torch.equal(Q.unpack_4bit(packed), codes.view(-1))
    assert torch.equal(Q.dequantize_nf4(packed, am, w.numel(), bs), w.view(-1))


def test_nf4_encode_nearest_code_ties_go_up_and_out_of_range_clamps():
    code, mid = Q.NF4_CODE, Q.NF4_MIDPOINTS
    # every code point maps to itself
    assert torch.equal(Q.nf4_encode(code), torch.arange(16, dtype=torch.uint8))
    # exactly on a boundary -> upper code; one float step below -> lower code
    assert torch.equal(Q.nf4_encode(mid), torch.arange(1, 16, dtype=torch.uint8))
    below = torch.nextafter(mid, torch.full_like(mid, -2.0))
    assert torch.equal(Q.nf4_encode(below), torch.arange(0, 15, dtype=torch.uint8))
    # beyond [-1, 1] (never produced by absmax scaling, but by rounding or a caller's scale): clamp to the ends
    assert Q.nf4_encode(torch.tensor([1.5, 1e30, -1.0001, -7.0])).tolist() == [15, 15, 0, 0]
    # random values: same as brute-force nearest code
    x = torch.rand(4096, generator=torch.Generator().manual_seed(1)) * 2 - 1
    brute = (x[:, None] - code[None, :]).abs().argmin(dim=1)
    assert torch.equal(Q.nf4_encode(x).long(), brute)


def test_pack_unpack_roundtrip_and_nibble_order():
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(Q.pack_4bit(Q.unpack_4bit(every_byte)), every_byte)
    codes = torch.randint(0, 16, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(Q.unpack_4bit(Q.pack_4bit(codes)), codes)
    # first value in the high nibble: the layout the dequantization table assumes
    assert Q.pack_4bit(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x12, 0xF0]


def test_quantize_nf4_matches_naive_blockwise_reference_for_ragged_shape():
    # 37 x 100 = 3700 weights is not a multiple of 64: the last block is zero-padded and blocks straddle rows
    w = torch.randn(37, 100, generator=torch.Generator().manual_seed(3)) * 0.05
    packed, absmax = Q.quantize_nf4(w, 64)
    ref_codes, ref_absmax = naive_nf4(w, 64)
    assert packed.numel() == 58 * 32 and absmax.numel() == 58
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(Q.unpack_4bit(packed), ref_codes)
    deq = Q.dequantize_nf4(packed, absmax, w.numel(), 64).view(37, 100)
    # each weight is within half of the widest code gap (times its block's absmax) of the original
    blk_absmax = ref_absmax.repeat_interleave(64)[:3700].view(37, 100)
    max_gap = (Q.NF4_CODE[1:] - Q.NF4_CODE[:-1]).max()
    assert ((deq - w).abs() <= blk_absmax * max_gap / 2 + 1e-7).all()


def test_all_zero_weight_quantizes_to_zero_without_nan():
    lin = nn.Linear(64, 3, bias=False)
    nn.init.zeros_(lin.weight)
    m = Q.Linear4bit.from_linear(lin)
    assert torch.equal(m.dequantize(), torch.zeros(3, 64))
    q8, s8 = Q.quantize_int8(torch.zeros(2, 5))
    assert torch.equal(q8, torch.zeros(2, 5, dtype=torch.int8)) and not torch.isnan(s8).any()


def test_double_quant_absmax_error_within_half_an_8bit_step():
    g = torch.Generator().manual_seed(4)
    absmax = torch.exp(torch.randn(1000, generator=g)) * 0.02  # 1000 blocks: 4 groups of 256, the last one partial
    q, step, mean = Q.quantize_absmax(absmax, 256)
    assert q.dtype == torch.int8 and q.shape == (1000,) and step.shape == (4,)
    deq = Q.dequantize_absmax(q, step, mean, 256)
    err = (deq - absmax).abs()
    assert (err <= step.repeat_interleave(256)[:1000] / 2 * (1 + 1e-5) + 1e-9).all()
    assert torch.allclose(mean, absmax.mean())
    # the mean is subtracted first: the int8 values use both signs
    assert (q < 0).any() and (q > 0).any()


def test_bits_per_weight_nf4_double_quant_is_about_4_127():
    lin = nn.Linear(512, 512, bias=False)
    dq = Q.Linear4bit.from_linear(lin, double_quant=True)
    plain = Q.Linear4bit.from_linear(lin, double_quant=False)
    # 4 bits + 8/64 (int8 absmax) + 32/(64*256) (second-level step) + the mean
    assert abs(Q.bits_per_weight(nn.Sequential(dq)) - (4 + 8 / 64 + 32 / (64 * 256) + 32 / 512 ** 2)) < 1e-9
    assert abs(Q.bits_per_weight(nn.Sequential(dq)) - 4.127) < 0.001
    assert Q.bits_per_weight(nn.Sequential(plain)) == 4.5
    assert abs(Q.bits_per_weight(nn.Sequential(Q.Linear8bit.from_linear(lin))) - (8 + 32 / 512)) < 1e-9


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_forward_equals_dequantized_matmul_also_in_chunks(double_quant):
    torch.manual_seed(5)
    lin = nn.Linear(100, 37)  # ragged: blocks straddle rows, which the row chunking must handle
    m = Q.Linear4bit.from_linear(lin, double_quant=double_quant)
    x = torch.randn(2, 3, 100)
    w = m.dequantize()
    ref = x @ w.T + lin.bias.detach()
    assert torch.allclose(m(x), ref, atol=1e-5)
    full = m(x)
    m.chunk_elems = 250  # 2 rows per chunk: 19 chunks, the last one a single row
    assert len(m.row_chunks()) == 19
    assert torch.allclose(m(x), full, atol=1e-5)
    # row-range dequantization agrees with slicing the whole weight
    assert torch.equal(m.dequantize(torch.float32, 5, 9), w[5:9])
    # the quantization itself is close to the float weight (NF4 on uniform init: ~10% relative error)
    assert (w - lin.weight).norm() / lin.weight.norm() < 0.15


@pytest.mark.parametrize("chunk_elems", [1 << 24, 30])
def test_linear4bit_input_gradient_is_correct(chunk_elems):
    # QLoRA depends on this: adapters below a frozen 4-bit layer only learn through the input gradient
    torch.manual_seed(6)
    m = Q.Linear4bit.from_linear(nn.Linear(12, 10))
    m.chunk_elems = chunk_elems
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    x32 = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 10)
    m(x32).backward(g)
    assert torch.allclose(x32.grad, g @ m.dequantize(), atol=1e-5)
    assert all(not b.requires_grad for b in m.buffers())


def test_linear4bit_under_autocast_keeps_input_dtype_for_the_gradient():
    m = Q.Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.allclose(x.grad, m.dequantize().sum(0).expand(4, 64), atol=0.05, rtol=0.02)


def test_linear4bit_state_dict_holds_packed_data_and_reloads():
    lin = nn.Linear(64, 48)
    m = Q.Linear4bit.from_linear(lin)
    sd = m.state_dict()
    assert set(sd) == {"weight_packed", "absmax_q", "absmax_step", "absmax_mean", "bias"}
    assert sd["weight_packed"].dtype == torch.uint8 and sd["weight_packed"].numel() == 64 * 48 // 2
    shell = Q.Linear4bit(64, 48, bias=True)
    shell.load_state_dict(sd)
    x = torch.randn(5, 64)
    assert torch.equal(shell(x), m(x))


def test_int8_per_channel_error_within_half_step_and_forward():
    torch.manual_seed(7)
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight[3] *= 100  # an outlier row must not coarsen the other rows' scales
    m = Q.Linear8bit.from_linear(lin)
    assert m.weight.dtype == torch.int8
    err = (m.dequantize() - lin.weight).abs()
    assert (err <= m.scale[:, None] / 2 * (1 + 1e-5)).all()
    assert m.scale[3] > 50 * m.scale[4]
    x = torch.randn(6, 40, requires_grad=True)
    assert torch.allclose(m(x), x @ m.dequantize().T + lin.bias, atol=1e-5)
    m(x).sum().backward()
    assert torch.allclose(x.grad, m.dequantize().sum(0).expand(6, 40), atol=1e-5)



@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 37), (1, 1, 37), (3, 5, 37)])
def test_linear8bit_inference_reads_int8_weight_and_equals_dequantized_matmul(bias, shape, monkeypatch):
    # guards against the inference forward widening and scaling the whole weight on every call (0.12x fp32 decoding
    # on SmolLM2): without a gradient to x it must not call dequantize, and must still equal x W^T + b in fp32
    torch.manual_seed(3)
    m = Q.Linear8bit.from_linear(nn.Linear(37, 23, bias=bias))
    x = torch.randn(*shape)
    ref = torch.nn.functional.linear(x, m.dequantize(), m.bias)
    monkeypatch.setattr(Q.Linear8bit, "dequantize", lambda *a, **k: pytest.fail("inference dequantized the weight"))
    with torch.no_grad():
        y = m(x)
    assert y.shape == (*shape[:-1], 23) and y.dtype == torch.float32
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(m(x), ref, atol=1e-5, rtol=1e-5)  # grad enabled but x needs none: the same fast path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8pack_kernel_convention_matches_per_output_channel_scale(dtype):
    # the aten kernel takes the weight as (out, in) and one scale per output row in x's dtype: a transposed weight
    # or a per-input scale would give wrong outputs on the devices that use it (CUDA, bf16/fp16 on CPU)
    torch.manual_seed(4)
    m = Q.Linear8bit.from_linear(nn.Linear(64, 11, bias=False))  # the CPU bf16 kernel needs in_features % 16 == 0
    x = torch.randn(5, 64)
    y = Q._int8pack_mm(x.to(dtype), m.weight, m.scale.to(dtype))
    if y is None:
        pytest.skip(f"this PyTorch build has no CPU int8 weight-only kernel for {dtype}")
    ref = x.double() @ (m.weight.double() * m.scale.double()[:, None]).T
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and torch.allclose(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("in_features", [64, 37])
def test_linear8bit_bf16_model_forward_is_close_to_fp32(in_features):
    # 64 takes the kernel, 37 the widened path: the kernel crashes on rows that are not a multiple of 16
    torch.manual_seed(5)
    m = Q.Linear8bit.from_linear(nn.Linear(in_features, 48))
    x = torch.randn(2, 3, in_features)
    with torch.no_grad():
        ref = m(x)
        y = copy.deepcopy(m).to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, atol=3e-2 * ref.abs().max().item())


def test_lora_over_int8_base_trains_with_adapter_gradients_of_the_float_model():
    # LoRA training needs the input gradient through the frozen int8 base (the fast kernel has none): the adapters
    # of the first layer must get the same gradients as autograd through the dequantized float weights
    import lora
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    model = copy.deepcopy(float_model)
    Q.quantize_model(model, "int8", skip=())
    with torch.no_grad():
        for i in (0, 2):
            float_model[i].weight.copy_(model[i].dequantize())
    for m in (model, float_model):
        lora.apply_lora(m, r=4, alpha=8)
    with torch.no_grad():
        for (_, q), (_, f) in zip(lora.lora_layers(model), lora.lora_layers(float_model)):
            q.lora_B.copy_(torch.randn(q.lora_B.shape) * 0.1)
            f.lora_B.copy_(q.lora_B)
            f.lora_A.copy_(q.lora_A)
    x = torch.randn(8, 16)
    model(x).pow(2).mean().backward()
    float_model(x).pow(2).mean().backward()
    for (n, q), (_, f) in zip(lora.lora_layers(model), lora.lora_layers(float_model)):
        assert q.lora_A.grad is not None and q.lora_A.grad.abs().sum() > 0, n
        assert torch.allclose(q.lora_A.grad, f.lora_A.grad, atol=1e-6, rtol=1e-4), n
        assert torch.allclose(q.lora_B.grad, f.lora_B.grad, atol=1e-6, rtol=1e-4), n

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(50, 32)
        self.attn = nn.ModuleDict(dict(q=nn.Linear(32, 32, bias=False), o=nn.Linear(32, 32, bias=False)))
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, idx):
        h = self.wte(idx)
        h = h + self.attn["o"](self.attn["q"](h))
        return self.lm_head(h + self.mlp(h))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantize_model_replaces_linears_not_embeddings_or_head(mode):
    torch.manual_seed(8)
    model = Tiny()
    idx = torch.randint(0, 50, (2, 7))
    ref = model(idx)
    info = Q.quantize_model(model, mode=mode)
    cls = Q.Linear4bit if mode == "nf4" else Q.Linear8bit
    assert info["mode"] == mode and info["modules"] == ["attn.q", "attn.o", "mlp.0", "mlp.2"]
    assert all(isinstance(model.get_submodule(n), cls) for n in info["modules"])
    assert type(model.lm_head) is nn.Linear and type(model.wte) is nn.Embedding
    out = model(idx)
    assert torch.allclose(out, ref, atol=0.1 if mode == "nf4" else 0.01)
    with_head = Tiny()
    Q.quantize_model(with_head, mode=mode, skip=())  # the head only on request
    assert isinstance(with_head.lm_head, cls)


# ------------------------------------------------------------------------------------------------ checkpoints, CLI

def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    """A tiny SFT-stage checkpoint whose data set folder has a val.bin."""
    tmp = tmp_path_factory.mktemp("quant")
    words = "the river city number apple capital answer question small big one two three".split()
    g = np.random.default_rng(0)
    texts = [" ".join(g.choice(words, 10)) for _ in range(200)]
    tok = Tokenizer.train(texts, vocab_size=300)
    data = tmp / "data"
    data.mkdir()
    np.array([i for t in texts for i in tok.encode(t)], dtype=np.uint16).tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "dtype": "uint16"}))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = GPT(cfg)
    path = str(tmp / "sft" / "ckpt.pt")
    common.save_checkpoint(path, {"model_config": cfg.to_dict(), "model": model.state_dict(),
                                   "tokenizer": tok.to_json(), "stage": "sft",
                                   "train_config": {"dataset": str(data)}, "metrics": {"val_loss": 1.0}})
    return path, model


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_cli_writes_quantized_checkpoint_that_loads_and_chats(sft_ckpt, mode, tmp_path):
    path, model = sft_ckpt
    out = str(tmp_path / f"q_{mode}.pt")
    r = run("quantize.py", f"--ckpt={path}", f"--mode={mode}", f"--out={out}", "--eval_iters=2",
            "--eval_batch_size=2", "--device=cpu")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert "val loss on" in r.stdout and "model weights:" in r.stdout
    assert abs(summary["val_loss_after"] - summary["val_loss_before"]) < 0.05
    assert summary["weights_bytes_after"] < summary["weights_bytes_before"]
    ckpt = common.load_checkpoint(out, stages=common.POLICY_STAGES)  # weights_only load
    q = ckpt["quantization"]
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert q["mode"] == mode and ckpt["stage"] == "sft" and q["modules"] == [n for n in linears if n != "lm_head"]
    if mode == "nf4":
        assert q["block_size"] == 64 and q["double_quant"] is True
        assert ckpt["model"][q["modules"][0] + ".weight_packed"].dtype == torch.uint8
    else:  # the tied embedding/head is int8 by default, stored once under the embedding's name
        assert q["tied"] == {"lm_head": "embed_tokens"} and "lm_head.weight" not in ckpt["model"]
        assert ckpt["model"]["embed_tokens.weight"].dtype == torch.int8
        assert summary["weights_bytes_before"] / summary["weights_bytes_after"] > 3.3
    # rebuilt through the plumbing module, it computes what quantizing in memory computes
    loaded, _ = engine.model_from_checkpoint(ckpt, "cpu")
    expected = copy.deepcopy(model)
    quantize_info = Q.quantize_model(expected, mode)
    assert quantize_info["modules"] == q["modules"]
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    assert torch.allclose(loaded(idx)[0], expected.eval()(idx)[0], atol=1e-5)
    # and generate.py can answer with it
    r = run("generate.py", f"--ckpt={out}", "--prompt=the river", "--max_new_tokens=4", "--device=cpu")
    assert r.returncode == 0, r.stderr


def test_cli_tied_head_false_keeps_the_tied_embedding_and_head_in_full_precision(sft_ckpt, tmp_path):
    path, model = sft_ckpt
    out = str(tmp_path / "q.pt")
    r = run("quantize.py", f"--ckpt={path}", "--mode=int8", "--tied_head=False", f"--out={out}", "--eval_iters=0")
    assert r.returncode == 0, r.stderr
    assert "kept in full precision: embed_tokens, lm_head" in r.stdout
    ckpt = common.load_checkpoint(out, stages=common.POLICY_STAGES)
    assert ckpt["quantization"]["tied"] == {} and ckpt["model"]["embed_tokens.weight"].dtype == torch.float32
    loaded, _ = engine.model_from_checkpoint(ckpt, "cpu")
    assert type(loaded.lm_head) is nn.Linear and loaded.lm_head.weight is loaded.embed_tokens.weight


def test_cli_bad_input_gives_one_line_error(sft_ckpt, tmp_path):
    path, model = sft_ckpt
    r = run("quantize.py", f"--ckpt={path}", "--mode=int4")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "nf4 or int8" in r.stderr
    # the head is tied to the embedding in this model: quantizing it would untie them
    r = run("quantize.py", f"--ckpt={path}", "--quantize_head=True", f"--out={tmp_path / 'x.pt'}", "--eval_iters=0")
    assert r.returncode == 2 and "lm_head" in r.stderr and "Traceback" not in r.stderr


def quantized_entries(sft_ckpt, mode):
    """(the fp32 checkpoint, its model quantized in `mode` as a checkpoint, the quantization entry)."""
    path, model = sft_ckpt
    src = torch.load(path, weights_only=True)
    m = copy.deepcopy(model)
    info = Q.quantize_model(m, mode)
    return src, dict(src, model=m.state_dict(), quantization=info), info


def test_load_quantized_model_rejects_inconsistent_entries(sft_ckpt):
    src, good, info = quantized_entries(sft_ckpt, "nf4")
    assert isinstance(Q.load_quantized_model(good, "cpu").layers[0].attn.o_proj, Q.Linear4bit)
    with pytest.raises(common.UserError, match="quantization"):
        Q.load_quantized_model(dict(good, quantization={"mode": "nf3", "modules": []}), "cpu")
    with pytest.raises(common.UserError, match="not a linear layer"):
        Q.load_quantized_model(dict(good, quantization=dict(info, modules=["layers.0.attn_norm"])), "cpu")
    with pytest.raises(common.UserError, match="do not fit"):  # float weights under an nf4 entry
        Q.load_quantized_model(dict(good, model=src["model"]), "cpu")


# ------------------------------------------------------------------------------------------------ tied embedding/head

def tied_gpt(n_embd=64, vocab_size=96, seed=11):
    """A tiny tied GPT with O(1) random weights, so a wrong row, scale or transposition shows in the logits."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=n_embd)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0) if "norm" not in name else p.uniform_(0.5, 1.5)
    return m


def test_int8_quantizes_the_tied_embedding_and_head_as_one_matrix_with_per_row_scales():
    # the embedding's rows are the head's output channels: one absmax scale per row (hand-computed here) serves
    # both, and the two modules must read the very same int8 tensor (a copy would double the bytes and could drift)
    model = tied_gpt()
    w = model.embed_tokens.weight.detach().clone()
    info = Q.quantize_model(model, "int8")
    assert info["tied"] == {"lm_head": "embed_tokens"} and "lm_head" not in info["modules"]
    emb, head = model.embed_tokens, model.lm_head
    assert isinstance(emb, Q.Embedding8bit) and isinstance(head, Q.TiedLinear8bit)
    assert head.weight is emb.weight and head.scale is emb.scale and emb.weight.dtype == torch.int8
    scale = w.abs().amax(dim=1) / 127
    assert torch.equal(emb.scale, scale)
    assert torch.equal(emb.weight, torch.round(w / scale[:, None]).to(torch.int8))
    assert ((emb.dequantize() - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert [n for n, _ in model.named_buffers() if "embed_tokens" in n or "lm_head" in n] == \
        ["embed_tokens.weight", "embed_tokens.scale"]


def test_int8_embedding_output_equals_the_dequantized_rows():
    model = tied_gpt()
    Q.quantize_model(model, "int8")
    idx = torch.tensor([[0, 5, 95, 5], [7, 7, 1, 94]])
    out = model.embed_tokens(idx)
    assert out.shape == (2, 4, 64) and out.dtype == torch.float32
    assert torch.equal(out, model.embed_tokens.dequantize()[idx])


def test_int8_tied_head_logits_within_the_rounding_bound_and_close_to_fp32():
    # per output channel v the rounding moves a logit by at most ||h||_1 * scale_v / 2 for the same hidden state h
    # (a head with per-column scales, or reading the weight transposed, breaks this bound); end to end, with every
    # layer in int8 and O(1) weights, the logits stay within 6% of the fp32 model's in RMS (measured: 4.1%, and
    # 2.5% with the head in fp32; a wrong row or scale gives O(100%))
    model = tied_gpt()
    ref = copy.deepcopy(model)
    w = model.embed_tokens.weight.detach().clone()
    Q.quantize_model(model, "int8")
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.hidden_states(idx)                                   # (2, 12, 64)
        err = (model.lm_head(h) - h @ w.T).abs()
        bound = h.abs().sum(-1, keepdim=True) * model.embed_tokens.scale / 2
        assert (err <= bound * (1 + 1e-5) + 1e-5).all()
        assert err.max() > 0  # the head did quantize
        logits, want = model(idx)[0], ref(idx)[0]
    assert (logits - want).norm() <= 0.06 * want.norm()


def test_int8_tied_weight_is_stored_once_and_the_checkpoint_is_about_4x_smaller(tmp_path):
    model = tied_gpt(n_embd=128, vocab_size=512)
    fp32_bytes = Q.state_dict_nbytes(model.state_dict())
    cfg = model.config
    # hand count: every matrix as int8 plus one fp32 scale per row; the tied (V, d) matrix once; the norms in fp32
    rows = [(cfg.vocab_size, cfg.n_embd)]
    for _ in range(cfg.n_layer):
        qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        rows += [(qkv, cfg.n_embd), (cfg.n_embd, cfg.n_embd), (2 * cfg.ffn_hidden, cfg.n_embd),
                 (cfg.n_embd, cfg.ffn_hidden)]
    norms = (2 * cfg.n_layer + 1) * cfg.n_embd * 4
    want = sum(n * k + 4 * n for n, k in rows) + norms
    assert fp32_bytes == 4 * (sum(n * k for n, k in rows)) + norms
    Q.quantize_model(model, "int8")
    sd = model.state_dict()
    assert Q.state_dict_nbytes(sd) == want
    assert fp32_bytes / want > 3.6
    assert 7.99 < Q.bits_per_weight(model) < 8.0 + 32 / cfg.n_embd + 1e-6  # the tied matrix counted once
    ref = copy.deepcopy(tied_gpt(n_embd=128, vocab_size=512))
    torch.save(ref.state_dict(), tmp_path / "fp32.pt")
    torch.save(sd, tmp_path / "int8.pt")
    assert os.path.getsize(tmp_path / "fp32.pt") / os.path.getsize(tmp_path / "int8.pt") > 3.5


def test_int8_tied_checkpoint_save_load_gives_identical_logits_and_to_keeps_the_tie(tmp_path):
    model = tied_gpt()
    tok = Tokenizer.train(["a b c"] * 3, vocab_size=260)
    src = {"model_config": model.config.to_dict(), "tokenizer": tok.to_json(), "stage": "sft", "train_config": {},
           "metrics": {}}
    info = Q.quantize_model(model, "int8")
    path = str(tmp_path / "q.pt")
    common.save_checkpoint(path, dict(src, model=model.state_dict(), quantization=info))
    loaded, _ = engine.model_from_checkpoint(common.load_checkpoint(path, stages=common.POLICY_STAGES), "cpu")
    assert isinstance(loaded.lm_head, Q.TiedLinear8bit) and loaded.lm_head.weight is loaded.embed_tokens.weight
    idx = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
        # .to() replaces buffers module by module: the head must follow its embedding, not keep the old tensors
        half = copy.deepcopy(loaded).to(torch.bfloat16)
        assert half.lm_head.scale is half.embed_tokens.scale and half.lm_head.scale.dtype == torch.bfloat16
        want = model(idx)[0]
        assert (half(idx)[0].float() - want).norm() <= 0.05 * want.norm()  # bf16 rounding of every activation
        out = loaded.generate(idx[:1, :4], 6, temperature=0)  # the KV cache is float, not the embedding's int8
    assert out.shape == (1, 10)


def test_widened_matmul_in_row_blocks_equals_the_whole_weight(monkeypatch):
    # the head is widened block by block; a block boundary off by one would drop or repeat output channels
    torch.manual_seed(2)
    m = Q.Linear8bit.from_linear(nn.Linear(24, 101, bias=False))
    x = torch.randn(3, 24)
    with torch.no_grad():
        whole = m(x)
        monkeypatch.setattr(Q, "WIDEN_CHUNK_ELEMS", 24 * 10)  # 11 blocks, the last one short
        blocks = m(x)
    assert torch.allclose(blocks, whole, atol=1e-6, rtol=0)
    assert torch.allclose(whole, x @ m.dequantize().T, atol=1e-5)


def test_nf4_and_tied_head_false_keep_the_tied_embedding_and_head_in_full_precision():
    # QLoRA trains with the tied embedding/head in full precision (its gradient reaches the trunk through the
    # head): quantizing for it must not change, nor may int8 with tied_head=False
    import lora
    for mode, kw in (("nf4", {}), ("int8", {"tied_head": False})):
        model = tied_gpt()
        info = Q.quantize_model(model, mode, **kw)
        assert type(model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
        assert model.lm_head.weight is model.embed_tokens.weight and "lm_head" not in info["modules"]
        assert info.get("tied", {}) == {}
    model = tied_gpt()
    lora.setup_finetune(model, "qlora", r=4, alpha=8.0)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed_tokens.weight
    assert isinstance(model.layers[0].attn.qkv_proj.base, Q.Linear4bit)
    with pytest.raises(common.UserError, match="lm_head"):  # nf4 on a tied head cannot be asked for
        Q.quantize_model(tied_gpt(), "nf4", skip=())


def test_lora_refuses_the_int8_tied_head():
    # merging an adapter into it would untie the head from the embedding that stays int8
    import lora
    model = tied_gpt()
    Q.quantize_model(model, "int8")
    with pytest.raises(common.UserError, match="lm_head"):
        lora.apply_lora(model, r=4, alpha=8.0, include_head=True)


def test_merged_state_dict_of_an_int8_tied_model_is_a_plain_tied_fp32_state_dict():
    # what convert.py exports: both keys float, one tensor, equal to the dequantized rows; loads into a plain GPT
    import lora
    model = tied_gpt()
    Q.quantize_model(model, "int8")
    sd = lora.merged_state_dict(model)
    assert sd["embed_tokens.weight"] is sd["lm_head.weight"] and "embed_tokens.scale" not in sd
    assert torch.equal(sd["embed_tokens.weight"], model.embed_tokens.dequantize())
    plain = GPT(model.config)
    plain.load_state_dict(sd)
    idx = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(idx)[0], model(idx)[0], atol=1e-5)


def test_load_quantized_model_rejects_a_tied_entry_that_does_not_fit(sft_ckpt):
    src, good, info = quantized_entries(sft_ckpt, "int8")
    assert isinstance(Q.load_quantized_model(good, "cpu").embed_tokens, Q.Embedding8bit)
    with pytest.raises(common.UserError, match="not a head tied"):
        Q.load_quantized_model(dict(good, quantization=dict(info, tied={"layers.0.attn.o_proj": "embed_tokens"})),
                               "cpu")
    with pytest.raises(common.UserError, match="do not fit"):  # a tied int8 entry over fp32 weights
        Q.load_quantized_model(dict(good, model=src["model"]), "cpu")
    with pytest.raises(common.UserError, match="tied"):
        Q.load_quantized_model(dict(good, quantization=dict(info, tied=["lm_head"])), "cpu")
