import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import common
import engine
import prepare
import trainer
import evaluation
from model import GPT, ModelConfig
from tokenizer import Tokenizer



# ------------------------------------------------------------------------------------------------ config

def fake_stage(**extra):
    g = {"__file__": "/x/stage.py", "__doc__": "a stage", "dataset": "world", "max_iters": 100,
         "learning_rate": 1e-3, "resume": False, "betas": (0.9, 0.95), "MAX": 5, "_private": 1, "np": np}
    g.update(extra)
    return g


def test_configure_applies_typed_overrides_in_place():
    g = fake_stage()
    cfg = common.configure(g, ["--max_iters=7", "--learning_rate=1", "--resume=True", "--dataset=data/mine",
                                "--betas=(0.8, 0.9)"])
    assert cfg == {"dataset": "data/mine", "max_iters": 7, "learning_rate": 1.0, "resume": True,
                   "betas": (0.8, 0.9)}
    assert g["max_iters"] == 7 and type(g["learning_rate"]) is float  # the int 1 became the float 1.0
    # bool spellings, a bare --flag, quoted and unquoted strings, numbers-looking strings stay strings
    for arg, want in [("--resume=False", False), ("--resume=true", True), ("--resume", True)]:
        assert common.configure(fake_stage(), [arg])["resume"] is want
    assert common.configure(fake_stage(), ["--dataset='q'"])["dataset"] == "q"
    assert common.configure(fake_stage(), ["--dataset=123"])["dataset"] == "123"
    assert common.configure(fake_stage(), ["--learning_rate=3e-4"])["learning_rate"] == 3e-4
    # ALL_CAPS, _private and modules are not settings
    assert set(common.configure(fake_stage(), [])) == {"dataset", "max_iters", "learning_rate", "resume", "betas"}


@pytest.mark.parametrize("arg,named", [
    ("--max_itres=5", "max_itres"),               # typo: unknown key
    ("--MAX=3", "MAX"),                           # constants are not settings
    ("--max_iters=1.5", "max_iters"),             # float for an int
    ("--max_iters=True", "max_iters"),            # bool is not an int
    ("--resume=1", "resume"),                     # 1 is not a bool
    ("--learning_rate=fast", "learning_rate"),    # text for a float
    ("--max_iters", "max_iters"),                 # a value is needed for a non-bool
    ("config/does_not_exist.py", "does_not_exist"),
])
def test_configure_errors_name_the_key(arg, named):
    with pytest.raises(common.UserError, match=named):
        common.configure(fake_stage(), [arg])


