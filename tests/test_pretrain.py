import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import engine
import prepare
import trainer
from model import GPT, ModelConfig
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a model small enough that a step takes milliseconds; dropout > 0 so that resuming must restore the RNG too
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--sample_tokens=16", "--warmup_iters=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "world"
    r = subprocess.run([sys.executable, "prepare.py", f"--dataset={out}", "--world_mb=0.1", "--vocab_size=384"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    return str(out)


# one thread: these models are too small to gain from two, and the machine's cores are shared
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_pretrain(data, out, *args, launcher=(sys.executable,)):
    cmd = [*launcher, "pretrain.py", f"--dataset={data}", f"--out_dir={out}", *TINY, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def main_in_process(monkeypatch, capsys, data, out, *args):
    """pretrain.py's main() in this process (no interpreter start-up), with fresh constants; returns its stdout."""
    import pretrain
    monkeypatch.setattr(sys, "argv", ["pretrain.py", f"--dataset={data}", f"--out_dir={out}", *TINY, *args])
    importlib.reload(pretrain)
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ENV does for the subprocesses
    try:
        pretrain.main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def log(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out):
    return {r["step"]: r["train_loss"] for r in log(out) if "train_loss" in r}


def test_tiny_pretraining_lowers_the_loss_and_writes_a_usable_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    r = run_pretrain(data, out, "--max_iters=40", "--eval_interval=20", "--learning_rate=1e-2", "--min_lr=1e-3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    final = json.loads(lines[-1])  # the last line printed is the metrics
    assert set(final) == {"val_loss", "ppl"} and final["ppl"] == pytest.approx(2.718281828 ** final["val_loss"])
    evals = [rec for rec in log(out) if "val_loss" in rec]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert final["val_loss"] < evals[0]["val_loss"] - 1.0, evals  # from ~ln(384) = 5.95 clearly down
    assert any(line.startswith("sample: ") for line in lines)
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"), stages=("pretrain",))
    assert ckpt["metrics"] == final and ckpt["step"] == 40
    model, tok = engine.model_from_checkpoint(ckpt, "cpu")
    prepare.check_tokenizer_matches(ckpt, data)
    assert model.config.vocab_size == tok.vocab_size == 384 and model.config.n_embd == 32
    assert os.path.exists(out / "best.pt") and os.path.exists(out / "loss.png")

    # init_from continues from those weights: its step-0 evaluation (same fixed val windows) is where it ended
    cont = tmp_path / "cont"
    r = run_pretrain(data, cont, f"--init_from={out}", "--max_iters=2", "--n_embd=64")  # shape comes from the ckpt
    assert r.returncode == 0, r.stderr
    first = log(cont)[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(final["val_loss"], abs=1e-6)
    assert torch.load(cont / "ckpt.pt", weights_only=True)["model_config"]["n_embd"] == 32


def test_compiled_training_gives_the_eager_losses_and_reports_its_warm_up(data, tmp_path):
    """--compile=True: torch.compile of the model (inductor's C++ kernels on the CPU) trains to the eager losses
    within float rounding (fused kernels sum in another order), prints the compile's warm-up for the training step
    and the evaluation, and writes the same checkpoint keys (the unwrapped module's, no _orig_mod prefix)."""
    shared = ["--max_iters=3", "--eval_interval=3", "--sample_tokens=0"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    r = run_pretrain(data, eager, "--compile=False", *shared)
    assert r.returncode == 0, r.stderr
    assert "compiling" not in r.stderr
    r = run_pretrain(data, compiled, "--compile=True", *shared)
    assert r.returncode == 0, r.stderr
    assert "compiling the training step..." in r.stderr and "compiling the evaluation forward..." in r.stderr
    a, b = train_losses(eager), train_losses(compiled)
    assert a.keys() == b.keys() == {1, 2, 3}
    assert all(b[k] == pytest.approx(a[k], rel=1e-4) for k in a), (a, b)
    wa = torch.load(eager / "ckpt.pt", weights_only=True)
    wb = torch.load(compiled / "ckpt.pt", weights_only=True)
    assert wa["model"].keys() == wb["model"].keys()


def test_resumed_run_gives_exactly_the_losses_of_an_uninterrupted_one(data, tmp_path, monkeypatch, capsys):
    # the schedule is pinned with lr_decay_iters, so stopping at max_iters=4 and resuming with 8 changes nothing
    shared = ["--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1", "--grad_accum=2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    a = main_in_process(monkeypatch, capsys, data, full, "--max_iters=8", *shared)
    main_in_process(monkeypatch, capsys, data, cut, "--max_iters=4", *shared)
    b = main_in_process(monkeypatch, capsys, data, cut, "--max_iters=8", "--resume=True", *shared)
    assert len(train_losses(full)) == 8 and train_losses(cut) == train_losses(full)  # bit for bit
    assert a.splitlines()[-1] == b.splitlines()[-1]
    wa = torch.load(full / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(cut / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_saves_a_loadable_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "pretrain.py", f"--dataset={data}", f"--out_dir={out}", *TINY, "--max_iters=1000000",
           "--eval_interval=1000000"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and p.poll() is None and \
            not (metrics.exists() and metrics.read_text().count("train_loss") >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted at step" in err
    ckpt = common.load_checkpoint(str(out), stages=("pretrain",))  # with weights_only=True
    assert ckpt["step"] >= 3 and "optimizer" in ckpt and ckpt["data_position"]["next_k"] == ckpt["step"]
    # (that resuming from such a checkpoint is exact is tested in test_trainer.py)


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(data, tmp_path):
    # 2 processes x 1 micro-batch of 4 vs 1 process x 2 micro-batches of 4: the same 8 sequences, so the same
    # loss and, after DDP's gradient all-reduce, the same gradient
    args = ["--max_iters=1", "--grad_accum=2", "--sample_tokens=0", "--eval_iters=1"]
    one = run_pretrain(data, tmp_path / "one", *args)
    two = run_pretrain(data, tmp_path / "two", *args, launcher=(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = log(tmp_path / "one")[1], log(tmp_path / "two")[1]
    assert a["step"] == b["step"] == 1
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert b["tokens"] == a["tokens"] == 2 * 4 * 32
    wa = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    # only rank 0 prints the result and writes files
    assert two.stdout.count('"val_loss"') == 1 and json.loads(two.stdout.strip().splitlines()[-1])


def test_bad_input_is_a_clear_error(data, tmp_path, monkeypatch):
    tok = prepare.load_tokenizer(data)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    sft, pt = tmp_path / "sft.pt", tmp_path / "pt.pt"  # sft: a later stage's, not something to pretrain from
    common.save_checkpoint(str(sft), {**trainer.model_entries(model, tok), "stage": "sft"})
    common.save_checkpoint(str(pt), {**trainer.model_entries(model, tok), "stage": "pretrain"})
    # the same data with another tokenizer: its ids would mean different text to the checkpoint
    other = tmp_path / "other"
    shutil.copytree(data, other)
    Tokenizer.train(["something else entirely 123"] * 50, vocab_size=300).save(str(other / "tokenizer.json"))
    cases = [
        (["--dataset=" + str(tmp_path / "missing")], "prepare"),
        (["--n_layers=3"], "n_layers"),
        ([f"--init_from={sft}"], "an SFT checkpoint cannot be used here"),
        ([f"--init_from={pt}", f"--dataset={other}"], "tokenizer differs"),
        (["--resume=True"], "does not exist"),
        (["--block_size=1000000"], "fewer than --block_size=1000000"),
    ]
    import pretrain
    for extra, named in cases:  # in-process: a fresh copy of the script's constants each time
        monkeypatch.setattr(sys, "argv", ["pretrain.py", f"--dataset={data}", f"--out_dir={tmp_path / 'b'}", *TINY,
                                          "--max_iters=1", *extra])
        importlib.reload(pretrain)
        with pytest.raises(common.UserError, match=named):
            pretrain.main()
    # and through the command line: one line on stderr, status 2, no traceback
    r = run_pretrain(data, tmp_path / "b", f"--init_from={sft}")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("preset,vocab,millions", [
    ("pretrain_cpu.py", 6400, (1, 3)),
    ("pretrain_mps.py", 6400, (5, 20)),
    ("pretrain_gpu_small.py", 6400, (24, 64)),    # the 26M-64M class of small chat models
    ("pretrain_gpt2.py", 32000, (100, 130)),      # GPT-2-124M class
])
def test_presets_are_valid_settings_of_the_sizes_they_claim(preset, vocab, millions):
    import pretrain
    importlib.reload(pretrain)
    g = pretrain.__dict__
    common.configure(g, [os.path.join(ROOT, "config", preset)])  # unknown keys or wrong types would raise
    with torch.device("meta"):  # shapes only, no memory, no init time
        model = GPT(ModelConfig(vocab_size=vocab, block_size=g["block_size"], n_layer=g["n_layer"], n_head=g["n_head"],
                                n_kv_head=g["n_kv_head"], n_embd=g["n_embd"], tie_embeddings=g["tie_embeddings"]))
    assert millions[0] <= model.num_params() / 1e6 <= millions[1]
    trainer.check_train_config({k: g[k] for k in common.config_keys(g)})
    importlib.reload(pretrain)


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def test_torchrun_with_the_default_grad_accum_runs_and_ends_cleanly_every_time(data, tmp_path):
    # `torchrun --standalone --nproc_per_node=2 pretrain.py` stopped with "--grad_accum=1: must be a multiple of
    # the number of processes (2)", and a 2-process run could abort at exit ("terminate called without an active
    # exception") when one process closed the process group while rank 0 was still evaluating and printing
    args = ["--max_iters=2", "--eval_interval=2", "--eval_iters=1"]  # grad_accum: the default, 1
    one = run_pretrain(data, tmp_path / "one", *args, "--grad_accum=2")
    assert one.returncode == 0, one.stderr
    for i in range(3):
        out = tmp_path / f"two{i}"
        r = run_pretrain(data, out, *args, launcher=TORCHRUN)  # rank 0 also samples text after training
        assert r.returncode == 0, r.stderr
        assert "terminate called" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("each process takes one micro-batch per step") == 1, r.stderr
        # the run it did: 2 micro-batches per step, one per process, as one process with --grad_accum=2
        assert common.load_checkpoint(str(out))["train_config"]["grad_accum"] == 2
        assert log(out)[1]["train_loss"] == pytest.approx(log(tmp_path / "one")[1]["train_loss"], rel=1e-6)
        assert r.stdout.strip().splitlines()[-1] == one.stdout.strip().splitlines()[-1]
    # a setting that cannot be honoured is the clear error, and nothing hangs
    r = run_pretrain(data, tmp_path / "bad", *args, "--grad_accum=3", launcher=TORCHRUN)
    assert r.returncode != 0
    assert "error: --grad_accum=3: must be a multiple of the number of processes (2)" in r.stderr, r.stderr
