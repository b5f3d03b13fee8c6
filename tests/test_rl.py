"""The estimators of RL from feedback (rl.py), each checked against values computed by hand."""
import random

import pytest
import torch

import model as model_module
import rl
from common import UserError
from model import GPT, ModelConfig
from tokenizer import Tokenizer


# ------------------------------------------------------------------------------------------------ estimators by hand

def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    # gamma 1, lambda 0.9: deltas 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + 0.9 * 0.3, A0 = 0.1 + 0.9 * 0.37
    adv, ret = rl.gae(rewards, values, mask, 1.0, 0.9)
    torch.testing.assert_close(adv, torch.tensor([[0.433, 0.37, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.933, 0.97, 1.0]]))
    # gamma 0.9, lambda 0.5: deltas 0.9*0.6-0.5 = 0.04, 0.9*0.7-0.6 = 0.03, 0.3
    adv, _ = rl.gae(rewards, values, mask, 0.9, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.04 + 0.45 * (0.03 + 0.45 * 0.3), 0.03 + 0.45 * 0.3, 0.3]]))


def test_gae_ignores_padding_after_the_response():
    rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]])   # 5.0 sits on padding
    values = torch.tensor([[0.5, 0.6, 99.0], [0.5, 0.6, 0.7]])  # so does 99
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv, ret = rl.gae(rewards, values, mask, 1.0, 0.9)
    alone, _ = rl.gae(rewards[:1, :2], values[:1, :2], mask[:1, :2], 1.0, 0.9)
    torch.testing.assert_close(adv[0, :2], alone[0])
    assert adv[0, 2] == 0 and ret[0, 2] == 0


def test_whitening_uses_only_the_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 1000.0], [3.0, 4.0, -1000.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = rl.whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().abs() < 1e-6 and (real ** 2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
    assert (w[~mask.bool()] == 0).all()
    torch.testing.assert_close(real, (torch.tensor([1.0, 2, 3, 4]) - 2.5) / torch.tensor(1.25).sqrt(),
                               rtol=1e-4, atol=1e-4)


def test_clipped_objective_has_zero_gradient_outside_the_clip_range():
    def grad(ratio, advantage):
        logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
        loss, clipped = rl.clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[advantage]]),
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
    adv = rl.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), 4)
    # mean 0.5, unbiased std sqrt(1/3): 0.5 / 0.57735 = 0.866 (eps 1e-4 in the denominator)
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (3 ** -0.5 + 1e-4))
    assert adv[:4].abs().sub(0.866).abs().max() < 1e-3
    assert (adv[4:] == 0).all()  # a group that all scores the same teaches nothing


def test_grpo_advantage_scalings_by_hand():
    """group (GRPO), batch (one std for the batch) and none (Dr. GRPO): a scaling that divided by the wrong std, or
    did not centre on the group mean, would show here."""
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rl.grpo_advantages(scores, 4, "none"), centred)
    # batch: mean 0.5, squared deviations 4 x 0.25 = 1 over 7 (unbiased): std 1/sqrt(7) = 0.37796
    torch.testing.assert_close(rl.grpo_advantages(scores, 4, "batch"), centred / (7 ** -0.5 + 1e-4))
    torch.testing.assert_close(rl.grpo_advantages(scores, 4, "group"), rl.grpo_advantages(scores, 4))
    # two groups of different spread: group scaling gives both the same size, batch keeps their ratio (1 : 2)
    scores = torch.tensor([0.0, 1.0, 0.0, 2.0])
    torch.testing.assert_close(rl.grpo_advantages(scores, 2, "group", eps=0.0),
                               torch.tensor([-1.0, 1, -1, 1]) / 2 ** 0.5)
    # batch std: mean 0.75, squared deviations 0.5625 + 0.0625 + 0.5625 + 1.5625 = 2.75 over 3
    torch.testing.assert_close(rl.grpo_advantages(scores, 2, "batch", eps=0.0),
                               torch.tensor([-0.5, 0.5, -1.0, 1.0]) / (2.75 / 3) ** 0.5)
    with pytest.raises(UserError, match="advantage_scale"):
        rl.grpo_advantages(scores, 2, "std")


def test_zero_spread_share_counts_groups_whose_samples_all_score_the_same():
    assert rl.zero_spread_share(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), 4) == 0.5
    assert rl.zero_spread_share(torch.tensor([0.0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1]), 4) == pytest.approx(2 / 3)
    assert rl.zero_spread_share(torch.tensor([0.0, 0, 1, 0, 1, 1, 2, 3]), 2) == 0.5