def test_preset_files_apply_in_order_and_are_checked(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("max_iters = 50\nlearning_rate = 2 * 1e-3  # expressions are fine\n")
    cfg = common.configure(fake_stage(), [str(preset), "--max_iters=9"])
    assert cfg["max_iters"] == 9 and cfg["learning_rate"] == 2e-3   # a later --key wins
    cfg = common.configure(fake_stage(), ["--max_iters=9", str(preset)])
    assert cfg["max_iters"] == 50                                     # a later preset wins
    bad = tmp_path / "bad.py"
    bad.write_text("max_iters = 50\nwarmup = 3\n")
    with pytest.raises(common.UserError, match=r"bad\.py.*warmup"):
        common.configure(fake_stage(), [str(bad)])
    broken = tmp_path / "broken.py"
    broken.write_text("max_iters = 50\nlearning_rate = = 3\n")
    with pytest.raises(common.UserError, match=r"broken\.py, line 2"):
        common.configure(fake_stage(), [str(broken)])
    wrong_type = tmp_path / "wrong.py"
    wrong_type.write_text("dataset = 3\n")
    with pytest.raises(common.UserError, match=r"wrong\.py.*dataset"):
        common.configure(fake_stage(), [str(wrong_type)])


def test_help_lists_the_settings_and_exits(capsys):
    with pytest.raises(SystemExit) as e:
        common.configure(fake_stage(), ["--max_iters=3", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("a stage") and "--max_iters=3" in out and "--betas=(0.9, 0.95)" in out


def test_cli_prints_one_line_error_and_exits_2(capsys):
    def main():
        raise common.UserError("--foo: bad\nsecond line")
    with pytest.raises(SystemExit) as e:
        common.cli(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --foo: bad second line\n"


# ------------------------------------------------------------------------------------------------ optimizer, schedule

def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert trainer.lr_at(0, cfg) == pytest.approx(0.1)        # (0+1)/10 of the peak, not 0: step 0 moves
    assert trainer.lr_at(4, cfg) == pytest.approx(0.5)
    assert trainer.lr_at(9, cfg) == pytest.approx(1.0)        # warmup ends at the peak
    assert trainer.lr_at(10, cfg) == pytest.approx(1.0)
    assert trainer.lr_at(60, cfg) == pytest.approx(0.55)      # halfway through the cosine: the mean of peak and min
    assert trainer.lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert trainer.lr_at(110, cfg) == pytest.approx(0.1)
    assert trainer.lr_at(190, cfg) == pytest.approx(0.1)      # stays at min after the decay
    lrs = [trainer.lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # lr_decay_iters=0 means "decay over the whole run"; no warmup starts at the peak
    cfg.update(lr_decay_iters=0, warmup_iters=0)
    assert trainer.lr_at(0, cfg) == 1.0 and trainer.lr_at(100, cfg) == pytest.approx(0.55)
    assert trainer.lr_at(200, cfg) == pytest.approx(0.1)


def test_min_lr_zero_means_a_tenth_of_the_learning_rate_in_every_stage():
    # it meant learning_rate / 10 in sft.py and dpo.py but learning_rate itself in ppo.py
    cfg = dict(learning_rate=4e-3, min_lr=0.0, warmup_iters=0, lr_decay_iters=0, max_iters=100)
    assert trainer.lr_at(100, cfg) == pytest.approx(4e-4)
    assert trainer.lr_at(50, cfg) == pytest.approx((4e-3 + 4e-4) / 2)
    for stage in ("pretrain", "sft", "dpo", "reward_model", "ppo"):
        with open(os.path.join(os.path.dirname(trainer.__file__), f"{stage}.py"), encoding="utf-8") as f:
            source = f.read()
        line = next(line for line in source.splitlines() if line.startswith("min_lr ="))
        assert "0 = learning_rate / 10" in line, f"{stage}.py documents min_lr otherwise: {line.strip()}"
        assert 'cfg["min_lr"] =' not in source, f"{stage}.py gives min_lr its own meaning"


def tiny_gpt(dropout=0.0, seed=0, vocab=64, block=32):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                           dropout=dropout, tie_embeddings=True))


def test_weight_decay_groups_cover_trainable_params_once():
    model = tiny_gpt()
    frozen = model.layers[0].attn.o_proj.weight
    frozen.requires_grad_(False)  # frozen (as under LoRA): not optimized at all
    opt = trainer.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 1}
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len(set(in_opt)), "the tied embedding/head must appear once"
    assert id(frozen) not in in_opt
    assert set(in_opt) == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(common.UserError, match="no trainable"):
        trainer.make_optimizer(torch.nn.Linear(2, 2).requires_grad_(False), 1e-3, 0.1, (0.9, 0.95), "cpu")


# ------------------------------------------------------------------------------------------------ the loop

DATA = np.random.default_rng(0).integers(0, 64, 4000)
DATA[1::2] = (DATA[::2] * 7 + 3) % 64  # every second token follows from the one before: learnable


def loop_cfg(out_dir, **kw):
    cfg = dict(out_dir=str(out_dir), max_iters=8, batch_size=4, grad_accum=2, learning_rate=3e-3, min_lr=3e-4,
               warmup_iters=2, lr_decay_iters=0, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
               eval_interval=4, eval_iters=2, log_interval=1, resume=False)
    cfg.update(kw)
    return cfg


def get_batch(split, k, batch_size=4, T=16):
    rng = np.random.default_rng([0, split == "val", k])
    ix = rng.integers(0, len(DATA) - T - 1, batch_size)
    x = torch.from_numpy(np.stack([DATA[i:i + T] for i in ix]))
    y = torch.from_numpy(np.stack([DATA[i + 1:i + 1 + T] for i in ix]))
    return x, y


def count_tokens(batch):
    return {"tokens": batch[1].numel()}


def lm_loss(model, batch, totals):
    _, loss = model(*batch)
    return loss * (batch[1].numel() / totals["tokens"]), {"first_token_loss": loss.detach() * 0 + 1.0}


def run_loop(cfg, model=None, resume_from=None, batches=get_batch, loss_fn=lm_loss, seed=0, dropout=0.1,
             count=count_tokens):
    rt = common.setup("cpu", seed=seed, compile=False)
    model = model or tiny_gpt(dropout=dropout, seed=seed)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
    entries = lambda: {"model_config": model.config.to_dict(), "model": model.state_dict(), "tokenizer": "{}"}  # noqa
    metrics = trainer.train(model, loss_fn, batches, cfg, rt, stage="pretrain", checkpoint_entries=entries,
                            count=count, resume_from=resume_from, evaluate=lambda m, met: {"ppl": math.exp(met["val_loss"])})
    return model, metrics


def read_log(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["step"]: r["train_loss"] for r in read_log(out_dir) if "train_loss" in r}


def test_tiny_run_lowers_the_loss_and_writes_log_plot_checkpoints(tmp_path):
    cfg = loop_cfg(tmp_path, max_iters=40, eval_interval=20, learning_rate=1e-2, min_lr=1e-3)
    model, metrics = run_loop(cfg, dropout=0.0)
    log = read_log(tmp_path)
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    assert metrics["val_loss"] == evals[-1]["val_loss"]
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert "first_token_loss" in metrics and "train_first_token_loss" in log[1]  # loss_fn metrics are averaged
    assert all({"lr", "grad_norm", "tok_per_s", "tokens"} <= set(r) for r in log if "train_loss" in r)
    assert [r["tokens"] for r in log if "train_loss" in r][:2] == [2 * 4 * 16, 4 * 4 * 16]
    with open(tmp_path / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and ckpt["stage"] == "pretrain" and ckpt["metrics"]["val_loss"] == metrics["val_loss"]
    assert ckpt["train_config"]["max_iters"] == 40 and "optimizer" in ckpt and "rng" in ckpt
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["metrics"]["val_loss"] == min(r["val_loss"] for r in evals) and "optimizer" not in best
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


class Interrupt:
    """get_batch that delivers a real SIGINT to this process while micro-batch k_stop is being fetched."""

    def __init__(self, k_stop):
        self.k_stop = k_stop

    def __call__(self, split, k):
        if split == "train" and k == self.k_stop:
            signal.raise_signal(signal.SIGINT)
        return get_batch(split, k)


def test_ctrl_c_then_resume_matches_an_uninterrupted_run_exactly(tmp_path):
    # dropout > 0: the run draws from the torch RNG every step, so the RNG state must be restored too
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_model, full_metrics = run_loop(loop_cfg(full_dir))
    with pytest.raises(SystemExit) as e:
        run_loop(loop_cfg(cut_dir), batches=Interrupt(k_stop=5))  # during step 3 (k = 4, 5)
    assert e.value.code == 130
    ckpt = common.load_checkpoint(str(cut_dir / "ckpt.pt"), stages=("pretrain",))
    assert ckpt["step"] == 3, "the step in progress is finished, then saved"
    assert ckpt["data_position"]["next_k"] == 6
    cfg = loop_cfg(cut_dir, resume=True)
    model, metrics = run_loop(cfg, resume_from=trainer.resume_checkpoint(cfg, "pretrain"))
    assert train_losses(cut_dir) == train_losses(full_dir)  # every step's loss, bit for bit
    assert metrics == full_metrics
    for (n, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    # the log was continued, not duplicated
    assert [r["step"] for r in read_log(cut_dir)] == [r["step"] for r in read_log(full_dir)]


def test_resume_after_a_crash_restarts_from_the_last_eval_checkpoint(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    run_loop(loop_cfg(full_dir))

    def crash(split, k):
        if split == "train" and k == 12:  # step 7, after the checkpoint of step 4
            raise RuntimeError("power cut")
        return get_batch(split, k)
    with pytest.raises(RuntimeError):
        run_loop(loop_cfg(cut_dir), batches=crash)
    assert max(train_losses(cut_dir)) == 6  # steps 5 and 6 were logged, but are not in the checkpoint
    cfg = loop_cfg(cut_dir, resume=True)
    ckpt = trainer.resume_checkpoint(cfg, "pretrain")
    assert ckpt["step"] == 4
    run_loop(cfg, resume_from=ckpt)
    assert train_losses(cut_dir) == train_losses(full_dir)
    assert [r["step"] for r in read_log(cut_dir)] == [r["step"] for r in read_log(full_dir)]


def test_resume_needs_an_existing_checkpoint(tmp_path):
    with pytest.raises(common.UserError, match="resume"):
        trainer.resume_checkpoint(loop_cfg(tmp_path, resume=True), "pretrain")
    assert trainer.resume_checkpoint(loop_cfg(tmp_path, resume=False), "pretrain") is None


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    def nan_at_step_6(model, batch, totals):
        loss, extra = lm_loss(model, batch, totals)
        nan_at_step_6.calls += 1
        return (loss * float("nan") if nan_at_step_6.calls > 5 * 2 + 2 else loss), extra  # 2 micro-batches a step
    nan_at_step_6.calls = 0
    cfg = loop_cfg(tmp_path, eval_iters=1)  # eval at 0 and 4 use 1 val batch each: 2 calls
    with pytest.raises(common.UserError, match=r"loss is nan at step 6.*diverged.*ckpt\.pt") as e:
        run_loop(cfg, loss_fn=nan_at_step_6)
    assert "\n" not in str(e.value)
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    # 2 micro-batches of 4 must give the update of 1 batch of 8 (the loss is averaged, not summed)
    def big_batch(split, k):
        a, b = get_batch(split, 2 * k), get_batch(split, 2 * k + 1)
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
    m1, _ = run_loop(loop_cfg(tmp_path / "a", max_iters=2, eval_iters=1), dropout=0.0)
    m2, _ = run_loop(loop_cfg(tmp_path / "b", max_iters=2, eval_iters=1, grad_accum=1, batch_size=8),
                     batches=big_batch, dropout=0.0)
    for step in (1, 2):  # same loss and same gradient (a sum instead of a mean would double its norm)
        a, b = read_log(tmp_path / "a")[step], read_log(tmp_path / "b")[step]
        assert a["step"] == b["step"] == step
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        # Adam divides by sqrt(v): float rounding of near-zero gradients moves a few weights by ~1e-6
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def masked_batch(split, k, batch_size=4, T=16):
    """An SFT-like batch: each row counts only its last `length` targets, lengths unequal (1..T)."""
    x, y = get_batch(split, k, batch_size, T)
    lengths = torch.as_tensor(np.random.default_rng([7, split == "val", k]).integers(1, T + 1, batch_size))
    return x, y, (torch.arange(T)[None] >= T - lengths[:, None]).long()


def count_answer_tokens(batch):
    return {"tokens": batch[2].sum()}


def masked_loss(model, batch, totals):
    x, y, mask = batch
    _, loss = model(x, y, loss_mask=mask)
    return loss * (mask.sum() / totals["tokens"]), {}


def test_grad_accumulation_weights_micro_batches_by_their_counted_tokens(tmp_path):
    # a mean over masked tokens averaged per micro-batch, then again over micro-batches, gave a micro-batch with
    # few answer tokens the weight of one with many: 4 x 2 trained another loss than 8 x 1 of the same rows
    def big_batch(split, k):
        a, b = masked_batch(split, 2 * k), masked_batch(split, 2 * k + 1)
        return tuple(torch.cat([u, v]) for u, v in zip(a, b))
    kw = dict(max_iters=2, eval_iters=1, grad_clip=0.0)
    run = lambda out, batches, **cfg: run_loop(loop_cfg(tmp_path / out, **{**kw, **cfg}), batches=batches,  # noqa
                                               loss_fn=masked_loss, count=count_answer_tokens, dropout=0.0)
    m1, _ = run("a", masked_batch)
    m2, _ = run("b", big_batch, grad_accum=1, batch_size=8)
    # by hand: the first step's loss is the mean over all 8 rows' counted tokens under the initial model
    x, y, mask = big_batch("train", 0)
    model0 = tiny_gpt(seed=0)
    nll = torch.nn.functional.cross_entropy(model0(x)[0].transpose(1, 2), y, reduction="none")
    want = ((nll * mask).sum() / mask.sum()).item()
    halves = [((nll[i] * mask[i]).sum() / mask[i].sum()).item() for i in (slice(0, 4), slice(4, 8))]
    assert abs(sum(halves) / 2 - want) > 5e-4, "the rows' answer lengths must differ enough to tell"
    for out in ("a", "b"):
        assert read_log(tmp_path / out)[1]["train_loss"] == pytest.approx(want, rel=1e-6)
    for step in (1, 2):
        a, b = read_log(tmp_path / "a")[step], read_log(tmp_path / "b")[step]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    # the validation loss is weighted the same way over its batches
    vx, vy, vmask = (torch.cat([u, v]) for u, v in zip(masked_batch("val", 0), masked_batch("val", 1)))
    vnll = torch.nn.functional.cross_entropy(model0(vx)[0].transpose(1, 2), vy, reduction="none")
    run("c", masked_batch, eval_iters=2, max_iters=1)
    assert read_log(tmp_path / "c")[0]["val_loss"] == pytest.approx(((vnll * vmask).sum() / vmask.sum()).item(),
                                                                    rel=1e-6)


def test_config_errors_are_user_errors(tmp_path):
    with pytest.raises(common.UserError, match="grad_accum.*multiple of the number of processes"):
        trainer.check_train_config(loop_cfg(tmp_path, grad_accum=3), world_size=2)
    # fewer micro-batches than processes is not an error: each process then takes one per step
    trainer.check_train_config(loop_cfg(tmp_path, grad_accum=1), world_size=2)
    with pytest.raises(common.UserError, match="min_lr"):
        trainer.check_train_config(loop_cfg(tmp_path, min_lr=1.0))


# ------------------------------------------------------------------------------------------------ checkpoints

def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"step": 1, "w": torch.ones(1000)})
    real_save = torch.save

    def half_save(obj, f, *a, **kw):  # writes part of the file, then the process "dies"
        real_save(obj, f, *a, **kw)
        f.truncate(100)
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        common.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    assert os.listdir(tmp_path) == ["ckpt.pt"], "no temp file left behind"


def test_crash_while_the_loop_saves_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def failing_second_save(obj, f, *a, **kw):
        calls.append(obj["step"])
        if obj["step"] == 4:
            real_save(obj, f, *a, **kw)
            f.truncate(1000)
            raise KeyboardInterrupt  # e.g. a second Ctrl-C in the middle of the write
        real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", failing_second_save)
    with pytest.raises(KeyboardInterrupt):
        run_loop(loop_cfg(tmp_path))
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert calls[-1] == 4 and ckpt["step"] == 0


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    common.save_checkpoint(str(tmp_path / "r.pt"), {"rng": common.rng_state()})
    want = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random(), random.gauss(0, 1))
    common.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random(), random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the cat sat on the mat 12 34", "你好 世界"] * 20, vocab_size=300)


def write_ckpt(path, tok, stage, **extra):
    model = tiny_gpt(vocab=tok.vocab_size)
    obj = {**trainer.model_entries(model, tok), "stage": stage, "train_config": {}, "metrics": {}, **extra}
    common.save_checkpoint(str(path), obj)
    return model


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such checkpoint"),
    ("garbage", "not a readable checkpoint"),
    ("pickled", "not a readable checkpoint"),    # needs pickle to load: refused, never executed
    ("not_ours", "not a checkpoint of this project"),
    ("reward_as_policy", "a reward model checkpoint cannot be used as a policy"),
    ("policy_as_reward", "is a policy, not a reward model"),
    ("wrong_stage", "a pretraining checkpoint cannot be used here"),
])
def test_load_checkpoint_errors_are_one_line_and_name_the_file(tmp_path, tok, kind, message):
    path = tmp_path / f"{kind}.pt"
    stages = common.POLICY_STAGES
    if kind == "garbage":
        path.write_bytes(b"\x00not a zip" * 50)
    elif kind == "pickled":
        torch.save({"stage": "sft", "obj": Interrupt(3)}, path)
    elif kind == "not_ours":
        torch.save({"weights": torch.zeros(2)}, path)
    elif kind == "reward_as_policy":
        write_ckpt(path, tok, "reward")
    elif kind == "policy_as_reward":
        write_ckpt(path, tok, "sft")
        stages = ("reward",)
    elif kind == "wrong_stage":
        write_ckpt(path, tok, "pretrain")
        stages = ("sft", "dpo")
    with pytest.raises(common.UserError) as e:
        common.load_checkpoint(str(path), stages=stages)
    msg = str(e.value)
    assert message in msg and str(path) in msg and "\n" not in msg, msg


