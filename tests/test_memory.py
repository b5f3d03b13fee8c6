"""Training memory: activation checkpointing and the chunked cross entropy (GPT.grad_checkpoint, the stages'
--grad_checkpoint) must give the plain path's loss and gradients while keeping less for backward."""
import pytest
import torch

import common
import lora
import model
import trainer
from conftest import TINY_STAGE, ok, read_log, run_script
from model import GPT, ModelConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def small_ce_chunks(monkeypatch):
    # 5 positions per chunk of the 97-token vocabulary: the batch's 34 counted positions are 7 chunks, the last one
    # shorter
    monkeypatch.setattr(model, "CE_CHUNK_ELEMS", 97 * 5)


def tiny(**kw):
    base = dict(vocab_size=97, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)
    base.update(kw)
    return ModelConfig(**base)


def make(cfg, mode="full"):
    torch.manual_seed(0)
    m = GPT(cfg)
    with torch.no_grad():  # O(1) logits, so that a small error in a gradient is not hidden by tiny values
        for p in m.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    lora.setup_finetune(m, mode, r=4, alpha=8.0, dropout=0.2 if mode != "full" else 0.0)
    if mode != "full":
        with torch.no_grad():  # B starts at 0, which would give A no gradient to compare
            for _, layer in lora.lora_layers(m):
                layer.lora_B.normal_(0.0, 0.3)
    return m.train()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (2, 24), generator=g)
    loss_mask = torch.ones(2, 23, dtype=torch.long)
    loss_mask[0, 19:] = 0  # padding
    loss_mask[1, :8] = 0   # a prompt that is not learned (the last chunk, row 1's last token, counts)
    return x[:, :-1], x[:, 1:], loss_mask


def loss_and_grads(m, checkpointed, seed=5):
    m.grad_checkpoint = checkpointed
    m.zero_grad(set_to_none=True)
    x, y, loss_mask = batch()
    torch.manual_seed(seed)  # the dropout masks
    logits, loss = m(x, y, loss_mask=loss_mask)
    assert logits is None  # with targets the head runs on the counted positions only: no (B, T, V) logits
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


CASES = {
    "dense": (tiny(), "full"),
    "untied": (tiny(tie_embeddings=False), "full"),
    "moe": (tiny(n_experts=4, n_experts_per_tok=2, n_shared_experts=1, moe_aux_coef=0.1), "full"),
    "dropout": (tiny(dropout=0.2), "full"),
    "moe_dropout": (tiny(n_experts=4, n_experts_per_tok=2, dropout=0.2, moe_aux_coef=0.1), "full"),
    "lora": (tiny(dropout=0.1), "lora"),
    "qlora": (tiny(dropout=0.1), "qlora"),
    "qlora_moe": (tiny(n_experts=4, n_experts_per_tok=2, moe_aux_coef=0.1), "qlora"),
}


@pytest.mark.parametrize("name", CASES)
def test_checkpointed_blocks_and_chunked_cross_entropy_give_the_plain_loss_and_every_gradient(name):
    """A recompute that drew other dropout masks (no preserved RNG state), lost the MoE balancing loss's gradient,
    dropped a chunk of the cross entropy or counted the last, shorter chunk twice, or cut the gradient through
    QLoRA's frozen NF4 linears, each gives another loss or another gradient here."""
    cfg, mode = CASES[name]
    m = make(cfg, mode)
    want_loss, want = loss_and_grads(m, checkpointed=False)
    got_loss, got = loss_and_grads(m, checkpointed=True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6 * want[n].abs().max().item(),
                                   msg=lambda s, n=n: f"{name}: {n}: {s}")
    if cfg.dropout:  # the masks matter: another seed gives other gradients, so equal ones mean equal masks
        _, other = loss_and_grads(m, checkpointed=True, seed=6)
        assert any(not torch.allclose(other[n], want[n]) for n in want)


def test_moe_balancing_loss_is_the_same_under_checkpointing():
    m = make(tiny(n_experts=4, n_experts_per_tok=1, moe_aux_coef=0.1))
    x = batch()[0]
    _, plain = m.hidden_states(x, return_aux=True)
    m.grad_checkpoint = True
    _, ckpt = m.hidden_states(x, return_aux=True)
    assert plain.item() > 0.1  # coef x at least 1: it is there
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=0)
    assert ckpt.requires_grad  # it still trains the routers
    (router_grad,) = torch.autograd.grad(ckpt, m.layers[0].mlp.router.weight)
    assert router_grad.abs().sum() > 0


def saved_bytes(m, checkpointed):
    """Bytes of the tensors autograd keeps for backward in one training forward, and the largest of them."""
    m.grad_checkpoint = checkpointed
    x, y, loss_mask = batch()
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x, y, loss_mask=loss_mask)
    return sum(sizes), max(sizes)


