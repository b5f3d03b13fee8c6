"""
Preference learning without a reward model: DPO and its variants, on (prompt, chosen, rejected) pairs.

    python dpo.py                                   # DPO on checkpoints/sft -> checkpoints/dpo
    python dpo.py --loss_type=ipo                   # or hinge, simpo, orpo
    python dpo.py --finetune=lora                   # the reference is then the base with its adapters switched off
    python dpo.py --ref_nf4=True                    # full fine-tuning with an NF4 copy as the frozen reference

The policy starts from the SFT checkpoint; a frozen reference is the same checkpoint (a copy in eval mode, or for
LoRA/QLoRA the policy's own base with the adapters disabled, which costs no memory). A reply's log-probability is
the sum of its tokens' log-probabilities after the prompt (prompt and padding masked out), for chosen and rejected
in one forward pass. With pi = policy, ref = reference, logp summed over the reply, avg = logp / reply length:

    sigmoid  -log sigmoid(beta * h)   h = (logp_c - ref_c) - (logp_r - ref_r)     (DPO; label_smoothing = e mixes in
             e * -log sigmoid(-beta * h): conservative DPO, for noisy labels)
    ipo      (h_avg - 1 / (2 beta))^2 with h_avg from per-token averaged log-ratios                    (IPO)
             (its implicit rewards are then beta x the averaged log-ratios too, as in TRL)
    hinge    max(0, 1 - beta * h)                                                                      (SLiC)
    simpo    -log sigmoid(beta * (avg_c - avg_r) - simpo_gamma)   no reference; beta ~2                (SimPO)
    orpo     -avg_c + beta * -log sigmoid(log odds_c - log odds_r), odds = p / (1 - p), p = exp(avg)   (ORPO)

The RPO term (+ rpo_alpha x the chosen reply's per-token NLL) is on by default for sigmoid, ipo and hinge and off
for simpo and orpo, which then train exactly their papers' losses (orpo already holds the NLL; simpo has none);
--rpo_alpha set explicitly applies to every loss type.

Metrics (held-out pairs): pref_accuracy (the implicit reward beta * (logp - ref) of chosen above rejected; ties
count half, so the starting point is 0.5), reward_margin, reward_chosen/rejected, logp_pref_accuracy (the policy
itself gives chosen the higher log-probability: comparable with the SFT model, where it is measured at step 0),
kl (the exact KL(policy || reference) summed over the tokens of the held-out chosen replies), and greedy and
sampled exact match and clean-reply rate on held-out checkable prompts as in SFT. Writes ckpt.pt (stage 'dpo'),
best.pt, adapter.pt for LoRA, metrics.jsonl, loss.png to out_dir.
"""
import torch
import torch.nn.functional as F

import common
import evaluation
import prepare
import trainer
from model import disable_dropout

# -----------------------------------------------------------------------------
dataset = 'world'
init_from = 'checkpoints/sft'  # the policy to start from, and the frozen reference
out_dir = 'checkpoints/dpo'
resume = False
block_size = 0                 # 0 = the model's context
finetune = 'full'              # full | lora | qlora
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.0
lora_head = False
ref_nf4 = False                # full fine-tuning: keep the reference copy in NF4 (~4.13 bits per weight)
# the loss
loss_type = 'sigmoid'          # sigmoid | ipo | hinge | simpo | orpo
beta = 0.0                     # 0 = the loss type's default: 0.1 (sigmoid, ipo, hinge, orpo), 2.0 (simpo)
label_smoothing = 0.0          # sigmoid: the assumed share of flipped labels (conservative DPO)
simpo_gamma = 0.5              # simpo: the target margin
rpo_alpha = -1.0               # + rpo_alpha x the chosen reply's per-token NLL (RPO): keeps chosen likely;
#                                < 0 = the loss type's default: 1.0 (sigmoid, ipo, hinge), 0 (simpo, orpo)
# optimization
max_iters = 150
batch_size = 16                # pairs per micro-batch, per process (2x sequences in the forward pass)
grad_accum = 1
learning_rate = 0.0            # 0 = the finetune mode's default: 1e-4 for full, 5e-4 for lora and qlora
min_lr = 0.0                   # 0 = learning_rate / 10
warmup_iters = 10
lr_decay_iters = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation
eval_interval = 50
eval_iters = 25                # val batches per evaluation (the held-out pairs in order)
log_interval = 10
eval_prompts = 640             # held-out checkable prompts scored per evaluation (the default data: all 640; 0 = none)
eval_max_new_tokens = 40
eval_samples = 4               # sampled answers per held-out prompt (chat settings), final evaluation only; 0 = none
n_samples = 4
# system
device = 'auto'
dtype = 'auto'
compile = 'auto'
grad_checkpoint = False        # recompute each block and the head's logits in backward: less memory, more time
seed = 1337
# -----------------------------------------------------------------------------

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
NEEDS_REFERENCE = ("sigmoid", "ipo", "hinge")
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1}
# ORPO's loss already holds the chosen reply's NLL (Hong et al. 2024) and SimPO has none (Meng et al. 2024): an RPO
# term on top would train another objective than the paper's
DEFAULT_RPO_ALPHA = {"sigmoid": 1.0, "ipo": 1.0, "hinge": 1.0, "simpo": 0.0, "orpo": 0.0}
DEFAULT_LR = {"full": 1e-4, "lora": 5e-4, "qlora": 5e-4}