def test_model_from_checkpoint_rebuilds_model_and_tokenizer(tmp_path, tok):
    model = write_ckpt(tmp_path / "ckpt.pt", tok, "sft")
    ckpt = common.load_checkpoint(str(tmp_path), stages=("sft",))  # a folder means its ckpt.pt
    loaded, tok2 = engine.model_from_checkpoint(ckpt, "cpu")
    assert tok2.to_json() == tok.to_json() and not loaded.training
    idx = torch.tensor([tok.encode("the cat")])
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)


def test_model_from_checkpoint_builds_quantized_models_through_quantize(tmp_path, tok):
    import quantize
    model = tiny_gpt(vocab=tok.vocab_size)
    entries = trainer.model_entries(model, tok)
    q = quantize.quantize_model(model, mode="int8")
    ckpt = {**entries, "model": model.state_dict(), "quantization": q, "stage": "sft"}
    loaded, _ = engine.model_from_checkpoint(ckpt, "cpu")
    assert any(isinstance(m, quantize.Linear8bit) for m in loaded.modules())
    idx = torch.tensor([tok.encode("the mat")])
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0])


def test_check_tokenizer_matches(tmp_path, tok):
    data = tmp_path / "data" / "mine"
    data.mkdir(parents=True)
    tok.save(str(data / "tokenizer.json"))
    ckpt = {"tokenizer": tok.to_json()}
    prepare.check_tokenizer_matches(ckpt, str(data))
    other = Tokenizer.train(["completely different text 99"] * 20, vocab_size=280)
    with pytest.raises(common.UserError, match="tokenizer differs"):
        prepare.check_tokenizer_matches({"tokenizer": other.to_json()}, str(data))
    with pytest.raises(common.UserError, match="prepare"):
        prepare.check_tokenizer_matches(ckpt, str(tmp_path / "nothing"))


