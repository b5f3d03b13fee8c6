import importlib
import sys

import pytest
import torch

import common
import ppo
from conftest import ok, one_line_error, read_log, run_script


# ------------------------------------------------------------------------------------------------ tiny runs

def ppo_args(data, sft, reward, out, *extra):
    return [f"--dataset={data}", f"--init_from={sft}", f"--reward_from={reward}", f"--out_dir={out}",
            "--device=cpu", "--eval_prompts=8", "--eval_max_new_tokens=8", "--max_new_tokens=8", *extra]


@pytest.mark.parametrize("algo,extra", [("ppo", []), ("grpo", ["--finetune=lora", "--group_size=4"])])
def test_tiny_runs_complete_start_at_zero_kl_and_write_checkpoints_generate_loads(world_data, sft_ckpt, reward_ckpt,
                                                                                  tmp_path, algo, extra):
    out = tmp_path / algo
    metrics = ok(run_script("ppo.py", *ppo_args(world_data, sft_ckpt, reward_ckpt, out, f"--algo={algo}",
                                                "--max_iters=3", "--eval_interval=3", "--batch_size=8", *extra)))
    steps = [r for r in read_log(out) if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert abs(steps[0]["kl"]) < 1e-4  # the first rollout comes from the starting policy: the reference itself
    for key in ("reward_mean", "reward_checker", "kl", "response_length", "ended", "clip_frac"):
        assert key in steps[-1]
    assert ("value_loss" in steps[-1]) == (algo == "ppo")
    # PPO scores with the reward model and the checker, GRPO with the checker and the clean-reply rule (its default
    # rm_weight is 0, its clean_weight 1)
    assert ("reward_rm" in steps[-1]) == (algo == "ppo") and ("reward_clean" in steps[-1]) == (algo == "grpo")
    assert ("zero_spread" in steps[-1]) == (algo == "grpo") and ("zero_spread" in metrics) == (algo == "grpo")
    for key in ("exact_match", "exact_match_start", "reward_mean", "kl", "exact_match_sampled", "clean_rate",
                "clean_rate_sampled", "clean_rate_by_lang", "exact_match_sampled_by_task"):
        assert key in metrics, key
    assert metrics["eval_samples"] == 4 and (out / "eval_prompts.jsonl").exists()
    evals = [r for r in read_log(out) if "exact_match" in r]  # steps 0 and 3: sampled at the final one only
    assert [(r["step"], "exact_match_sampled" in r) for r in evals] == [(0, False), (3, True)]
    ckpt = common.load_checkpoint(str(out), stages=("ppo",))
    assert ckpt["train_config"]["algo"] == algo and (out / "reward.png").exists()
    # learning_rate 0 is the algorithm's default for the finetune mode: full PPO 1e-5, LoRA 2e-4
    assert ckpt["train_config"]["learning_rate"] == {"ppo": 1e-5, "grpo": 2e-4}[algo]
    r = run_script("generate.py", f"--ckpt={out}", "--prompt=3+4?", "--max_new_tokens=4", "--device=cpu")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("algo,rule", [("ppo", "checker"), ("grpo", "checker"), ("grpo", "clean")])
def test_an_easy_toy_reward_goes_up(world_data, sft_ckpt, tmp_path, monkeypatch, capsys, algo, rule):
    """Reward 1 for a response that starts with a digit, 0 otherwise, from either rule alone: both algorithms must
    raise it."""
    import world
    if rule == "checker":
        monkeypatch.setattr(world, "check_answer", lambda response, answer, task=None: response[:1].isdigit())
    else:
        monkeypatch.setattr(world, "is_clean_reply", lambda response, lang: response[:1].isdigit())
    weights = ["--checker_weight=1", "--clean_weight=0"] if rule == "checker" else ["--checker_weight=0",
                                                                                     "--clean_weight=1"]
    monkeypatch.setattr(sys, "argv", ["ppo.py", *ppo_args(world_data, sft_ckpt, "-", tmp_path / algo,
                                      f"--algo={algo}", "--rm_weight=0", "--unfinished_penalty=0", *weights,
                                      "--max_iters=16", "--eval_interval=16", "--eval_prompts=0", "--batch_size=32",
                                      "--learning_rate=2e-3", "--kl_coef=0.001", "--temperature=1.0")])
    importlib.reload(ppo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ppo.main()
    finally:
        torch.set_num_threads(threads)
        importlib.reload(ppo)
    steps = [r for r in read_log(tmp_path / algo) if "reward_mean" in r]
    rewards = [r[f"reward_{rule}"] for r in steps]
    assert [r["reward_mean"] for r in steps] == pytest.approx(rewards)  # the one rule is the whole score
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, rewards


def test_bad_settings_are_one_line_errors(world_data, sft_ckpt, reward_ckpt, tmp_path):
    cases = [(["--algo=dqn"], "--algo"), (["--algo=grpo", "--group_size=1"], "at least 2"),
             (["--algo=grpo", "--group_size=3", "--batch_size=8"], "multiple of --group_size"),
             (["--rm_weight=0", "--checker_weight=0"], "no reward"),
             (["--algo=grpo", "--checker_weight=0", "--clean_weight=0"], "no reward"),
             ([f"--reward_from={sft_ckpt}"], "is a policy, not a reward model"),
             ([f"--init_from={reward_ckpt}"], "a reward model checkpoint cannot be used as a policy")]
    for extra, fragment in cases:
        r = run_script("ppo.py", *ppo_args(world_data, sft_ckpt, reward_ckpt, tmp_path / "x", "--max_iters=1", *extra))
        one_line_error(r, fragment)


@pytest.mark.parametrize("arg,fragment", [("--temperature=1e-39", "--temperature must be >= 1e-05"),
                                          ("--temperature=1e999", "--temperature"),
                                          ("--top_k=50", "unknown key --top_k"), ("--top_p=0.9", "unknown key --top_p"),
                                          ("--advantage_scale=std", "--advantage_scale")])
def test_sampling_settings_no_rollout_can_use_are_one_line_errors(arg, fragment):
    # a temperature that small made logits / temperature inf in the rollouts' log-probabilities; checked before
    # anything is loaded. Rollouts have no top-k/top-p: a cut sampler would not draw from the distribution whose
    # log-probs the ratio and the KL use
    one_line_error(run_script("ppo.py", arg), fragment)


def test_a_resumed_run_matches_an_uninterrupted_one(world_data, sft_ckpt, reward_ckpt, tmp_path):
    # PPO once had a loop of its own that drifted from the shared one (its resume never restored the grad scaler);
    # it now runs through trainer.train, which must also restore the critic, its optimizer and the adapted kl_coef
    shared = ["--algo=ppo", "--batch_size=4", "--minibatch_size=2", "--eval_interval=2", "--eval_prompts=0",
              "--lr_decay_iters=4", "--adaptive_kl=True", "--target_kl=0.01", "--kl_horizon=10"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok(run_script("ppo.py", *ppo_args(world_data, sft_ckpt, reward_ckpt, full, "--max_iters=4", *shared)))
    ok(run_script("ppo.py", *ppo_args(world_data, sft_ckpt, reward_ckpt, cut, "--max_iters=2", *shared)))
    ok(run_script("ppo.py", *ppo_args(world_data, sft_ckpt, reward_ckpt, cut, "--max_iters=4", "--resume=True",
                                      *shared)))
    steps = {name: [r for r in read_log(d) if "reward_mean" in r and "policy_loss" in r] for name, d in
             (("full", full), ("cut", cut))}
    assert [r["step"] for r in steps["cut"]] == [1, 2, 3, 4]
    keys = ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "grad_norm")
    assert steps["full"][1]["kl_coef"] != steps["full"][2]["kl_coef"], "the adaptive kl_coef moved"
    for a, b in zip(steps["full"], steps["cut"]):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-5, abs=1e-7)
    a, b = (common.load_checkpoint(str(d), stages=("ppo",)) for d in (full, cut))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k])
    for k in a["critic"]:
        torch.testing.assert_close(a["critic"][k], b["critic"][k])
    assert a["kl_coef"] == pytest.approx(b["kl_coef"]) and "scaler" in b
    # what the run reports is restored too: the summary of the last steps' rewards spans the resume
    assert b["metrics"] == pytest.approx(a["metrics"], rel=1e-5, abs=1e-7)
    # and a setting that changes the run is refused, naming it
    r = run_script("ppo.py", *ppo_args(world_data, sft_ckpt, reward_ckpt, cut, "--max_iters=6", "--resume=True",
                                       *shared, "--batch_size=8"))
    one_line_error(r, "--batch_size=4", "--batch_size=8")
    r = run_script("ppo.py", *ppo_args(world_data, sft_ckpt, reward_ckpt, cut, "--max_iters=6", "--resume=True",
                                       *shared, "--clip_range=0.1"))
    one_line_error(r, "--clip_range=0.2", "--clip_range=0.1")


