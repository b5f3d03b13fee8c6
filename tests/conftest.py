"""Shared fixtures: one tiny world data set and a chain of tiny checkpoints (pretrain -> SFT -> reward model) that
the stage tests start from. Sizes are chosen so that a stage runs in seconds on one CPU thread."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread: these models are too small to gain from two, and the machine's cores are shared
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# what every tiny stage run shares
TINY_STAGE = ["--device=cpu", "--eval_iters=2", "--log_interval=1"]


def run_script(script, *args, timeout=300, stdin=None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV, input=stdin)


def ok(r):
    """The run succeeded; its last stdout line (the stage's metrics, as JSON)."""
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_line_error(r, *fragments):
    """The run failed as bad input should: status 2, one `error: ...` line naming what is wrong, no traceback."""
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, r.stderr[-3000:]
    for f in fragments:
        assert f in err, err
    return err


def read_log(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def world_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "world"
    ok_ = run_script("prepare.py", f"--dataset={out}", "--world_mb=0.1", "--vocab_size=384")
    assert ok_.returncode == 0, ok_.stderr
    return str(out)


@pytest.fixture(scope="session")
def pretrained(world_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "pretrain"
    ok(run_script("pretrain.py", f"--dataset={world_data}", f"--out_dir={out}", *TINY_STAGE, "--n_layer=2",
                  "--n_head=2", "--n_kv_head=1", "--n_embd=48", "--block_size=96", "--batch_size=8",
                  "--max_iters=60", "--eval_interval=60", "--learning_rate=1e-2", "--sample_tokens=0"))
    return str(out)


@pytest.fixture(scope="session")
def sft_ckpt(world_data, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "sft"
    ok(run_script("sft.py", f"--dataset={world_data}", f"--init_from={pretrained}", f"--out_dir={out}",
                  *TINY_STAGE, "--batch_size=16", "--max_iters=60", "--eval_interval=60", "--learning_rate=1e-2",
                  "--eval_prompts=16", "--eval_max_new_tokens=16"))
    return str(out)


@pytest.fixture(scope="session")
def reward_ckpt(world_data, sft_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "reward"
    ok(run_script("reward_model.py", f"--dataset={world_data}", f"--init_from={sft_ckpt}", f"--out_dir={out}",
                  *TINY_STAGE, "--batch_size=16", "--max_iters=30", "--eval_interval=30", "--learning_rate=2e-3"))
    return str(out)


@pytest.fixture(scope="session")
def dropout_sft_ckpt(sft_ckpt, tmp_path_factory):
    """The SFT checkpoint as if its model had been pretrained with --dropout=0.1 (its config carries it on)."""
    import torch
    ckpt = torch.load(os.path.join(sft_ckpt, "ckpt.pt"), map_location="cpu", weights_only=True)
    ckpt["model_config"]["dropout"] = 0.1
    for key in ("optimizer", "scaler", "rng", "data_position", "best", "recent_records"):
        ckpt.pop(key, None)
    path = tmp_path_factory.mktemp("ckpt") / "sft_dropout.pt"
    torch.save(ckpt, path)
    return str(path)
