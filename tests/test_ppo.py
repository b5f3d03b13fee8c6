import importlib
import sys

import pytest
import torch

import ppo
import trainer
from conftest import ok, one_line_error, read_log, run_script


# ------------------------------------------------------------------------------------------------ estimators by hand

def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    # gamma 1, lambda 0.9: deltas 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + 0.9 * 0.3, A0 = 0.1 + 0.9 * 0.37
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 0.9)
    torch.testing.assert_close(adv, torch.tensor([[0.433, 0.37, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.933, 0.97, 1.0]]))
    # gamma 0.9, lambda 0.5: deltas 0.9*0.6-0.5 = 0.04, 0.9*0.7-0.6 = 0.03, 0.3
    adv, _ = ppo.gae(rewards, values, mask, 0.9, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.04 + 0.45 * (0.03 + 0.45 * 0.3), 0.03 + 0.45 * 0.3, 0.3]]))


def test_gae_ignores_padding_after_the_response():
    rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]])   # 5.0 sits on padding
    values = torch.tensor([[0.5, 0.6, 99.0], [0.5, 0.6, 0.7]])  # so does 99
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 0.9)
    alone, _ = ppo.gae(rewards[:1, :2], values[:1, :2], mask[:1, :2], 1.0, 0.9)
    torch.testing.assert_close(adv[0, :2], alone[0])
    assert adv[0, 2] == 0 and ret[0, 2] == 0


def test_whitening_uses_only_the_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 1000.0], [3.0, 4.0, -1000.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = ppo.whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().abs() < 1e-6 and (real ** 2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
    assert (w[~mask.bool()] == 0).all()
    torch.testing.assert_close(real, (torch.tensor([1.0, 2, 3, 4]) - 2.5) / torch.tensor(1.25).sqrt(),
                               rtol=1e-4, atol=1e-4)


def test_clipped_objective_has_zero_gradient_outside_the_clip_range():
    def grad(ratio, advantage):
        logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
        loss, clipped = ppo.clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[advantage]]),
                                                torch.ones(1, 1), 0.2)
        loss.backward()
        return logp.grad.item(), clipped.item()
    assert grad(1.5, 1.0) == (0.0, 1.0)      # pushed up past 1 + eps: no more push
    assert grad(0.5, -1.0) == (0.0, 1.0)     # pushed down past 1 - eps: no more push
    g, _ = grad(0.5, 1.0)                     # below the range but the advantage pulls it back: gradient flows
    assert g == pytest.approx(-0.5)
    g, _ = grad(1.5, -1.0)
    assert g == pytest.approx(1.5)
    g, clipped = grad(1.1, 1.0)               # inside the range: d(-A r)/d logp = -A r
    assert g == pytest.approx(-1.1) and clipped == 0.0


def test_grpo_advantages_with_the_unbiased_std():
    adv = ppo.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), 4)
    # mean 0.5, unbiased std sqrt(1/3): 0.5 / 0.57735 = 0.866 (eps 1e-4 in the denominator)
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (3 ** -0.5 + 1e-4))
    assert adv[:4].abs().sub(0.866).abs().max() < 1e-3
    assert (adv[4:] == 0).all()  # a group that all scores the same teaches nothing


def test_kl_estimators_are_zero_for_the_same_model_and_match_their_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    for kind in ("k1", "k3"):
        assert (ppo.kl_estimate(logp, logp, kind) == 0).all()
    ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(ppo.kl_estimate(logp, ref, "k1"), logp - ref)
    d = ref - logp
    torch.testing.assert_close(ppo.kl_estimate(logp, ref, "k3"), d.exp() - d - 1)
    assert (ppo.kl_estimate(logp, ref, "k3") >= 0).all()


# ------------------------------------------------------------------------------------------------ masks

def test_rewards_go_to_response_tokens_only_and_the_score_to_the_last_one():
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    kl = torch.full((2, 6), 0.1)
    r = ppo.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, 0.5)
    torch.testing.assert_close(r[0], torch.tensor([0.0, 0.0, -0.05, -0.05, 1.95, 0.0]))
    torch.testing.assert_close(r[1], torch.tensor([0.0, -0.05, -0.05, -0.05, -0.05, -1.05]))