@pytest.mark.parametrize("algo,extra", [("ppo", []), ("grpo", ["--group_size=4", "--finetune=lora",
                                                                 "--lora_dropout=0.1"])])
def test_dropout_is_off_so_the_first_ratio_is_exactly_one(world_data, dropout_sft_ckpt, reward_ckpt, tmp_path,
                                                          algo, extra):
    # old log-probs came from an eval-mode pass and the update's from a train-mode pass with the dropout of a
    # model pretrained with --dropout=0.1: before any update the ratio ranged 0.40-2.26 and 18% of the tokens
    # were clipped. One epoch over one minibatch: everything logged is measured before the update.
    out = tmp_path / algo
    ok(run_script("ppo.py", *ppo_args(world_data, dropout_sft_ckpt, reward_ckpt, out, f"--algo={algo}",
                                      "--max_iters=1", "--batch_size=8", "--minibatch_size=8", "--ppo_epochs=1",
                                      "--eval_prompts=0", "--eval_interval=1", *extra)))
    step = next(r for r in read_log(out) if "clip_frac" in r)
    assert step["clip_frac"] == 0.0
    if algo == "ppo":  # ratio 1 everywhere: the loss is minus the mean whitened advantage, 0
        assert abs(step["policy_loss"]) < 1e-6