def test_rule_scores_reward_the_right_answer_and_the_clean_reply_separately():
    rows = [{"answer": "Shanghai", "task": "fact", "lang": "en"},  # clean and right
            {"answer": "Shanghai", "task": "fact", "lang": "en"},  # the other language: wrong by both rules
            {"answer": "36", "task": "sub", "lang": "zh"},         # a number: right and clean in either language
            {"answer": "36", "task": "sub", "lang": "zh"},         # right by the checker, in the wrong language
            {"answer": "36", "task": "sub", "lang": "en"},         # a pleasantry after the answer: wrong and flawed
            {"answer": "36", "task": "sub", "lang": "en"},         # empty: earns nothing
            {"answer": "36", "task": "sub", "lang": "en"},         # clean but wrong
            {}]                                                    # no answer, no language: nothing to score
    replies = ["Anna Wang lives in Shanghai.", "王安娜住在上海。", "48 - 12 = 36", "The answer is 36.",
               "48 - 12 = 36. Hope this helps!", "", "48 - 12 = 35", "Hello."]
    checker, clean = rl.rule_scores(replies, rows)
    assert checker.tolist() == [1, 0, 1, 1, 0, 0, 0, 0]
    assert clean.tolist() == [1, 0, 1, 0, 0, 0, 1, 0]


def test_kl_estimators_are_zero_for_the_same_model_and_match_their_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    for kind in ("k1", "k3"):
        assert (rl.kl_estimate(logp, logp, kind) == 0).all()
    ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(rl.kl_estimate(logp, ref, "k1"), logp - ref)
    d = ref - logp
    torch.testing.assert_close(rl.kl_estimate(logp, ref, "k3"), d.exp() - d - 1)
    assert (rl.kl_estimate(logp, ref, "k3") >= 0).all()


# ------------------------------------------------------------------------------------------------ masks

def test_rewards_go_to_response_tokens_only_and_the_score_to_the_last_one():
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    kl = torch.full((2, 6), 0.1)
    r = rl.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, 0.5)
    torch.testing.assert_close(r[0], torch.tensor([0.0, 0.0, -0.05, -0.05, 1.95, 0.0]))
    torch.testing.assert_close(r[1], torch.tensor([0.0, -0.05, -0.05, -0.05, -0.05, -1.05]))


def test_prompt_and_padding_tokens_get_no_gradient():
    """Backpropagating the policy loss into the final hidden states (what the head reads, position by position):
    only the positions that predict response tokens move. The log-probs equal those of the full logits."""
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    seqs = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    states = []

    def keep(module, inputs, out):
        out.retain_grad()
        states.append(out)
    policy.norm.register_forward_hook(keep)
    logps, _ = rl.response_logps(policy, seqs, mask, temperature=0.7)
    loss, _ = rl.clipped_policy_loss(logps, logps.detach() - 0.05, torch.randn(2, 6), mask, 0.2)
    loss.backward()
    moved = states[0].grad.abs().sum(-1) > 0                    # position t predicts token t + 1
    assert torch.equal(moved, mask[:, 1:].bool())               # the forward saw seqs[:, :-1]
    full = torch.log_softmax(policy(seqs)[0].float() / 0.7, -1)[:, :-1].gather(2, seqs[:, 1:, None])[..., 0]
    torch.testing.assert_close(logps, torch.nn.functional.pad(full, (1, 0)) * mask)


# ------------------------------------------------------------------------------------------------ one distribution

def test_rollout_old_logps_are_the_log_probs_the_sampler_drew_each_token_with(monkeypatch):
    """The ratio and the KL need log pi_old of each sampled token under the distribution it was drawn from. Record
    what the sampler draws from at every step (logits / temperature, no top-k or top-p cut: any cut would make
    the recorded distribution differ) and compare with response_logps of the rollout's teacher-forced pass, with
    prompts of different lengths (left padding in generation, right padding in scoring)."""
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to see one big red dog".split()
    tok = Tokenizer.train([" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)], vocab_size=300)
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    temperature = 0.8
    drawn = []  # per generation step: (B,) log-probs of the drawn tokens under the sampler's distribution
    original = model_module.sample

    def recording_sample(logits, temperature_, top_k=None, top_p=None, generator=None):
        assert temperature_ == temperature and not top_k and top_p in (None, 1.0), "rollouts sample uncut"
        token = original(logits, temperature_, top_k, top_p, generator)
        drawn.append(torch.log_softmax(logits.float() / temperature_, -1).gather(1, token[:, None])[:, 0])
        return token
    monkeypatch.setattr(model_module, "sample", recording_sample)
    prompts = [tok.encode("the cat sat on"), tok.encode("one big red dog ran to see the"), [tok.eot_id]]
    gen = torch.Generator().manual_seed(3)
    replies, responses, seqs, resp_mask = rl.sample_rollouts(policy, tok, prompts, 10, "cpu", temperature, gen)
    logps = rl.response_logps(policy, seqs, resp_mask, temperature)[0]
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        assert seqs[b, :len(prompt)].tolist() == prompt and seqs[b, len(prompt):len(prompt) + len(response)].tolist() \
            == response and resp_mask[b].sum() == len(response)
        got = logps[b, len(prompt):len(prompt) + len(response)]
        want = torch.stack([drawn[t][b] for t in range(len(response))])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(len(r) for r in responses) > 10