def test_model_entries_merges_lora(tok):
    import lora
    model = tiny_gpt(vocab=tok.vocab_size)
    lora.apply_lora(model, r=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    entries = trainer.model_entries(model, tok)
    plain = GPT(ModelConfig.from_dict(entries["model_config"]))
    plain.load_state_dict(entries["model"])  # strict: no adapter keys left
    idx = torch.tensor([tok.encode("the cat sat")])
    torch.testing.assert_close(plain.eval()(idx)[0], model.eval()(idx)[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ exact match

PROMPTS = [  # (question, answer, task, lang, what the oracle model replies)
    ("What is 37 + 48?", "85", "add", "en", "37 + 48 = 85"),
    ("计算37加48。", "85", "add", "zh", "37 + 48 = 86"),                          # wrong
    ("Where does Anna Wang live?", "Shanghai", "fact", "en", "Anna Wang lives in Shanghai."),
    ("王安娜住在哪里？", "上海", "fact", "zh", "王安娜住在上海。"),
    ("Sort from smallest to largest: 42 7 19", "7 19 42", "sort", "en", "7 42 19"),  # wrong
    ("Tell me a story.", None, "open", "en", "Once upon a time"),              # no answer: not scored
    ("Write 47 in words.", "forty-seven", "numword", "en", "forty-seven"),
]


def write_prompts(folder, tok):
    folder.mkdir(parents=True, exist_ok=True)
    msgs = [[{"role": "user", "content": q}] for q, *_ in PROMPTS]
    seqs = [tok.render_prompt(m) for m in msgs]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    np.savez(folder / "prompts_val.npz", ids=np.concatenate(seqs).astype(np.int32), offsets=offsets)
    with open(folder / "prompts_val.jsonl", "w", encoding="utf-8") as f:
        for m, (_, answer, task, lang, _) in zip(msgs, PROMPTS):
            row = {"messages": m, "answer": answer, "task": task, "lang": lang}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return seqs


class Oracle(torch.nn.Module):
    """A stand-in model whose generate() replies from a table keyed by the unpadded prompt, then ends the turn
    and pads, exactly like GPT.generate does."""

    def __init__(self, tok, replies):
        super().__init__()
        self.tok, self.replies = tok, replies
        self.config = ModelConfig(vocab_size=tok.vocab_size, block_size=128)

    def generate(self, idx, max_new_tokens, temperature, stop_tokens, attention_mask, pad_id, **sampling):
        assert temperature == 0 and self.tok.end_id in stop_tokens and not self.training
        rows = []
        for r in range(idx.shape[0]):
            prompt = tuple(idx[r][attention_mask[r].bool()].tolist())  # left padding stripped
            new = self.tok.encode(self.replies[prompt]) + [self.tok.end_id]
            rows.append((new + [pad_id] * max_new_tokens)[:max_new_tokens])
        return torch.cat([idx, torch.tensor(rows, dtype=torch.long)], dim=1)


def test_exact_match_scores_with_world_check_answer_per_task_and_language(tmp_path, tok):
    seqs = write_prompts(tmp_path / "d", tok)
    model = Oracle(tok, {tuple(s): p[4] for s, p in zip(seqs, PROMPTS)})
    model.train()
    r = evaluation.evaluate_exact_match(model, tok, str(tmp_path / "d"), "cpu", max_new_tokens=40, batch_size=4,
                                     n_samples=10)
    assert model.training, "the model's mode is restored"
    assert r["exact_match_n"] == 6 and r["exact_match"] == pytest.approx(4 / 6)
    assert r["exact_match_by_task"] == {"add": 0.5, "fact": 1.0, "numword": 1.0, "sort": 0.0}
    assert r["exact_match_by_lang"] == {"en": 0.75, "zh": 0.5}
    scored = [p for p in PROMPTS if p[1] is not None]
    assert [s[1:] for s in r["samples"]] == [[p[4], p[1], ok] for p, ok in zip(scored, [1, 0, 1, 1, 0, 1])]
    assert r["samples"][0][0] == "What is 37 + 48?"  # the prompt, special tokens left out
    r = evaluation.evaluate_exact_match(model, tok, str(tmp_path / "d"), "cpu", max_prompts=2, max_new_tokens=40)
    assert r["exact_match_n"] == 2 and r["exact_match"] == 0.5


def test_exact_match_batched_generation_equals_one_prompt_at_a_time(tmp_path, tok):
    # left padding must not change a greedy answer: the same responses with batch_size 1 and 4
    write_prompts(tmp_path / "d", tok)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                            tie_embeddings=False))
    with torch.no_grad():  # a sharp head that never picks a special token, so there are answers to compare
        model.lm_head.weight.normal_()
        model.lm_head.weight[sorted(tok.special_ids)] = 0.0
    one = evaluation.evaluate_exact_match(model, tok, str(tmp_path / "d"), "cpu", max_new_tokens=12, batch_size=1,
                                       n_samples=10)
    four = evaluation.evaluate_exact_match(model, tok, str(tmp_path / "d"), "cpu", max_new_tokens=12, batch_size=4,
                                        n_samples=10)
    assert [s[1] for s in one["samples"]] == [s[1] for s in four["samples"]]
    assert all(len(s[1]) > 5 for s in one["samples"]) and len({s[1] for s in one["samples"]}) > 1


def test_shuffled_batches_cover_every_item_once_per_epoch():
    n, bs = 10, 4
    batches = [trainer.shuffled_batch(n, bs, k, seed=3) for k in range(5)]  # 20 items = 2 epochs
    flat = np.concatenate(batches)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert list(flat[:10]) != list(flat[10:]), "each epoch is shuffled afresh"
    assert all(np.array_equal(b, trainer.shuffled_batch(n, bs, k, seed=3)) for k, b in enumerate(batches))
    assert not np.array_equal(flat, np.concatenate([trainer.shuffled_batch(n, bs, k, seed=4) for k in range(5)]))
    assert [list(trainer.ordered_batch(n, bs, k)) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert trainer.ordered_batch(n, bs, 3) is None


def test_reply_metrics_count_right_and_clean_replies_per_language_and_task():
    """Hand-made replies: clean, wrong-language and pleasantry replies in both languages (a wrong reply can be clean
    and a right one flawed), greedy and k = 4 samples; every rate computed by hand."""
    rows = [{"answer": "85", "task": "add", "lang": "en"}, {"answer": "上海", "task": "fact", "lang": "zh"},
            {"answer": "Shanghai", "task": "fact", "lang": "en"}, {"answer": "85", "task": "add", "lang": "zh"}]
    greedy = ["37 + 48 = 85",                    # right, clean
              "Anna Wang lives in Shanghai.",    # a zh question answered in English: wrong and not clean
              "Anna Wang lives in Beijing.",     # wrong but clean
              "37 + 48 = 85"]                    # digits belong to both languages: right, clean
    # right / clean samples: 2 / 2, 2 / 3, 4 / 4, 2 / 4
    sampled = [["37 + 48 = 85", "37 + 48 = 85 Hope this helps!", "37加48等于85。", "37 + 48 = 86"],
               ["王安娜住在上海。", "王安娜住在上海。", "王安娜住在上海。希望对你有帮助！", "王安娜住在北京。"],
               ["Anna Wang lives in Shanghai."] * 4,
               ["37 + 48 = 85", "37 + 48 = 85", "37 + 48 = 86", "37 + 48 = 86"]]
    m, verdicts = evaluation.reply_metrics(rows, greedy, sampled)
    assert [(v["right"], v["clean"], v["sampled_right"], v["sampled_clean"]) for v in verdicts] == \
        [(1, 1, 2, 2), (0, 0, 2, 3), (0, 1, 4, 4), (1, 1, 2, 4)]
    assert (m["exact_match"], m["exact_match_by_lang"], m["exact_match_by_task"]) == \
        (0.5, {"en": 0.5, "zh": 0.5}, {"add": 1.0, "fact": 0.0})
    assert (m["clean_rate"], m["clean_rate_by_lang"], m["clean_rate_by_task"]) == \
        (0.75, {"en": 1.0, "zh": 0.5}, {"add": 1.0, "fact": 0.5})
    # sampled: the mean over prompts of each prompt's share of right (clean) samples
    assert (m["exact_match_sampled"], m["exact_match_sampled_by_lang"], m["exact_match_sampled_by_task"]) == \
        (0.625, {"en": 0.75, "zh": 0.5}, {"add": 0.5, "fact": 0.75})
    assert (m["clean_rate_sampled"], m["clean_rate_sampled_by_lang"], m["clean_rate_sampled_by_task"]) == \
        (0.8125, {"en": 0.75, "zh": 0.875}, {"add": 0.75, "fact": 0.875})
    assert m["eval_samples"] == 4
    greedy_only, _ = evaluation.reply_metrics(rows, greedy)
    assert "exact_match_sampled" not in greedy_only and greedy_only["clean_rate"] == 0.75


def test_sampled_evaluation_is_reproducible_runs_at_the_final_step_only_and_writes_per_prompt_verdicts(tmp_path,
                                                                                                       tok):
    write_prompts(tmp_path / "d", tok)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    rt = common.setup("cpu", "auto", 0, False)
    out = tmp_path / "out"
    ev = evaluation.ExactMatchEval(str(tmp_path / "d"), tok, rt, 640, 12, eval_samples=3, final_step=10,
                                out_dir=str(out), seed=5)
    mid = ev(model, {"step": 5})
    assert "exact_match_sampled" not in mid and "clean_rate" in mid      # not the final evaluation: greedy only
    lines = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert [v["id"] for v in lines] == [0, 1, 2, 3, 4, 6]                # prompt 5 has no answer: not scored
    assert all("sampled_right" not in v for v in lines)
    final = ev(model, {"step": 10})
    again = ev(model, {"step": 10})
    assert final == again, "the sampled evaluation is seeded: the same model gives the same figures"
    assert final["eval_samples"] == 3 and {"exact_match_sampled", "clean_rate_sampled_by_task"} <= set(final)
    lines = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert all(0 <= v["sampled_right"] <= 3 and 0 <= v["sampled_clean"] <= 3 for v in lines)
    assert final["exact_match_sampled"] == pytest.approx(sum(v["sampled_right"] for v in lines) / (3 * len(lines)))
    assert final["clean_rate"] == pytest.approx(sum(v["clean"] for v in lines) / len(lines))
