"""
The pieces of reinforcement learning from feedback that ppo.py (PPO and GRPO) is built from: the reward model's
scores, advantages (GAE, whitening, group baselines), KL estimators, the clipped policy and value losses (pure
functions of tensors, checked against hand-computed values in tests/test_rl.py), rollouts, and the check of
ppo.py's settings.
"""
import os

import torch
import torch.nn.functional as F

import engine
import world
from common import UserError, load_checkpoint
from engine import model_from_checkpoint
from model import GREEDY_BELOW, ModelConfig, ScoreModel, check_sampling
from trainer import pad_right

# ----------------------------------------------------------------------------------------------------------------
# the reward model's scores (reward_model.py trains it; ppo.py scores its rollouts with it)

def load_reward_model(path, device, tokenizer=None):
    """A reward checkpoint -> (ScoreModel on `device`, frozen, in eval mode; its tokenizer). Given the policy's
    `tokenizer`, a reward model trained with another one is a UserError, and the model alone is returned."""
    ckpt = load_checkpoint(path, stages=("reward",))
    gpt, rm_tokenizer = model_from_checkpoint(ckpt, "cpu")
    rm = ScoreModel(gpt.config)
    rm.gpt = gpt
    if "score_head" not in ckpt:
        raise UserError(f"{path}: a reward checkpoint without its score_head")
    rm.head.load_state_dict(ckpt["score_head"])
    rm = rm.requires_grad_(False).to(device).eval()
    if tokenizer is None:
        return rm, rm_tokenizer
    if rm_tokenizer.to_json() != tokenizer.to_json():
        raise UserError(f"{path}: its tokenizer differs from the policy's")
    return rm


def make_critic(init, rm=None, state=None):
    """PPO's critic, in training mode on the CPU: a ScoreModel (a trunk and a scalar head) with `state` (its state
    dict, when resuming), else started from the reward model `rm` when one is used (its score of a partial
    response is already a guess of the final one), else from the policy's checkpoint `init` with a zero head."""
    critic = ScoreModel(ModelConfig.from_dict(init["model_config"]))
    if state is not None:
        critic.load_state_dict(state)
    elif rm is not None:
        critic.load_state_dict(rm.state_dict())
    else:
        critic.gpt.load_state_dict(init["model"])
    return critic.train()


@torch.no_grad()
def reward_scores(rm, prompts, responses, pad_id, device, autocast=None):
    """Scores of (prompt ids, response ids) pairs: lists of token-id lists; each response should end with its
    end-of-turn token, as in training. Returns a (B,) float32 tensor on `device`. A pair longer than the context
    keeps its end (the reply is what is scored)."""
    seqs = [(list(p) + list(r))[-rm.config.block_size:] for p, r in zip(prompts, responses)]
    idx = pad_right(seqs, pad_id).to(device)
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    with autocast or torch.autocast(idx.device.type, enabled=False):
        return rm.score(idx, lengths).float()


# ----------------------------------------------------------------------------------------------------------------
# the estimators (pure functions, checked against hand-computed values in tests/test_rl.py)

def rule_scores(replies, rows):
    """The rule-based rewards of rollouts: `replies` (N,) texts, `rows` (N,) their prompt rows (dicts with optional
    "answer", "task", "lang"). Returns (checker, clean), (N,) float32 tensors of 0/1:
    checker  world.check_answer accepts the reply (0 where the row has no answer);
    clean    the reply is not empty, in the question's language and shows no demonstrated flaw (world.is_clean_reply;
             0 where the row has no language) -- a rule like DeepSeek-R1's language-consistency reward (Guo et al.
             2025). The exact checker cannot see the language of an answer that is a number ('48 - 12 = 36' answers
             a Chinese question too), so a policy that learned to answer in the wrong language keeps its habit
             under the checker alone. An empty reply earns nothing: it is in no wrong language."""
    checker = [float(world.check_answer(text, row["answer"], row.get("task"))) if row.get("answer") is not None
               else 0.0 for text, row in zip(replies, rows)]
    clean = [float(bool(text.strip()) and world.is_clean_reply(text, row["lang"])) if row.get("lang") in world.LANGS
             else 0.0 for text, row in zip(replies, rows)]
    return torch.tensor(checker), torch.tensor(clean)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the masked elements only (padding does not move the statistics); padding -> 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over (B, T) response tokens (mask 1 on the response, a prefix of each row).
    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last response token; A_t = sum_k (gamma lam)^k delta_{t+k}.
    Returns (advantages, returns = advantages + values), both 0 on padding."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, device=rewards.device)
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


