import json
import math
import os

import pytest

import common
import pipeline
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
    for stage in ("sft", "dpo", "ppo", "grpo"):  # every policy stage: greedy and sampled, exact and clean
        for key in ("exact_match", "exact_match_sampled", "clean_rate", "clean_rate_sampled"):
            assert 0 <= metrics[stage][key] <= 1 and set(metrics[stage][f"{key}_by_lang"]) <= {"en", "zh"}, key
            assert f"{key} {metrics[stage][key]:.4f}" in report
        assert metrics[stage]["eval_samples"] == 4 and (out / stage / "eval_prompts.jsonl").exists()
    assert "zero_spread" in metrics["grpo"] and "zero_spread" not in metrics["ppo"]
    for title in ("Exact match, greedy", "Exact match, sampled", "Clean-reply rate, greedy",
                  "Clean-reply rate, sampled"):
        assert f"## {title} on held-out checkable prompts" in report
    assert "| numword |" in report and "| zh |" in report
    against = report.split("## Against SFT")[1].split("##")[0]
    for stage in ("dpo", "ppo", "grpo"):
        row = next(line for line in against.splitlines() if line.startswith(f"| {stage} |"))
        assert row.count("p = ") == 2, row  # the sign test for greedy and for sampled exact match
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

    # the methods table: variant stages run from the same SFT model; the stages done already are kept. sft_clean:
    # SFT on the same data prepared without flaws (a second prepare run, with the first one's tokenizer)
    clean = ("--prepare_args=('--world_mb=0.1 --vocab_size=384', '--world_mb=0.1 --dataset={dataset}_clean "
             "--flaw_wrong_language_en=0 --flaw_wrong_language_zh=0 --flaw_pleasantry=0 --tokenizer={data}')")
    variants = run_script("pipeline.py", *args, clean,
                          "--stages=('pretrain', 'sft', 'dpo', 'dpo_ipo', 'grpo', 'grpo_none', 'sft_clean')",
                          timeout=300)
    assert variants.returncode == 0, variants.stderr[-3000:]
    assert variants.stdout.count("done earlier") == 4  # pretrain, sft, dpo, grpo (the new prepare_args ran)
    log = (out / "logs" / "sft_clean.log").read_text()
    assert f"--dataset={data}_clean" in log and f"--init_from={out / 'pretrain'}" in log
    assert common.load_checkpoint(str(out / "sft_clean"))["train_config"]["dataset"] == f"{data}_clean"
    assert (data.parent / "world_clean" / "tokenizer.json").read_text() == (data / "tokenizer.json").read_text()
    log = (out / "logs" / "dpo_ipo.log").read_text()
    assert "dpo.py" in log and "--loss_type=ipo" in log and f"--init_from={out / 'sft'}" in log
    assert "--algo=grpo" in (out / "logs" / "grpo_none.log").read_text()
    assert "--advantage_scale=none" in (out / "logs" / "grpo_none.log").read_text()
    config = lambda stage: common.load_checkpoint(str(out / stage))["train_config"]  # noqa: E731
    assert config("dpo_ipo")["loss_type"] == "ipo" and config("grpo_none")["advantage_scale"] == "none"
    against = (out / "report.md").read_text().split("## Against SFT")[1].split("##")[0]
    assert "| dpo_ipo |" in against and "| grpo_none |" in against and "| sft_clean |" in against

    # several runs side by side: the same run twice pools to the same means and twice the sign-test counts
    pooled = run_script("pipeline.py", f"--pool=('{out}', '{out}')", f"--out_dir={tmp_path}", timeout=120)
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    table = (tmp_path / "seeds.md").read_text()
    single = json.loads((out / "pipeline.json").read_text())["stages"]
    sft_v = pipeline.read_verdicts(out / "sft")
    for stage in ("dpo", "grpo_none"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {stage} |"))
        wins, losses = pipeline.paired_counts(pipeline.read_verdicts(out / stage), sft_v, "right")
        assert f"{2 * wins} / {2 * losses}, p = {pipeline.sign_test(2 * wins, 2 * losses):.3g}" in row
        assert pipeline.pct(single[stage]["metrics"]["exact_match"]) in row
    assert "| sft_clean |" in table and "gap recovered" in table
    r = run_script("pipeline.py", f"--pool=('{tmp_path / 'nowhere'}',)", f"--out_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.startswith("error: --pool") and "pipeline.json" in r.stderr


def test_the_sign_test_against_hand_computed_binomial_tails():
    # two-sided: 2 P(X <= min) for X ~ Binomial(wins + losses, 1/2), at most 1
    assert pipeline.sign_test(1, 5) == 2 * (1 + 6) / 64          # 0.21875
    assert pipeline.sign_test(5, 1) == 2 * (1 + 6) / 64          # symmetric
    assert pipeline.sign_test(0, 10) == 2 / 1024                 # 0.00195
    assert pipeline.sign_test(8, 2) == 2 * (1 + 10 + 45) / 1024  # 0.109375
    assert pipeline.sign_test(3, 3) == 1.0 and pipeline.sign_test(0, 0) == 1.0
    # large counts stay exact (no overflow of 2 ** n): 20 against 40 is p = 0.0135 (Binomial(60, 1/2) tail)
    assert pipeline.sign_test(20, 40) == pytest.approx(2 * sum(math.comb(60, i) for i in range(21)) / 2 ** 60)
    assert 0.013 < pipeline.sign_test(20, 40) < 0.014


def test_paired_counts_compare_the_same_prompts_and_leave_ties_out():
    stage = {0: {"right": 1, "sampled_right": 2}, 1: {"right": 0, "sampled_right": 4},
             2: {"right": 1, "sampled_right": 1}, 9: {"right": 1, "sampled_right": 4}}  # 9: not scored by SFT
    sft = {0: {"right": 0, "sampled_right": 2}, 1: {"right": 0, "sampled_right": 3},
           2: {"right": 1, "sampled_right": 3}, 3: {"right": 0, "sampled_right": 0}}
    assert pipeline.paired_counts(stage, sft, "right") == (1, 0)
    assert pipeline.paired_counts(stage, sft, "sampled_right", 4, 4) == (1, 1)
    # different sample counts compare shares: 2 of 4 against 4 of 8 is a tie, 4 of 4 against 3 of 8 a win
    assert pipeline.paired_counts({0: {"sampled_right": 2}, 1: {"sampled_right": 4}},
                                  {0: {"sampled_right": 4}, 1: {"sampled_right": 3}}, "sampled_right", 4, 8) == (1, 0)
    assert pipeline.paired_counts(stage, {0: {"right": 1}}, "sampled_right") is None


def test_an_unknown_stage_is_a_one_line_error(tmp_path):
    r = run_script("pipeline.py", f"--out_dir={tmp_path}", "--stages=('pretrain', 'rlhf')")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "rlhf" in r.stderr
