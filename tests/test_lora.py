import copy
import math

import pytest
import torch
import torch.nn as nn

import lora
import quantize as Q
from model import GPT, ModelConfig


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))


def tiny_gpt(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg))


def block_linears(model):
    """The linear layers inside the transformer blocks (attention and MLP), whatever model.py names them."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("layers.")]
    assert all(".attn." in n or ".mlp." in n for n in names)
    return names


def randomize_adapters(model, seed=1):
    # B starts at zero, which would make merge/unmerge/save tests pass trivially
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("quantized", [False, True])
def test_init_output_equals_base_and_init_scheme(quantized):
    model = mlp()
    if quantized:
        Q.quantize_model(model, "nf4", skip=())
    x = torch.randn(5, 16)
    ref = model(x)
    names = lora.apply_lora(model, r=4, alpha=8)
    assert names == ["0", "2", "4"]
    assert torch.equal(model(x), ref)  # B = 0: bit-identical, not just close
    for _, m in lora.lora_layers(model):
        assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B))
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.5 * bound
        assert m.scaling == 2.0


def test_forward_is_base_plus_scaled_low_rank_update():
    model = mlp()
    lora.apply_lora(model, r=4, alpha=12, targets=[r"^2$"])
    randomize_adapters(model)
    layer = model[2]
    h = torch.randn(3, 32)
    expected = layer.base(h) + (12 / 4) * (h @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(h), expected, atol=1e-6)


@pytest.mark.parametrize("qmode", [None, "nf4", "int8"])
def test_merged_equals_unmerged_output_and_unmerge_restores(qmode):
    quantized = qmode is not None
    model = mlp()
    if quantized:
        Q.quantize_model(model, qmode, skip=())
    lora.apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    x = torch.randn(5, 16)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    y = model(x)
    lora.merge_lora(model)
    if quantized:  # a 4-bit (or int8) grid cannot hold W + BA: merged layers are full-precision linears
        assert all(type(m.base) is nn.Linear for _, m in lora.lora_layers(model))
    assert torch.allclose(model(x), y, atol=1e-5)
    lora.unmerge_lora(model)
    after_sd = model.state_dict()
    assert set(after_sd) == set(before_sd)
    for k in before_sd:
        if quantized:  # the original packed module comes back untouched
            assert torch.equal(after_sd[k], before_sd[k]), k
        else:
            assert torch.allclose(after_sd[k], before_sd[k], atol=1e-6), k
    assert torch.allclose(model(x), y, atol=1e-5)


def test_adapter_save_load_roundtrip(tmp_path):
    model = mlp()
    lora.apply_lora(model, r=4, alpha=8, dropout=0.1, targets=[r"^0$", r"^4$"])
    randomize_adapters(model)
    model.eval()
    x = torch.randn(5, 16)
    y = model(x)
    path = str(tmp_path / "adapter.pt")
    lora.save_adapter(model, path, extra={"stage": "sft"})
    obj = torch.load(path, weights_only=True)
    assert obj["lora_config"] == {"r": 4, "alpha": 8, "dropout": 0.1, "modules": ["0", "4"]}
    assert set(obj["adapter"]) == {"0.lora_A", "0.lora_B", "4.lora_A", "4.lora_B"}  # the adapters alone
    assert obj["stage"] == "sft"
    fresh = mlp().eval()  # same base weights (same seed), no adapters yet
    lora.load_adapter(fresh, path)
    assert [n for n, _ in lora.lora_layers(fresh)] == ["0", "4"]
    assert torch.equal(fresh(x), y)
    # loading into a model that already has the same adapters also works (e.g. resume)
    other = mlp()
    lora.apply_lora(other, r=4, alpha=8, targets=[r"^0$", r"^4$"])
    lora.load_adapter(other, obj)
    assert torch.equal(other.eval()(x), y)


def _adam_step(model, gpt):
    # every parameter goes to the optimizer (with weight decay) so a frozen one that got a gradient would move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if gpt:
        idx = torch.randint(0, 64, (2, 12))
        loss = model(idx[:, :-1], targets=idx[:, 1:])[1]
    else:
        loss = model(torch.randn(8, 16)).pow(2).mean()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("gpt", [False, True])
def test_training_step_changes_only_adapters(quantized, gpt):
    model = tiny_gpt() if gpt else mlp()
    if quantized:  # QLoRA
        Q.quantize_model(model, "nf4", skip=() if not gpt else Q.DEFAULT_SKIP)
    lora.apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _adam_step(model, gpt)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if k.endswith((".lora_A", ".lora_B"))}
    assert changed == adapters  # every adapter moved (the first layer's too: grads flow through the frozen base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters


def test_qlora_adapter_gradients_match_dequantized_float_model():
    # the 4-bit layers' custom backward must give the same adapter gradients as autograd through the float weights
    model = mlp()
    Q.quantize_model(model, "nf4", skip=())
    lora.apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    ref = mlp()
    lora.apply_lora(ref, r=4, alpha=8)
    with torch.no_grad():
        for (_, q), (_, f) in zip(lora.lora_layers(model), lora.lora_layers(ref)):
            f.base.weight.copy_(q.base.dequantize())
            f.base.bias.copy_(q.base.bias)
            f.lora_A.copy_(q.lora_A)
            f.lora_B.copy_(q.lora_B)
    x = torch.randn(8, 16)
    model(x).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    for (n, q), (_, f) in zip(lora.lora_layers(model), lora.lora_layers(ref)):
        assert torch.allclose(q.lora_A.grad, f.lora_A.grad, atol=1e-6, rtol=1e-4), n
        assert torch.allclose(q.lora_B.grad, f.lora_B.grad, atol=1e-6, rtol=1e-4), n


def test_disable_adapters_gives_the_base_and_restores():
    model = mlp()
    base = copy.deepcopy(model)
    lora.apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    x = torch.randn(5, 16)
    y = model(x)
    assert not torch.allclose(y, base(x))
    with lora.disable_adapters(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), y)
    lora.merge_lora(model)
    with pytest.raises(RuntimeError):  # merged weights cannot be switched off: refuse rather than return the policy
        with lora.disable_adapters(model):
            pass


def test_trainable_parameter_count_line(capsys):
    model = mlp()
    total = sum(p.numel() for p in model.parameters())
    lora.apply_lora(model, r=2, alpha=4)
    n_adapter = 2 * (16 + 32) + 2 * (32 + 32) + 2 * (32 + 8)
    line = lora.print_trainable_parameters(model)
    assert line == f"trainable {n_adapter:,} of {total + n_adapter:,} ({100 * n_adapter / (total + n_adapter):.2f}%)"
    assert line in capsys.readouterr().out
    # a 4-bit base counts as the weights it stands for, not its packed bytes
    qmodel = mlp()
    Q.quantize_model(qmodel, "nf4", skip=())
    lora.apply_lora(qmodel, r=2, alpha=4)
    assert lora.count_parameters(qmodel) == (n_adapter, total + n_adapter)


@pytest.mark.parametrize("quantized", [False, True])
def test_gpt_default_targets_and_merged_state_dict_loads_into_plain_gpt(quantized):
    model = tiny_gpt()
    plain_ref = tiny_gpt()
    if quantized:
        info = Q.quantize_model(model, "nf4")
        assert "lm_head" not in info["modules"]
    names = lora.apply_lora(model, r=4, alpha=8)
    # every attention and MLP projection, never the (tied) head
    assert names == block_linears(plain_ref) and len(names) >= 2 * 2
    randomize_adapters(model)
    model.eval()
    idx = torch.randint(0, 64, (2, 12))
    logits, _ = model(idx)
    sd = lora.merged_state_dict(model)
    assert set(sd) == set(plain_ref.state_dict())  # a plain GPT checkpoint: no base./lora_ keys, no packed buffers
    plain_ref.load_state_dict(sd)
    assert torch.allclose(plain_ref.eval()(idx)[0], logits, atol=1e-4)
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_moe_router_excluded_and_targets_by_pattern():
    model = tiny_gpt(n_experts=4, n_experts_per_tok=2)
    names = lora.apply_lora(model, r=2, alpha=2, targets=[r"\.attn\.o_proj$"])
    assert names == ["layers.0.attn.o_proj", "layers.1.attn.o_proj"]
    model = tiny_gpt(n_experts=4, n_experts_per_tok=2)
    routers = [n for n in block_linears(model) if n.endswith("router")]
    names = lora.apply_lora(model)
    assert len(routers) == 2 and not set(routers) & set(names)
    assert any(".experts." in n for n in names)


def test_head_lora_only_when_untied():
    import common
    # merging into a head tied to the embedding would silently change the input embedding too
    with pytest.raises(common.UserError, match="lm_head"):
        lora.apply_lora(tiny_gpt(), include_head=True)
    untied = tiny_gpt(tie_embeddings=False)
    expected = block_linears(untied) + ["lm_head"]
    assert lora.apply_lora(untied, include_head=True) == expected


def test_bad_adapter_or_targets_give_user_errors(tmp_path):
    import common
    model = mlp()
    lora.apply_lora(model, r=4, alpha=8)
    path = str(tmp_path / "a.pt")
    lora.save_adapter(model, path)
    other_rank = mlp()
    lora.apply_lora(other_rank, r=2, alpha=8)
    with pytest.raises(common.UserError, match="shape"):
        lora.load_adapter(other_rank, path)
    with pytest.raises(common.UserError, match="not a linear layer"):
        lora.load_adapter(nn.Sequential(nn.Linear(16, 32)), path)
    with pytest.raises(common.UserError, match="no linear layer matches"):
        lora.apply_lora(mlp(), targets=[r"q_proj"])
    with pytest.raises(common.UserError, match="not a LoRA adapter"):
        lora.load_adapter(mlp(), {"model": {}})