ADVANTAGE_SCALES = ("group", "batch", "none")


def grpo_advantages(scores, group_size, scale="group", eps=1e-4):
    """GRPO's advantages: (n_prompts * group_size,) scores, each prompt's samples consecutive -> score - its group's
    mean, divided by
      'group': the group's std + eps (GRPO, Shao et al. 2024): each prompt's advantages get unit scale, so a group
               whose scores barely differ is amplified as much as one that differs a lot;
      'batch': the std of all the batch's scores + eps (as TRL's scale_rewards='batch'): one scale for the batch,
               so a prompt's weight follows how much its samples differ;
      'none':  nothing (Dr. GRPO, Liu et al. 2025: the std division biases learning towards prompts that are
               almost always right or almost always wrong).
    Stds are unbiased. A group whose samples all score the same gets 0 under every scale (nothing to learn)."""
    if scale not in ADVANTAGE_SCALES:
        raise UserError(f"--advantage_scale must be one of {', '.join(ADVANTAGE_SCALES)}, got {scale!r}")
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (scores.std() + eps)
    return centred.reshape(-1)


def zero_spread_share(scores, group_size):
    """The share of groups (consecutive group_size scores) whose samples all score the same: they give GRPO no
    signal at all. (n_prompts * group_size,) -> float in [0, 1]."""
    groups = scores.view(-1, group_size)
    return (groups == groups[:, :1]).all(1).float().mean().item()


def kl_estimate(logp, ref_logp, kind):
    """Per-token estimate of KL(pi || ref) from a token sampled from pi: k1 = log pi - log ref (unbiased, can be
    negative), k3 = exp(d) - d - 1 with d = log ref - log pi (unbiased, always >= 0, lower variance; Schulman 2020,
    "Approximating KL divergence"). The `kl` PPO and GRPO report is k3 summed over a response's tokens."""
    if kind == "k1":
        return logp - ref_logp
    d = ref_logp - logp
    return d.exp() - d - 1


def clipped_policy_loss(logp, old_logp, advantages, mask, clip_range):
    """PPO's clipped surrogate, averaged over the masked tokens: max(-A r, -A clip(r, 1 - c, 1 + c)), r =
    pi / pi_old. Outside the clip range on the side the advantage pushes to, its gradient is zero. Returns (loss,
    share of tokens clipped)."""
    ratio = (logp - old_logp).exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    clipped = ((ratio - 1).abs() > clip_range).float()
    return masked_mean(loss, mask), masked_mean(clipped, mask)


def token_rewards(scores, kl_tokens, mask, kl_coef):
    """PPO's per-token rewards, (B, T): -kl_coef x KL_t on every response token and the response's score on its
    last token (the end-of-turn when it ended). Prompt and padding get nothing."""
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
    return -kl_coef * kl_tokens * mask + last.float() * scores[:, None]


def clipped_value_loss(values, old_values, returns, mask, clip):
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), averaged over the masked tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ----------------------------------------------------------------------------------------------------------------