def preference_loss(loss_type, logp_c, logp_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing=0.0, gamma=0.5):
    """Per-pair losses and the implicit rewards of chosen and rejected, each (B,). logp_*/ref_*: summed reply
    log-probabilities under the policy and the reference (ref_* unused by simpo and orpo); n_*: reply lengths.
    The rewards are beta x the log-ratios the loss uses: summed (sigmoid, hinge), per-token averaged (ipo, as in
    TRL), per-token averaged log-probabilities (simpo, orpo). Formulas: the module docstring."""
    if loss_type in NEEDS_REFERENCE:
        h = (logp_c - ref_c) - (logp_r - ref_r)
        if loss_type == "sigmoid":
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        elif loss_type == "ipo":
            ratio_c, ratio_r = (logp_c - ref_c) / n_c, (logp_r - ref_r) / n_r
            losses = (ratio_c - ratio_r - 1 / (2 * beta)) ** 2
            return losses, beta * ratio_c.detach(), beta * ratio_r.detach()
        else:
            losses = F.relu(1 - beta * h)
        return losses, beta * (logp_c - ref_c).detach(), beta * (logp_r - ref_r).detach()
    avg_c, avg_r = logp_c / n_c, logp_r / n_r
    if loss_type == "simpo":
        losses = -F.logsigmoid(beta * (avg_c - avg_r) - gamma)
    elif loss_type == "orpo":
        # log odds = log p - log(1 - p) with log p = avg <= 0; log1p(-exp(x)) is the stable log(1 - e^x)
        log_odds = (avg_c - avg_r) - (torch.log1p(-avg_c.exp().clamp(max=1 - 1e-6))
                                      - torch.log1p(-avg_r.exp().clamp(max=1 - 1e-6)))
        losses = -avg_c - beta * F.logsigmoid(log_odds)
    else:
        raise common.UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return losses, beta * avg_c.detach(), beta * avg_r.detach()


def resolve_rpo_alpha(loss_type, rpo_alpha):
    """The RPO weight a run trains with: rpo_alpha when set (>= 0), else the loss type's default."""
    return float(rpo_alpha) if rpo_alpha >= 0 else DEFAULT_RPO_ALPHA[loss_type]