def test_checkpointing_keeps_only_block_inputs_and_no_full_logits():
    """The memory path must really be taken: with it, what autograd saves shrinks, and nothing of the size of the
    counted positions' logits is kept (a chunk of them is recomputed in backward)."""
    m = make(tiny(n_layer=4))
    plain_total, plain_max = saved_bytes(m, False)
    ckpt_total, ckpt_max = saved_bytes(m, True)
    logits_bytes = int(batch()[2].sum()) * 97 * 4  # the head runs on the counted positions only
    assert plain_max >= logits_bytes  # the plain path keeps their logits (or their log-softmax)
    assert ckpt_max < logits_bytes
    assert ckpt_total < plain_total / 3


def test_eval_mode_and_no_grad_give_the_loss_of_the_plain_path():
    """grad_checkpoint changes how a training forward with grad computes, never what: with no grad or in eval mode
    the loss is the plain path's; without targets the forward still returns the logits."""
    m = make(tiny())
    m.grad_checkpoint = True
    x, y, loss_mask = batch()
    with torch.no_grad():
        logits, loss = m(x, y, loss_mask=loss_mask)
    assert logits is None
    m.eval()
    loss_eval = m(x, y, loss_mask=loss_mask)[1]
    m.grad_checkpoint = False
    torch.testing.assert_close(loss_eval, m(x, y, loss_mask=loss_mask)[1])
    # without targets the forward returns logits (DPO and PPO score them) and its blocks are checkpointed
    m.train()
    m.grad_checkpoint = True
    logits, aux = m(x)
    assert logits.shape == (2, 23, 97) and logits.requires_grad


def test_grad_checkpoint_is_not_part_of_the_model_config_and_may_change_on_resume():
    m = make(tiny())
    m.grad_checkpoint = True
    assert "grad_checkpoint" not in m.config.to_dict()  # a checkpoint's model_config does not carry it
    saved = {"grad_checkpoint": False, "learning_rate": 1e-3}
    trainer.check_resume_config(saved, {"grad_checkpoint": True, "learning_rate": 1e-3}, "out")
    with pytest.raises(common.UserError, match="--learning_rate"):  # the check itself still bites
        trainer.check_resume_config(saved, {"grad_checkpoint": True, "learning_rate": 2e-3}, "out")


# ------------------------------------------------------------------------------------------------ stage runs

def test_sft_with_grad_checkpoint_trains_as_without_and_resumes_with_it_switched_off(world_data, pretrained,
                                                                                     tmp_path):
    shared = [f"--dataset={world_data}", f"--init_from={pretrained}", *TINY_STAGE, "--batch_size=8",
              "--eval_prompts=0", "--eval_samples=0", "--n_samples=0", "--eval_interval=2", "--lr_decay_iters=4",
              "--finetune=lora", "--lora_dropout=0.1"]
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    ok(run_script("sft.py", *shared, f"--out_dir={plain}", "--max_iters=4"))
    ok(run_script("sft.py", *shared, f"--out_dir={ckpt}", "--max_iters=2", "--grad_checkpoint=True"))
    assert common.load_checkpoint(str(ckpt), stages=("sft",))["train_config"]["grad_checkpoint"] is True
    ok(run_script("sft.py", *shared, f"--out_dir={ckpt}", "--max_iters=4", "--resume=True",
                  "--grad_checkpoint=False"))
    losses = {out: [r["train_loss"] for r in read_log(out) if "train_loss" in r] for out in (plain, ckpt)}
    assert len(losses[plain]) == 4
    assert losses[ckpt] == pytest.approx(losses[plain], rel=1e-5)
    saved = common.load_checkpoint(str(ckpt), stages=("sft",))
    assert "grad_checkpoint" not in saved["model_config"]
    assert saved["train_config"]["grad_checkpoint"] is False  # the resumed run's own setting


def test_dpo_with_grad_checkpoint_gives_the_plain_first_step(world_data, sft_ckpt, tmp_path):
    shared = [f"--dataset={world_data}", f"--init_from={sft_ckpt}", *TINY_STAGE, "--batch_size=8",
              "--eval_prompts=0", "--eval_samples=0", "--n_samples=0", "--max_iters=2", "--eval_interval=2",
              "--eval_iters=1"]
    ok(run_script("dpo.py", *shared, f"--out_dir={tmp_path / 'plain'}"))
    ok(run_script("dpo.py", *shared, f"--out_dir={tmp_path / 'ckpt'}", "--grad_checkpoint=True"))
    a, b = ([r for r in read_log(tmp_path / d) if "train_loss" in r] for d in ("plain", "ckpt"))
    assert len(a) == 2
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
