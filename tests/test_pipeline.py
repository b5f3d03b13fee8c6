import json
import os

from conftest import run_script

TINY = {
    "prepare_args": "('--world_mb=0.1 --vocab_size=384',)",
    "pretrain_args": "--n_layer=2 --n_head=2 --n_kv_head=1 --n_embd=48 --block_size=96 --batch_size=8 --max_iters=40 "
                     "--eval_interval=40 --eval_iters=2 --learning_rate=1e-2 --sample_tokens=0",
    "sft_args": "--batch_size=8 --max_iters=30 --eval_interval=30 --eval_iters=2 --learning_rate=1e-2 "
                "--eval_prompts=16 --eval_max_new_tokens=8",
    "dpo_args": "--batch_size=8 --max_iters=6 --eval_interval=6 --eval_iters=2 --eval_prompts=16 --eval_max_new_tokens=8",
    "reward_args": "--batch_size=8 --max_iters=6 --eval_interval=6 --eval_iters=2",
    "ppo_args": "--batch_size=8 --max_iters=2 --eval_interval=2 --max_new_tokens=8 --eval_prompts=16 "
                "--eval_max_new_tokens=8",
    "grpo_args": "--batch_size=8 --group_size=4 --max_iters=2 --eval_interval=2 --max_new_tokens=8 --eval_prompts=16 "
                 "--eval_max_new_tokens=8",
}


def test_the_whole_pipeline_runs_end_to_end_and_its_report_holds_every_stage(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data" / "world"
    args = [f"--out_dir={out}", f"--dataset={data}", "--device=cpu", "--report_max_new_tokens=8",
            *(f"--{k}={v}" for k, v in TINY.items())]
    r = run_script("pipeline.py", *args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    for i, stage in enumerate(["prepare", "pretrain", "sft", "dpo", "reward", "ppo", "grpo"], 1):
        assert f"[{i}/7] {stage}" in r.stdout
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == ["pretrain", "sft", "dpo", "reward", "ppo", "grpo"]
    report = (out / "report.md").read_text()
    metrics = {s: st["metrics"] for s, st in state["stages"].items()}
    for stage, keys in {"pretrain": ["val_loss", "ppl"], "sft": ["exact_match"],
                        "dpo": ["pref_accuracy", "exact_match", "kl"], "reward": ["pair_accuracy"],
                        "ppo": ["reward_mean", "kl", "exact_match"], "grpo": ["reward_mean", "kl", "exact_match"]}.items():
        assert f"| {stage} |" in report
        for key in keys:
            assert key in metrics[stage], (stage, key)
            assert f"{key} {metrics[stage][key]:.4f}" in report  # the report shows the checkpoint's figure
    assert "## Exact match on held-out checkable prompts" in report and "| numword |" in report
    assert "## The same held-out prompts, every stage" in report and "- grpo: " in report
    assert (out / "curves.png").stat().st_size > 1000 and (out / "sft" / "loss.png").exists()
    assert all(state["stages"][s]["tokens"] > 0 for s in state["stages"])

    # run again: every stage is done and kept, only the report is made anew
    again = run_script("pipeline.py", *args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier") == 7  # prepare and the six stages

    # a stage that was cut short is continued with --resume=True, not started over
    state["running"] = "grpo"
    del state["stages"]["grpo"]
    (out / "pipeline.json").write_text(json.dumps(state))
    resumed = run_script("pipeline.py", *args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "grpo (resuming)" in resumed.stdout
    assert "--resume=True" in (out / "logs" / "grpo.log").read_text()
    assert "grpo" in json.loads((out / "pipeline.json").read_text())["stages"]
    assert os.path.exists(out / "grpo" / "ckpt.pt")


def test_an_unknown_stage_is_a_one_line_error(tmp_path):
    r = run_script("pipeline.py", f"--out_dir={tmp_path}", "--stages=('pretrain', 'rlhf')")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "rlhf" in r.stderr