def test_the_response_ends_with_its_end_of_turn_and_nothing_after_it_counts():
    special, end = {0, 1, 5}, 5
    assert ppo.cut_response([7, 8, 5, 1, 1], special, end) == ([7, 8, 5], True)
    assert ppo.cut_response([7, 8, 9], special, end) == ([7, 8, 9], False)       # never ended
    assert ppo.cut_response([7, 0, 9], special, end) == ([7, 0], False)          # another special: ended badly


def test_prompt_and_padding_tokens_get_no_gradient():
    """Backpropagating the policy loss into the logits: only the positions that predict response tokens move."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    seqs = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    logps = ppo.response_logps(logits, seqs, mask, temperature=0.7)
    loss, _ = ppo.clipped_policy_loss(logps, logps.detach() - 0.05, torch.randn(2, 6), mask, 0.2)
    loss.backward()
    moved = logits.grad.abs().sum(-1) > 0                       # position t predicts token t + 1
    predicts_response = torch.nn.functional.pad(mask[:, 1:], (0, 1)).bool()
    assert torch.equal(moved, predicts_response)


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
    for key in ("reward_mean", "reward_rm", "reward_checker", "kl", "response_length", "ended", "clip_frac"):
        assert key in steps[-1]
    assert ("value_loss" in steps[-1]) == (algo == "ppo")
    for key in ("exact_match", "exact_match_start", "reward_mean", "kl"):
        assert key in metrics
    ckpt = trainer.load_checkpoint(str(out), stages=("ppo",))
    assert ckpt["train_config"]["algo"] == algo and (out / "reward.png").exists()
    r = run_script("generate.py", f"--ckpt={out}", "--prompt=3+4?", "--max_new_tokens=4", "--device=cpu")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_an_easy_toy_reward_goes_up(world_data, sft_ckpt, tmp_path, monkeypatch, capsys, algo):
    """Reward 1 for a response that starts with a digit, 0 otherwise: both algorithms must raise it."""
    import world
    monkeypatch.setattr(world, "check_answer", lambda response, answer, task=None: response[:1].isdigit())
    monkeypatch.setattr(sys, "argv", ["ppo.py", *ppo_args(world_data, sft_ckpt, "-", tmp_path / algo,
                                      f"--algo={algo}", "--rm_weight=0", "--unfinished_penalty=0",
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
    rewards = [r["reward_checker"] for r in read_log(tmp_path / algo) if "reward_checker" in r]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, rewards


def test_bad_settings_are_one_line_errors(world_data, sft_ckpt, reward_ckpt, tmp_path):
    cases = [(["--algo=dqn"], "--algo"), (["--algo=grpo", "--group_size=1"], "at least 2"),
             (["--algo=grpo", "--group_size=3", "--batch_size=8"], "multiple of --group_size"),
             (["--rm_weight=0", "--checker_weight=0"], "no reward"),
             ([f"--reward_from={sft_ckpt}"], "is a policy, not a reward model"),
             ([f"--init_from={reward_ckpt}"], "a reward model checkpoint cannot be used as a policy")]
    for extra, fragment in cases:
        r = run_script("ppo.py", *ppo_args(world_data, sft_ckpt, reward_ckpt, tmp_path / "x", "--max_iters=1", *extra))
        one_line_error(r, fragment)


@pytest.mark.parametrize("arg,fragment", [("--temperature=1e-39", "--temperature must be >= 1e-05"),
                                          ("--temperature=1e999", "--temperature"), ("--top_k=-1", "--top_k")])
def test_sampling_settings_no_rollout_can_use_are_one_line_errors(arg, fragment):
    # a temperature that small made logits / temperature inf in the rollouts' log-probabilities; checked before
    # anything is loaded
    one_line_error(run_script("ppo.py", arg), fragment)
