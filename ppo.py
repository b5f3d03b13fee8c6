"""
Reinforcement learning from feedback: PPO with a critic, or GRPO with groups of samples, on a prompt set.

    python ppo.py                                  # PPO from checkpoints/sft with checkpoints/reward -> checkpoints/ppo
    python ppo.py --algo=grpo                      # GRPO -> checkpoints/grpo
    python ppo.py --rm_weight=0 --checker_weight=1 # verifiable rewards only: the exact answer checker
    python ppo.py --init_from=checkpoints/dpo --finetune=lora

Each step samples responses to `batch_size` prompts (x `group_size` for GRPO) in one batched, KV-cached
generate; a response ends at the end-of-turn token, which is part of it, and nothing after it is trained on or
rewarded. Its score is rm_weight x the reward model's score + checker_weight x (1 if world.check_answer accepts
it) + unfinished_penalty if it never ended. Then:

PPO   per-token rewards -kl_coef x KL_t (k1: log pi - log ref; k3: exp(d) - d - 1 with d = log ref - log pi) plus
      the score at the response's last token; GAE(gamma, lam) with the critic's values; advantages whitened over
      the batch's response tokens; ppo_epochs passes over shuffled minibatches with the clipped ratio objective
      and a clipped value loss. Optional adaptive kl_coef (target_kl, Ziegler et al. 2019).
      The critic is a separate model (model.ScoreModel: a trunk and a scalar head), started from the reward model
      when one is used (its score of a partial response is already a guess of the final one) and else from the
      policy's checkpoint with a zero head. Separate, because a shared trunk lets the value loss pull on the
      policy's features (and with LoRA the policy has few parameters to spare); it costs one more forward/backward.
GRPO  no critic: the group of group_size samples per prompt is the baseline, advantage = (score - group mean) /
      (group std + 1e-4) (unbiased std) on every token of a sample; clipped ratio; KL to the reference inside the
      loss with the k3 estimator. The loss is averaged over all response tokens of the batch (token-level, as in
      DAPO), not per sequence first: per-sequence averaging gives each token of a short response more weight than
      one of a long response, which biases the length (a long wrong answer is penalised less per token).

Logged every step (metrics.jsonl, loss.png): reward_mean, reward_rm, reward_checker, kl (per response, summed over
its tokens), response_length, ended (share that ended with end-of-turn), clip_frac, policy_loss, value_loss (PPO),
kl_coef. Every eval_interval steps: exact match on held-out checkable prompts (greedy), so reward hacking (reward up,
exact match and KL going the wrong way) shows in the log. Writes ckpt.pt (stage 'ppo'), best.pt (best exact
match), adapter.pt for LoRA.
"""
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import lora
import prepare
import trainer
import world
from model import ScoreModel, left_pad

# -----------------------------------------------------------------------------
dataset = 'world'
init_from = 'checkpoints/sft'  # the policy to start from (SFT or DPO) and the frozen reference
out_dir = ''                   # '' = checkpoints/<algo>
resume = False
block_size = 0                 # 0 = the model's context
algo = 'ppo'                   # ppo | grpo
finetune = 'full'              # full | lora | qlora
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.0
lora_head = False
# rewards
reward_from = 'checkpoints/reward'   # the reward model, used when rm_weight > 0
rm_weight = 1.0                # x the reward model's score
checker_weight = 1.0           # x 1.0 for an answer the exact checker accepts (prompts with a reference answer)
unfinished_penalty = -1.0      # added to the score of a response that never says end-of-turn
# rollouts
batch_size = 32                # responses sampled per step (grpo: batch_size / group_size prompts)
group_size = 0                 # samples per prompt; 0 = 1 for ppo, 8 for grpo
max_new_tokens = 40            # response length limit
temperature = 1.0
top_k = 0                      # 0 = sample from the whole distribution
# the objective
kl_coef = 0.0                  # 0 = the algorithm's default: 0.05 for ppo (in the reward), 0.04 for grpo (in the loss)
kl_estimator = 'k1'            # ppo: k1 | k3 (grpo always uses k3)
adaptive_kl = False            # ppo: adapt kl_coef towards target_kl
target_kl = 2.0                # per response, summed over its tokens
kl_horizon = 1000
gamma = 1.0
lam = 0.95
clip_range = 0.2
value_clip = 0.2
vf_coef = 0.5
ppo_epochs = 2
minibatch_size = 16            # rollouts per optimizer step (grpo: several groups)
# optimization
max_iters = 60                 # rollout steps
learning_rate = 0.0            # 0 = the finetune mode's default: 1e-5 full, 2e-4 lora/qlora
critic_learning_rate = 1e-4
min_lr = 0.0                   # 0 = learning_rate / 10
warmup_iters = 5
lr_decay_iters = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation
eval_interval = 20
log_interval = 1
eval_prompts = 640             # held-out checkable prompts scored per evaluation (the default data: all 640; 0 = none)
eval_max_new_tokens = 40
n_samples = 4
# system
device = 'auto'
dtype = 'auto'
compile = False                # rollouts change shape every step: compiling would recompile often
seed = 1337
# -----------------------------------------------------------------------------

