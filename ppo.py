"""
Reinforcement learning from feedback: PPO with a critic, or GRPO with groups of samples, on a prompt set.

    python ppo.py                                  # PPO from checkpoints/sft with checkpoints/reward -> checkpoints/ppo
    python ppo.py --algo=grpo                      # GRPO -> checkpoints/grpo
    python ppo.py --rm_weight=0                    # verifiable rewards only: the exact answer checker (grpo's default)
    python ppo.py --algo=grpo --advantage_scale=none   # Dr. GRPO: no division by the group's std
    python ppo.py --init_from=checkpoints/dpo --finetune=lora

Each step samples responses to `batch_size` prompts (x `group_size` for GRPO) in one batched, KV-cached
generate; a response ends at the end-of-turn token, which is part of it, and nothing after it is trained on or
rewarded. Its score is rm_weight x the reward model's score + checker_weight x (1 if world.check_answer accepts
it) + clean_weight x (1 if it is a clean reply: world.is_clean_reply, rl.rule_scores) + unfinished_penalty if it
never ended; by default PPO uses the reward model and the checker, GRPO the two rules (checker and clean reply).
Rollouts sample from softmax(logits / temperature) with no top-k or top-p cut, the very distribution whose
log-probs enter the ratio and the KL (rl.sample_rollouts). Then:

PPO   per-token rewards -kl_coef x KL_t (k1: log pi - log ref; k3: exp(d) - d - 1 with d = log ref - log pi) plus
      the score at the response's last token; GAE(gamma, lam) with the critic's values; advantages whitened over
      the batch's response tokens; ppo_epochs passes over shuffled minibatches with the clipped ratio objective
      and a clipped value loss. Optional adaptive kl_coef (target_kl, Ziegler et al. 2019).
      The critic is a separate model (rl.make_critic): a shared trunk would let the value loss pull on the
      policy's features (and with LoRA the policy has few parameters to spare); it costs one more forward/backward.
GRPO  no critic: the group of group_size samples per prompt is the baseline, advantage = (score - group mean)
      divided by the group's std + 1e-4 (advantage_scale 'group', Shao et al. 2024), the batch's std ('batch') or
      nothing ('none', Dr. GRPO, Liu et al. 2025), on every token of a sample; clipped ratio; KL to the reference
      inside the loss with the k3 estimator. The loss is averaged over all response tokens of the batch
      (token-level, as in DAPO), not per sequence first: per-sequence averaging gives each token of a short
      response more weight than one of a long response, which biases the length (a long wrong answer is
      penalised less per token).

Logged every step (metrics.jsonl, reward.png): reward_mean, reward_rm, reward_checker, kl (for both algorithms the
k3 estimator of KL(policy || reference), Schulman 2020, summed over a response's tokens and averaged over the
responses), response_length, ended (share that ended with end-of-turn), clip_frac, policy_loss, value_loss (PPO),
zero_spread (GRPO: the share of groups whose samples all scored the same), kl_coef. Every eval_interval steps:
exact match and the clean-reply rate on held-out checkable prompts (greedy; at the end also eval_samples sampled
answers per prompt at the chat's settings), so reward hacking (reward up, exact match and KL going the wrong way)
shows in the log; an evaluation's reward_mean, kl and zero_spread are the means of the last 10 steps. Writes
ckpt.pt (stage 'ppo'), best.pt (best exact match), adapter.pt for LoRA, and eval_prompts.jsonl (per-prompt
verdicts of the last evaluation).
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import common
import evaluation
import prepare
import rl
import trainer
from model import disable_dropout

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
rm_weight = -1.0               # x the reward model's score; < 0 = the algorithm's default: 1 for ppo, 0 for grpo
checker_weight = 1.0           # x 1.0 for an answer the exact checker accepts (prompts with a reference answer)
clean_weight = -1.0            # x 1.0 for a clean reply (world.is_clean_reply); < 0 = the default: 0 ppo, 1 grpo
unfinished_penalty = -1.0      # added to the score of a response that never says end-of-turn
# rollouts
batch_size = 64                # responses sampled per step (grpo: batch_size / group_size prompts: 8 x 8)
group_size = 0                 # samples per prompt; 0 = 1 for ppo, 8 for grpo
max_new_tokens = 40            # response length limit
temperature = 1.0              # rollouts sample softmax(logits / T), uncut: no top-k/top-p (rl.sample_rollouts)
# the objective
kl_coef = 0.0                  # 0 = the algorithm's default: 0.05 for ppo (in the reward), 0.04 for grpo (in the loss)
kl_estimator = 'k1'            # ppo's penalty in the reward: k1 | k3 (grpo's loss always uses k3; the logged kl is k3)
adaptive_kl = False            # ppo: adapt kl_coef towards target_kl
target_kl = 2.0                # per response, summed over its tokens
kl_horizon = 1000
gamma = 1.0
lam = 0.95
advantage_scale = 'group'      # grpo: group | batch | none (Dr. GRPO): what (score - group mean) is divided by
clip_range = 0.2
value_clip = 0.2
vf_coef = 0.5
ppo_epochs = 2
minibatch_size = 16            # rollouts per optimizer step (grpo: several groups)
# optimization
max_iters = 0                  # rollout steps; 0 = the algorithm's default: 50 ppo, 100 grpo (see README, "RL defaults")
learning_rate = 0.0            # 0 = the default: full weights 1e-5 ppo, 3e-5 grpo; lora/qlora 2e-4
critic_learning_rate = 1e-4
min_lr = 0.0                   # 0 = learning_rate / 10
warmup_iters = 5
lr_decay_iters = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation
eval_interval = 50
log_interval = 1
eval_prompts = 640             # held-out checkable prompts scored per evaluation (the default data: all 640; 0 = none)
eval_max_new_tokens = 40
eval_samples = 4               # sampled answers per held-out prompt (chat settings), final evaluation only; 0 = none
n_samples = 4
# system
device = 'auto'
dtype = 'auto'
compile = False                # True: compiled rollout decoding, but the update's shapes change every step (recompiles)
grad_checkpoint = False        # recompute each block and the head's logits in backward: less memory, more time
seed = 1337
# -----------------------------------------------------------------------------

# measured on the embedded world (README, "Results"): PPO at 3e-5 lost greedy exact match to reward-model hacking
# (-1.4 points on seed 1337, KL 1.1) where 1e-5 kept it (+0.5) and removed the flaws as well; it does so within 50
# steps (clean replies 88.6% -> 99.8% at step 50), so PPO's budget is half GRPO's
DEFAULT_LR = {"ppo": {"full": 1e-5, "lora": 2e-4, "qlora": 2e-4}, "grpo": {"full": 3e-5, "lora": 2e-4, "qlora": 2e-4}}
DEFAULT_MAX_ITERS = {"ppo": 50, "grpo": 100}
DEFAULT_KL_COEF = {"ppo": 0.05, "grpo": 0.04}
DEFAULT_RM_WEIGHT = {"ppo": 1.0, "grpo": 0.0}  # GRPO learns from rules alone (checker, clean reply): nothing to hack
# the checker cannot see the language of a number's answer ('48 - 12 = 36' answers a Chinese question too): GRPO
# without a reward model needs the rule that a reply is clean; PPO's reward model learned it from the pairs
DEFAULT_CLEAN_WEIGHT = {"ppo": 0.0, "grpo": 1.0}
# step-record means (last 10 steps) that join each evaluation's metrics
SUMMARY_KEYS = {"ppo": ("reward_mean", "kl"), "grpo": ("reward_mean", "kl", "zero_spread")}


def main():
    cfg = common.configure(globals())
    G, rm_w, clean_w = rl.check_settings(cfg, DEFAULT_RM_WEIGHT.get(algo, 0.0), DEFAULT_CLEAN_WEIGHT.get(algo, 0.0))
    cfg["group_size"], cfg["rm_weight"], cfg["clean_weight"] = G, rm_w, clean_w
    cfg["out_dir"] = out = out_dir or os.path.join("checkpoints", algo)
    cfg["kl_coef"] = kl_coef or DEFAULT_KL_COEF[algo]
    lr = cfg["learning_rate"] = learning_rate or DEFAULT_LR[algo][finetune]
    n_steps = cfg["max_iters"] = max_iters or DEFAULT_MAX_ITERS[algo]
    rt = common.setup(device, dtype, seed, compile)
    dev = rt.device

    policy, tokenizer, init, resume_from, trainable = trainer.init_finetune(cfg, "ppo", ("sft", "dpo", "ppo"))
    # no dropout: the update's log-probs are compared with the rollout's (ratio 1 before any update) and the
    # reference's, and the critic's values with the rollout's (value clipping)
    disable_dropout(policy).to(dev)
    reference = trainer.frozen_reference(policy, init, finetune, dev)
    rm = rl.load_reward_model(reward_from, dev, tokenizer) if rm_w else None
    critic = (disable_dropout(rl.make_critic(init, rm, resume_from and resume_from["critic"])).to(dev)
              if algo == "ppo" else None)
    del init  # the starting checkpoint's state dict: a LoRA/QLoRA run must not keep an fp32 copy alive

    prompts = prepare.load_prompts(dataset, "train")
    max_prompt = cfg["block_size"] - max_new_tokens
    if max_prompt < 2:
        raise common.UserError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                                f"--block_size={cfg['block_size']}")
    optimizer = trainer.make_optimizer(policy, lr, weight_decay, (beta1, beta2), rt.device_type)
    critic_opt = (trainer.make_optimizer(critic, critic_learning_rate, weight_decay, (beta1, beta2), rt.device_type)
                  if critic is not None else None)
    # the run's state beyond the loop's: the adaptive KL coefficient (not the measured KL, logged as `kl`)
    run = {"kl_coef": cfg["kl_coef"], "exact_match_start": None}
    if resume_from is not None:
        if critic_opt is not None:
            critic_opt.load_state_dict(resume_from["critic_optimizer"])
        run["kl_coef"] = resume_from.get("kl_coef", resume_from.get("kl"))  # "kl": checkpoints before the rename
        run["exact_match_start"] = resume_from["metrics"].get("exact_match_start")
    print(f"{algo}: {len(prompts):,} prompts, {batch_size // G} x {G} rollouts per step, up to {max_new_tokens} tokens | "
          f"{finetune}: {trainable} | lr {lr:g} | reward: " + " + ".join(
              ([f"{rm_w:g} x reward model"] if rm else []) + ([f"{checker_weight:g} x checker"]
                                                                  if checker_weight else [])
              + ([f"{clean_w:g} x clean reply"] if clean_w else []))
          + f" | kl_coef {run['kl_coef']:g}")

    def policy_logps(seqs, resp_mask, train):
        policy.train(train)  # aux_loss: MoE balancing (0 for a dense model or in eval mode)
        return rl.response_logps(policy, seqs, resp_mask, temperature)

    @torch.no_grad()
    def rollout(k):
        """Sample responses for prompt batch k; everything the update needs, right-padded (B, T)."""
        pick = trainer.shuffled_batch(len(prompts), batch_size // G, k, seed)
        rows = [prompts[i] for i in pick for _ in range(G)]
        prompt_ids = [r["ids"][-max_prompt:] for r in rows]
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + k)  # a pure function of the step: resume
        replies, responses, seq_t, resp_mask = rl.sample_rollouts(policy, tokenizer, prompt_ids, max_new_tokens, dev,
                                                                  temperature, gen, rt.autocast, rt.compile)
        seq_t, resp_mask = seq_t.to(dev), resp_mask.to(dev)
        ended = torch.tensor([r.stop == tokenizer.end_id for r in replies], device=dev, dtype=torch.float32)
        checker, clean = (t.to(dev) for t in rl.rule_scores([r.text for r in replies], rows))
        rm_scores = torch.zeros(len(rows), device=dev)
        if rm is not None:
            rm_scores = rl.reward_scores(rm, prompt_ids, responses, tokenizer.pad_id, dev, rt.autocast)
        scores = rm_w * rm_scores + checker_weight * checker + clean_w * clean + unfinished_penalty * (1 - ended)
        with rt.autocast:
            old_logps, _ = policy_logps(seq_t, resp_mask, train=False)
            ref_logps, _ = rl.response_logps(reference, seq_t, resp_mask, temperature)
            values = None
            if critic is not None:
                critic.eval()
                # the value of the state before each token: the critic's output one position earlier
                values = F.pad(critic(seq_t)[0][:, :-1], (1, 0)) * resp_mask
        return dict(seqs=seq_t, resp_mask=resp_mask, old_logps=old_logps, ref_logps=ref_logps, values=values,
                    scores=scores, rm_scores=rm_scores, checker=checker, clean=clean, ended=ended,
                    lengths=torch.tensor([len(r) for r in responses], device=dev, dtype=torch.float32),
                    has_answer=torch.tensor([row.get("answer") is not None for row in rows], device=dev))

    def update(opt, params, loss):
        rt.scaler.scale(loss).backward()
        rt.scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
        rt.scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        return norm.item()

    def rl_step(step, stop):
        """One rollout batch, then ppo_epochs passes of clipped updates over it: train()'s step_fn."""
        batch = rollout(step)
        mask = batch["resp_mask"]
        # per-token KL of the sampled tokens against the reference: k3 is the logged `kl` of both algorithms;
        # PPO's penalty in the reward uses --kl_estimator
        kl_tokens = rl.kl_estimate(batch["old_logps"], batch["ref_logps"], "k3")
        if algo == "ppo":
            penalty = rl.kl_estimate(batch["old_logps"], batch["ref_logps"], kl_estimator)
            rewards = rl.token_rewards(batch["scores"], penalty, mask, run["kl_coef"])
            advantages, returns = rl.gae(rewards, batch["values"], mask, gamma, lam)
            advantages = rl.whiten(advantages, mask)
        else:
            advantages, returns = rl.grpo_advantages(batch["scores"], G, advantage_scale)[:, None] * mask, None
        # shuffled minibatches (GRPO: whole groups stay together in one minibatch)
        unit = G if algo == "grpo" else 1
        mb_units = max(1, minibatch_size // unit)
        stats = {"policy_loss": [], "clip_frac": [], "value_loss": [], "grad_norm": []}
        rng = np.random.default_rng([seed, step])
        policy_params = [p for p in policy.parameters() if p.requires_grad]
        for _ in range(ppo_epochs):
            order = rng.permutation(batch["seqs"].shape[0] // unit)
            for start in range(0, len(order), mb_units):
                rows = torch.tensor(np.concatenate([np.arange(u * unit, (u + 1) * unit)
                                                    for u in order[start:start + mb_units]]), device=dev)
                m = mask[rows]
                with rt.autocast:
                    logps, aux_loss = policy_logps(batch["seqs"][rows], m, train=True)
                    pg, clip_frac = rl.clipped_policy_loss(logps, batch["old_logps"][rows], advantages[rows], m,
                                                           clip_range)
                    loss = pg + aux_loss
                    if algo == "grpo":
                        kl = rl.kl_estimate(logps, batch["ref_logps"][rows], "k3")  # the measured KL, per token
                        loss = loss + run["kl_coef"] * rl.masked_mean(kl, m)
                trainer.check_finite(loss.item(), "the policy loss", step + 1, out)
                stats["grad_norm"].append(update(optimizer, policy_params, loss))
                stats["policy_loss"].append(pg.item())
                stats["clip_frac"].append(clip_frac.item())
                if critic is not None:
                    critic.train()
                    with rt.autocast:
                        v, _, critic_aux = critic(batch["seqs"][rows])
                        vloss = vf_coef * rl.clipped_value_loss(F.pad(v[:, :-1], (1, 0)), batch["values"][rows],
                                                                returns[rows], m, value_clip) + critic_aux
                    update(critic_opt, list(critic.parameters()), vloss)
                    stats["value_loss"].append(vloss.item())
                rt.scaler.update()  # once per minibatch, after every optimizer it scaled for

        mean_kl = (kl_tokens * mask).sum(1).mean().item()  # per response, summed over its tokens
        record = {"reward_mean": batch["scores"].mean().item(), "kl": mean_kl,
                  "response_length": batch["lengths"].mean().item(), "ended": batch["ended"].mean().item(),
                  "kl_coef": run["kl_coef"], **{k: float(np.mean(v)) for k, v in stats.items() if v}}
        if algo == "grpo":
            record["zero_spread"] = rl.zero_spread_share(batch["scores"], G)
        if rm is not None:
            record["reward_rm"] = batch["rm_scores"].mean().item()
        if bool(batch["has_answer"].any()):
            record["reward_checker"] = batch["checker"][batch["has_answer"]].mean().item()
        if clean_w:
            record["reward_clean"] = batch["clean"].mean().item()
        trainer.check_finite(record["reward_mean"], "the mean reward", step + 1, out)
        if algo == "ppo" and adaptive_kl:  # proportional controller towards target_kl (Ziegler et al.)
            error = max(-0.2, min(0.2, mean_kl / target_kl - 1))
            run["kl_coef"] *= 1 + error * batch_size / kl_horizon
        return record, int(mask.numel()), bool(stop.signum)  # tokens: the padded batch of prompts + responses

    exact_match = evaluation.ExactMatchEval(dataset, tokenizer, rt, eval_prompts, eval_max_new_tokens, n_samples,
                                         eval_samples, n_steps, out, seed)

    def evaluate(model, metrics):
        result = exact_match(model, metrics)
        if run["exact_match_start"] is None:  # the model this run started from
            run["exact_match_start"] = result.get("exact_match")
        if run["exact_match_start"] is not None:
            result["exact_match_start"] = run["exact_match_start"]
        return result

    def train_state():  # the run's state beyond the loop's, for --resume=True
        return {"kl_coef": run["kl_coef"], **({} if critic is None else {"critic": critic.state_dict(),
                                                                         "critic_optimizer": critic_opt.state_dict()})}

    metrics = trainer.train(policy, None, None, cfg, rt, stage="ppo", name=algo, step_fn=rl_step, optimizer=optimizer,
                            checkpoint_entries=lambda: trainer.model_entries(policy, tokenizer), evaluate=evaluate,
                            resume_from=resume_from, train_state=train_state, best_metric="exact_match",
                            higher_is_better=True, summary_keys=SUMMARY_KEYS[algo], png="reward.png",
                            log_panels=(("reward_mean", "reward_checker", "reward_rm", "reward_clean"), ("exact_match",), ("kl",)))
    trainer.finish_finetune(policy, out, "ppo", exact_match.samples, metrics)


if __name__ == "__main__":
    common.cli(main)