def sample_rollouts(policy, tokenizer, prompts, max_new_tokens, device, temperature, generator, autocast=None,
                    compile=False):
    """Sample one response per prompt (lists of token ids) for PPO/GRPO, from softmax(logits / temperature) with
    no top-k or top-p cut: the distribution response_logps scores, so that the old log-probs of the ratio and the
    KL are those of the distribution the tokens were drawn from (a truncated sampler would draw tokens whose
    scored probability differs from their sampling probability, and the ratio would no longer be an importance
    weight). A response is the reply plus the token that ended it (trained on and rewarded); padding after it is
    not. Returns (replies: engine.Reply list, responses: id lists, seqs (B, T) right-padded prompt + response ids,
    resp_mask (B, T) float, 1 on response tokens), tensors on the CPU. compile: decode with the compiled step."""
    replies = engine.generate_replies(policy, tokenizer, prompts, max_new_tokens, device, temperature=temperature,
                                      generator=generator, autocast=autocast, compile=compile)
    responses = [r.ids + ([r.stop] if r.stop is not None else []) for r in replies]
    seqs = pad_right([list(p) + r for p, r in zip(prompts, responses)], tokenizer.pad_id)
    resp_mask = pad_right([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0).float()
    return replies, responses, seqs, resp_mask


def response_logps(model, seqs, resp_mask, temperature):
    """Log-probabilities of the response tokens under logits / temperature (the distribution sample_rollouts draws
    from): model a GPT (or trainer.frozen_reference's function), seqs (B, T) right-padded prompt + response ids,
    resp_mask (B, T) 1 on response tokens -> ((B, T) float32 aligned with seqs: entry t is log p(seqs[t] |
    seqs[:t]) on response tokens, 0 elsewhere; the forward's aux_loss). The head runs on response positions only."""
    logps, aux_loss = model(seqs[:, :-1], seqs[:, 1:], loss_mask=resp_mask[:, 1:], return_logps=True,
                            temperature=temperature)
    return F.pad(logps, (1, 0)), aux_loss


# ----------------------------------------------------------------------------------------------------------------
# settings

def check_settings(cfg, default_rm_weight, default_clean_weight):
    """ppo.py's settings that no run can honour, as a UserError naming the key. Returns (group_size: rollouts per
    prompt, 1 for PPO and 8 for GRPO unless set; rm_weight and clean_weight: the defaults given where the setting is
    negative)."""
    algo = cfg["algo"]
    if algo not in ("ppo", "grpo"):
        raise UserError(f"--algo must be ppo or grpo, got {algo!r}")
    if cfg["kl_estimator"] not in ("k1", "k3"):
        raise UserError(f"--kl_estimator must be k1 or k3, got {cfg['kl_estimator']!r}")
    G = cfg["group_size"] or (1 if algo == "ppo" else 8)
    if algo == "grpo" and G < 2:
        raise UserError(f"--group_size={G}: GRPO needs at least 2 samples per prompt")
    if cfg["batch_size"] < G or cfg["batch_size"] % G:
        raise UserError(f"--batch_size={cfg['batch_size']} must be a multiple of --group_size={G}")
    rm_weight = cfg["rm_weight"] if cfg["rm_weight"] >= 0 else default_rm_weight
    clean_weight = cfg["clean_weight"] if cfg["clean_weight"] >= 0 else default_clean_weight
    if rm_weight == 0 and cfg["checker_weight"] == 0 and clean_weight == 0:
        raise UserError("--rm_weight, --checker_weight and --clean_weight are all 0: there is no reward")
    check_sampling(cfg["temperature"])
    if cfg["advantage_scale"] not in ADVANTAGE_SCALES:
        raise UserError(f"--advantage_scale must be one of {', '.join(ADVANTAGE_SCALES)}, "
                        f"got {cfg['advantage_scale']!r}")
    if cfg["temperature"] < GREEDY_BELOW:  # the log-probs are taken under logits / temperature: a real sampler
        raise UserError(f"--temperature must be >= {GREEDY_BELOW:g} for sampling rollouts, got {cfg['temperature']}")
    if cfg["ppo_epochs"] < 1 or cfg["minibatch_size"] < 1 or cfg["max_new_tokens"] < 1:
        raise UserError("--ppo_epochs, --minibatch_size and --max_new_tokens must be at least 1")
    if "RANK" in os.environ:
        raise UserError("ppo.py runs in one process (its rollouts are not split across torchrun workers)")
    return G, rm_weight, clean_weight