DEFAULT_LR = {"full": 1e-5, "lora": 2e-4, "qlora": 2e-4}
DEFAULT_KL = {"ppo": 0.05, "grpo": 0.04}


# ----------------------------------------------------------------------------------------------------------------
# the estimators (pure functions, checked against hand-computed values in tests/test_ppo.py)

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


def grpo_advantages(scores, group_size, eps=1e-4):
    """(n_prompts * group_size,) scores, each prompt's samples consecutive -> (score - group mean) / (group std +
    eps), with the unbiased std: a group whose samples all score the same gets 0 (nothing to learn from it)."""
    groups = scores.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)).view(-1)


def kl_estimate(logp, ref_logp, kind):
    """Per-token estimate of KL(pi || ref) from a token sampled from pi: k1 = log pi - log ref (unbiased, can be
    negative), k3 = exp(d) - d - 1 with d = log ref - log pi (unbiased, always >= 0, lower variance; Schulman)."""
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


def cut_response(tokens, special_ids, end_id):
    """Generated ids -> (the response: everything up to and including the first special token, which ends it; was
    that token the end-of-turn). What generate wrote after it (padding) is not part of the response."""
    cut = next((j for j, t in enumerate(tokens) if t in special_ids), None)
    if cut is None:
        return list(tokens), False
    return list(tokens[:cut + 1]), tokens[cut] == end_id


def clipped_value_loss(values, old_values, returns, mask, clip):
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), averaged over the masked tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ----------------------------------------------------------------------------------------------------------------

def response_logps(logits, seqs, resp_mask, temperature):
    """Log-probabilities of each token under logits / temperature (the distribution it was sampled from), as (B, T)
    aligned with seqs: entry t is log p(seqs[t] | seqs[:t]); entry 0 is 0. Only response entries are used."""
    logps = trainer.token_logps(logits[:, :-1] / temperature, seqs[:, 1:])
    return torch.nn.functional.pad(logps, (1, 0)) * resp_mask