def main():
    global rpo_alpha
    cfg = common.configure(globals())
    if loss_type not in LOSS_TYPES:
        raise common.UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    cfg["rpo_alpha"] = rpo_alpha = resolve_rpo_alpha(loss_type, rpo_alpha)
    if not 0 <= label_smoothing < 0.5:
        raise common.UserError(f"--label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta < 0:
        raise common.UserError(f"--beta must be positive (0 = the loss type's default), got {beta}")
    cfg["beta"] = beta_ = beta or DEFAULT_BETA[loss_type]
    rt = common.setup(device, dtype, seed, compile)
    model, tokenizer, init, resume_from, trainable = trainer.init_finetune(cfg, "dpo", ("sft", "dpo", "ppo"))
    # no dropout: the policy's log-probs are compared with the reference's (equal at the start: loss log 2)
    disable_dropout(model)
    cfg["learning_rate"] = learning_rate or DEFAULT_LR[finetune]
    model.to(rt.device)

    # the reference: the policy's own frozen base (LoRA), or a frozen copy of the starting checkpoint
    reference = trainer.frozen_reference(model, init, finetune, rt.device, nf4=ref_nf4)
    del init  # the starting checkpoint's state dict: a LoRA/QLoRA run must not keep an fp32 copy alive

    data = {}
    for split in ("train", "val"):
        pairs, n_cut = trainer.fit_pairs(prepare.load_pairs(dataset, split), cfg["block_size"] + 1)
        if not pairs:
            raise common.UserError(f"{common.data_file(dataset, f'pref_{split}.npz')}: no preference pairs")
        if rt.master and n_cut:
            print(f"pref_{split}: {n_cut} replies (with their prompts) were cut to {cfg['block_size'] + 1} tokens")
        data[split] = pairs
    if rt.master:
        print(f"dpo ({loss_type}, beta {beta_:g}): {len(data['train']):,} pairs, {len(data['val']):,} held out | "
              f"{finetune}: {trainable} | lr {cfg['learning_rate']:g} | reference: "
              f"{'the base, adapters off' if finetune != 'full' else 'an NF4 copy' if ref_nf4 else 'a frozen copy'}")

    def get_batch(split, k):
        items = data[split]
        pick = trainer.batch_items(split, len(items), batch_size, k, seed)
        if pick is None:
            return None
        rows = [items[i] for i in pick]
        # chosen rows first, then rejected rows: one forward pass for both
        x, y, loss_mask = trainer.next_token_batch([r[0] for r in rows] + [r[2] for r in rows],
                                                   [r[1] for r in rows] + [r[3] for r in rows], tokenizer.pad_id)
        return rt.to_device(x), rt.to_device(y), rt.to_device(loss_mask)

    def count(batch):
        return {"pairs": batch[0].shape[0] // 2}  # every term of the loss is a mean over pairs

    def loss_fn(model_, batch, totals):
        x, y, loss_mask = batch
        B = x.shape[0] // 2
        # the replies' token log-probs (the head runs on reply positions only); aux_loss: MoE balancing (0 for a
        # dense model or in eval mode)
        token_logps, aux_loss = model_(x, y, loss_mask=loss_mask, return_logps=True)
        logps = token_logps.sum(-1)                                                    # (2B,) summed over the reply
        n = loss_mask.float().sum(-1).clamp(min=1)                                     # (2B,) reply lengths
        evaluating = not model.training
        ref_logps = (reference(x, y, loss_mask=loss_mask, return_logps=True)[0].sum(-1)
                     if (loss_type in NEEDS_REFERENCE or evaluating) else torch.zeros_like(logps))
        losses, r_c, r_r = preference_loss(loss_type, logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], n[:B],
                                           n[B:], beta_, label_smoothing, simpo_gamma)
        if evaluating and loss_type not in NEEDS_REFERENCE:  # report the DPO implicit reward for every loss type
            r_c, r_r = beta_ * (logps[:B] - ref_logps[:B]), beta_ * (logps[B:] - ref_logps[B:])
        diff = r_c - r_r
        metrics = {"pref_accuracy": (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean(),
                   "reward_margin": diff.mean(), "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(),
                   "logp_pref_accuracy": (logps[:B] > logps[B:]).float().mean().detach(),
                   "logp_chosen": logps[:B].mean().detach(), "logp_rejected": logps[B:].mean().detach()}
        if evaluating:  # exact KL(policy || reference) at every token of the chosen replies, summed per reply
            lp, lq = (F.log_softmax(f(x[:B])[0].float(), -1) for f in (model_, reference))   # (B, T, V) each
            metrics["kl"] = ((lp.exp() * (lp - lq)).sum(-1) * loss_mask[:B]).sum(-1).mean()
        # every term is a mean over pairs (the RPO term too: each chosen reply's NLL per token, as in Pang et al.
        # 2024), taken over all pairs of the step: sums over this batch divided by the step's number of pairs
        loss = losses.sum()
        if rpo_alpha:  # DPO alone may lower the chosen reply's likelihood too, as long as rejected falls faster
            loss = loss - rpo_alpha * (logps[:B] / n[:B]).sum()
        return (loss + aux_loss * B) / totals["pairs"], metrics

    evaluate = evaluation.ExactMatchEval(dataset, tokenizer, rt, eval_prompts, eval_max_new_tokens, n_samples,
                                      eval_samples, max_iters, out_dir, seed)
    metrics = trainer.train(model, loss_fn, get_batch, cfg, rt, stage="dpo", count=count, evaluate=evaluate,
                            checkpoint_entries=lambda: trainer.model_entries(model, tokenizer),
                            resume_from=resume_from)
    trainer.finish_finetune(model, out_dir, "dpo", evaluate.samples, metrics, rt.master)


if __name__ == "__main__":
    common.cli(main)