def main():
    cfg = trainer.configure(globals())
    if algo not in ("ppo", "grpo"):
        raise trainer.UserError(f"--algo must be ppo or grpo, got {algo!r}")
    if kl_estimator not in ("k1", "k3"):
        raise trainer.UserError(f"--kl_estimator must be k1 or k3, got {kl_estimator!r}")
    G = group_size or (1 if algo == "ppo" else 8)
    if algo == "grpo" and G < 2:
        raise trainer.UserError(f"--group_size={G}: GRPO needs at least 2 samples per prompt")
    if batch_size < G or batch_size % G:
        raise trainer.UserError(f"--batch_size={batch_size} must be a multiple of --group_size={G}")
    if rm_weight == 0 and checker_weight == 0:
        raise trainer.UserError("--rm_weight and --checker_weight are both 0: there is no reward")
    if temperature <= 0:
        raise trainer.UserError(f"--temperature must be > 0 for sampling rollouts, got {temperature}")
    if ppo_epochs < 1 or minibatch_size < 1 or max_new_tokens < 1:
        raise trainer.UserError("--ppo_epochs, --minibatch_size and --max_new_tokens must be at least 1")
    if "RANK" in os.environ:
        raise trainer.UserError("ppo.py runs in one process (its rollouts are not split across torchrun workers)")
    cfg["out_dir"] = out = out_dir or os.path.join("checkpoints", algo)
    cfg["group_size"] = G
    cfg["kl_coef"] = kl = kl_coef or DEFAULT_KL[algo]
    lr = cfg["learning_rate"] = learning_rate or DEFAULT_LR[finetune]
    rt = trainer.setup(device, dtype, seed, compile)
    dev = rt.device

    policy, tokenizer, init, resume_from, trainable = trainer.init_finetune(cfg, "ppo", ("sft", "dpo", "ppo"))
    policy.to(dev)
    reference = None
    if finetune == "full":
        reference, _ = trainer.model_from_checkpoint(init, dev)
        reference.requires_grad_(False)

    rm = None
    if rm_weight:
        rm, rm_tok = trainer.load_reward_model(reward_from, dev)
        if rm_tok.to_json() != tokenizer.to_json():
            raise trainer.UserError(f"{reward_from}: its tokenizer differs from {init_from}'s")
        rm.requires_grad_(False)
    critic = None
    if algo == "ppo":
        critic = ScoreModel(policy.config)
        if resume_from is not None:
            critic.load_state_dict(resume_from["critic"])
        elif rm is not None:
            critic.load_state_dict(rm.state_dict())
        else:
            critic.gpt.load_state_dict(init["model"])
        critic.to(dev).train()

    prompts = prepare.load_prompts(dataset, "train")
    max_prompt = cfg["block_size"] - max_new_tokens
    if max_prompt < 2:
        raise trainer.UserError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                                f"--block_size={cfg['block_size']}")
    optimizer = trainer.make_optimizer(policy, lr, weight_decay, (beta1, beta2), rt.device_type)
    critic_opt = (trainer.make_optimizer(critic, critic_learning_rate, weight_decay, (beta1, beta2), rt.device_type)
                  if critic is not None else None)
    step, best, metrics, tokens = 0, None, {}, 0
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        if critic_opt is not None:
            critic_opt.load_state_dict(resume_from["critic_optimizer"])
        step, best, metrics, kl = resume_from["step"], resume_from["best"], resume_from["metrics"], resume_from["kl"]
        tokens = resume_from["data_position"]["tokens_seen"]
        trainer.set_rng_state(resume_from["rng"])
    log = trainer.MetricsLog(out, resume_step=step if resume_from is not None else None, title=f"{algo}: {out}",
                             panels=(("reward_mean", "reward_checker", "reward_rm"), ("exact_match",), ("kl",)),
                             png="reward.png")
    evaluate = trainer.ExactMatchEval(dataset, tokenizer, rt, eval_prompts, eval_max_new_tokens, n_samples)
    stop_ids = sorted(tokenizer.special_ids)
    print(f"{algo}: {len(prompts):,} prompts, {batch_size // G} x {G} rollouts per step, up to {max_new_tokens} tokens | "
          f"{finetune}: {trainable} | lr {lr:g} | reward: " + " + ".join(
              ([f"{rm_weight:g} x reward model"] if rm else []) + ([f"{checker_weight:g} x checker"]
                                                                  if checker_weight else [])) + f" | kl_coef {kl:g}")

    def policy_logps(seqs, resp_mask, train):
        policy.train(train)
        logits, aux_loss = policy(seqs)  # aux_loss: MoE balancing (0 for a dense model or in eval mode)
        return response_logps(logits, seqs, resp_mask, temperature), aux_loss

    @torch.no_grad()
    def reference_logps(seqs, resp_mask):
        if reference is not None:
            return response_logps(reference(seqs)[0], seqs, resp_mask, temperature)
        policy.eval()
        with lora.disable_adapters(policy):
            return response_logps(policy(seqs)[0], seqs, resp_mask, temperature)

    @torch.no_grad()
    def rollout(k):
        """Sample responses for prompt batch k; everything the update needs, right-padded (B, T)."""
        pick = trainer.shuffled_batch(len(prompts), batch_size // G, k, seed)
        rows = [prompts[i] for i in pick for _ in range(G)]
        prompt_ids = [r["ids"][-max_prompt:] for r in rows]
        idx, attn = left_pad(prompt_ids, tokenizer.pad_id)
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + k)  # a pure function of the step: resume
        policy.eval()
        with rt.autocast:
            out = policy.generate(idx.to(dev), max_new_tokens, temperature=temperature, top_k=top_k or None,
                                  stop_tokens=stop_ids, attention_mask=attn.to(dev), pad_id=tokenizer.pad_id,
                                  generator=gen)
        new = out[:, idx.shape[1]:].tolist()
        responses, ended = zip(*(cut_response(t, tokenizer.special_ids, tokenizer.end_id) for t in new))
        seqs = [p + r for p, r in zip(prompt_ids, responses)]
        seq_t = trainer.pad_right(seqs, tokenizer.pad_id).to(dev)
        resp_mask = trainer.pad_right([[0] * len(p) + [1] * len(r) for p, r in zip(prompt_ids, responses)],
                                      0).to(dev).float()
        # the score of each response
        text = [tokenizer.decode([t for t in r if t not in tokenizer.special_ids]) for r in responses]
        checker = torch.tensor([float(world.check_answer(t, row["answer"], row.get("task")))
                                if row.get("answer") is not None else 0.0 for t, row in zip(text, rows)], device=dev)
        rm_scores = torch.zeros(len(rows), device=dev)
        if rm is not None:
            rm_scores = trainer.reward_scores(rm, prompt_ids, responses, tokenizer.pad_id, dev, rt.autocast)
        ended_t = torch.tensor(ended, device=dev, dtype=torch.float32)
        scores = rm_weight * rm_scores + checker_weight * checker + unfinished_penalty * (1 - ended_t)
        with rt.autocast:
            old_logps, _ = policy_logps(seq_t, resp_mask, train=False)
            ref_logps = reference_logps(seq_t, resp_mask)
            values = None
            if critic is not None:
                critic.eval()
                # the value of the state before each token: the critic's output one position earlier
                values = torch.nn.functional.pad(critic(seq_t)[0][:, :-1], (1, 0)) * resp_mask
        return dict(seqs=seq_t, resp_mask=resp_mask, old_logps=old_logps, ref_logps=ref_logps, values=values,
                    scores=scores, rm_scores=rm_scores, checker=checker, ended=ended_t,
                    lengths=torch.tensor([len(r) for r in responses], device=dev, dtype=torch.float32),
                    has_answer=[row.get("answer") is not None for row in rows])

    def save(path, training_state):
        obj = trainer.model_entries(policy, tokenizer)
        obj.update(stage="ppo", train_config=dict(cfg), metrics=metrics, step=step)
        if training_state:
            obj.update(optimizer=optimizer.state_dict(), rng=trainer.rng_state(), best=best, kl=kl,
                       data_position={"next_k": step, "tokens_seen": tokens})
            if critic is not None:
                obj.update(critic=critic.state_dict(), critic_optimizer=critic_opt.state_dict())
        trainer.save_checkpoint(path, obj)

    history = []  # the per-step records since the last evaluation

    def eval_and_save():
        nonlocal metrics, best, start_em
        result = evaluate(policy)
        if start_em is None:  # the model this run started from
            start_em = result.get("exact_match")
        recent = history[-10:]  # the last steps' rollouts
        summary = {k: float(np.mean([h[k] for h in recent])) for k in ("reward_mean", "kl")} if recent else {}
        metrics = {**result, **summary}
        if start_em is not None:
            metrics["exact_match_start"] = start_em
        log.log({"step": step, **{k: v for k, v in result.items() if not isinstance(v, dict)},
                 "exact_match_by_task": result.get("exact_match_by_task")})
        log.plot()
        tqdm.write(f"step {step}: exact_match {result.get('exact_match', float('nan')):.4f}"
                   + "".join(f", {k} {v:.4f}" for k, v in summary.items()))
        value = result.get("exact_match", -step)  # without checkable prompts: the last is the best
        improved = best is None or value > best
        if improved:
            best = value
        save(os.path.join(out, "ckpt.pt"), training_state=True)
        if improved:
            save(os.path.join(out, "best.pt"), training_state=False)

    start_em = resume_from["metrics"].get("exact_match_start") if resume_from is not None else None
    bar = tqdm(total=max_iters, initial=step, desc=algo, dynamic_ncols=True, file=sys.stderr)
    with trainer.GracefulStop() as stop, bar:
        if resume_from is None:
            eval_and_save()
        while step < max_iters:
            t0 = time.perf_counter()
            cur_lr = trainer.lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            batch = rollout(step)
            mask = batch["resp_mask"]
            # per-token KL of the sampled tokens against the reference (the reward's penalty for PPO; a metric here)
            kl_tokens = kl_estimate(batch["old_logps"], batch["ref_logps"], kl_estimator if algo == "ppo" else "k3")
            kl_seq = (kl_tokens * mask).sum(1)
            if algo == "ppo":
                rewards = token_rewards(batch["scores"], kl_tokens, mask, kl)
                advantages, returns = gae(rewards, batch["values"], mask, gamma, lam)
                advantages = whiten(advantages, mask)
            else:
                advantages = grpo_advantages(batch["scores"], G)[:, None] * mask
                returns = None

            # ppo_epochs passes over shuffled minibatches (GRPO: whole groups stay together in one minibatch)
            n = batch["seqs"].shape[0]
            unit = G if algo == "grpo" else 1
            mb_units = max(1, minibatch_size // unit)
            stats = {"policy_loss": [], "clip_frac": [], "value_loss": [], "grad_norm": []}
            rng = np.random.default_rng([seed, step])
            for _ in range(ppo_epochs):
                order = rng.permutation(n // unit)
                for start in range(0, len(order), mb_units):
                    rows = torch.tensor(np.concatenate([np.arange(u * unit, (u + 1) * unit)
                                                        for u in order[start:start + mb_units]]), device=dev)
                    m = mask[rows]
                    with rt.autocast:
                        logps, aux_loss = policy_logps(batch["seqs"][rows], m, train=True)
                        pg, clip_frac = clipped_policy_loss(logps, batch["old_logps"][rows], advantages[rows], m,
                                                            clip_range)
                        loss = pg + aux_loss
                        if algo == "grpo":
                            loss = loss + kl * masked_mean(kl_estimate(logps, batch["ref_logps"][rows], "k3"), m)
                    trainer.check_finite(loss.item(), "the policy loss", step + 1, out)
                    rt.scaler.scale(loss).backward()
                    rt.scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad],
                                                          grad_clip or math.inf)
                    rt.scaler.step(optimizer)
                    optimizer.zero_grad(set_to_none=True)
                    stats["policy_loss"].append(pg.item())
                    stats["clip_frac"].append(clip_frac.item())
                    stats["grad_norm"].append(norm.item())
                    if critic is not None:
                        critic.train()
                        with rt.autocast:
                            v, _, critic_aux = critic(batch["seqs"][rows])
                            v = torch.nn.functional.pad(v[:, :-1], (1, 0))
                            vloss = vf_coef * clipped_value_loss(v, batch["values"][rows], returns[rows], m,
                                                                 value_clip) + critic_aux
                        rt.scaler.scale(vloss).backward()
                        rt.scaler.unscale_(critic_opt)
                        torch.nn.utils.clip_grad_norm_(critic.parameters(), grad_clip or math.inf)
                        rt.scaler.step(critic_opt)
                        critic_opt.zero_grad(set_to_none=True)
                        stats["value_loss"].append(vloss.item())
                    rt.scaler.update()  # once per iteration, after every optimizer it scaled for

            mean_kl = kl_seq.mean().item()
            if algo == "ppo" and adaptive_kl:  # proportional controller towards target_kl (Ziegler et al.)
                error = max(-0.2, min(0.2, mean_kl / target_kl - 1))
                kl *= 1 + error * batch_size / kl_horizon
            step += 1
            tokens += int(mask.shape[0] * mask.shape[1])  # the padded batch of prompts + responses
            has = torch.tensor(batch["has_answer"], device=dev)
            record = {"step": step, "reward_mean": batch["scores"].mean().item(),
                      "reward_rm": batch["rm_scores"].mean().item() if rm is not None else None,
                      "reward_checker": batch["checker"][has].mean().item() if bool(has.any()) else None,
                      "kl": mean_kl, "response_length": batch["lengths"].mean().item(),
                      "ended": batch["ended"].mean().item(), "kl_coef": kl, "lr": cur_lr, "tokens": tokens,
                      "step_s": time.perf_counter() - t0,
                      **{k: float(np.mean(v)) for k, v in stats.items() if v}}
            record = {k: v for k, v in record.items() if v is not None}
            trainer.check_finite(record["reward_mean"], "the mean reward", step, out)
            history.append(record)
            if step % log_interval == 0 or step == max_iters:
                log.log(record)
            bar.update(1)
            bar.set_postfix_str(f"reward {record['reward_mean']:.3f} kl {mean_kl:.3f} "
                                f"len {record['response_length']:.1f}")
            if step % eval_interval == 0 or step == max_iters:
                eval_and_save()
            if stop.signum:
                bar.close()
                if step % eval_interval and step != max_iters:
                    save(os.path.join(out, "ckpt.pt"), training_state=True)
                print(f"interrupted at step {step}: saved {out}/ckpt.pt; continue with --resume=True",
                      file=sys.stderr)
                raise SystemExit(128 + stop.signum)

    trainer.finish_finetune(policy, out, "ppo", evaluate.samples, metrics)


if __name__ == "__main__":
    trainer.cli(main)
