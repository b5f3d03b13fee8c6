"""
Reward model: the SFT model's trunk with a scalar head, trained to score the chosen reply above the rejected one.

    python reward_model.py                         # checkpoints/sft -> checkpoints/reward
    python reward_model.py --finetune=lora --lm_coef=0.1

Each (prompt, reply) is scored at its last real token, the end-of-turn that closes the reply (found from the
sequence's length, never from token ids: padding and end-of-turn may share one). The loss is Bradley-Terry,

    -log sigmoid(r_chosen - r_rejected - margin)           margin: per pair when the data set gives one, else 0
    + center_coef * (r_chosen + r_rejected)^2              optional: keeps scores centred on 0 (PPO likes that)
    + lm_coef * NLL(chosen reply)                          optional: the chosen reply's language-model loss

Metrics on held-out pairs: pair_accuracy (share ranked right) and reward_margin (mean r_chosen - r_rejected).
Writes ckpt.pt (stage 'reward': the trunk in `model`, the head in `score_head`), best.pt, metrics.jsonl, loss.png.
rl.load_reward_model and rl.reward_scores are what ppo.py scores its rollouts with.
"""
import json

import torch
import torch.nn.functional as F

import common
import prepare
import trainer
from model import ScoreModel

# -----------------------------------------------------------------------------
dataset = 'world'
init_from = 'checkpoints/sft'  # the policy whose trunk the reward model starts from
out_dir = 'checkpoints/reward'
resume = False
block_size = 0                 # 0 = the model's context
finetune = 'full'              # full | lora | qlora (the head always trains in full precision)
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.0
lora_head = False
center_coef = 0.01             # weight of the (r_chosen + r_rejected)^2 centring term (0 = off)
lm_coef = 0.0                  # weight of the chosen reply's language-model loss (0 = off)
max_iters = 300
batch_size = 32                # pairs per micro-batch, per process
grad_accum = 1
learning_rate = 5e-4
min_lr = 5e-5                  # 0 = learning_rate / 10
warmup_iters = 20
lr_decay_iters = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 100
eval_iters = 20                # val batches per evaluation (the held-out pairs in order)
log_interval = 10
device = 'auto'
dtype = 'auto'
compile = 'auto'
grad_checkpoint = False        # recompute each block and the head's logits in backward: less memory, more time
seed = 1337
# -----------------------------------------------------------------------------


def pairwise_loss(r_chosen, r_rejected, margin, center_coef=0.0):
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected - margin), plus center_coef * mean((r_chosen +
    r_rejected)^2), which pins the scores' level (the loss itself only sees differences)."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def main():
    cfg = common.configure(globals())
    rt = common.setup(device, dtype, seed, compile)
    gpt, tokenizer, _, resume_from, trainable = trainer.init_finetune(cfg, "reward", ("sft", "dpo", "ppo",
                                                                                      "pretrain"))
    model = ScoreModel(gpt.config)
    model.gpt = gpt
    if resume_from is not None:
        model.head.load_state_dict(resume_from["score_head"])
    model.head.requires_grad_(True)

    data = {}
    for split in ("train", "val"):
        pairs, n_cut = trainer.fit_pairs(prepare.load_pairs(dataset, split), cfg["block_size"])
        if not pairs:
            raise common.UserError(f"{common.data_file(dataset, f'pref_{split}.npz')}: no preference pairs")
        if rt.master and n_cut:
            print(f"pref_{split}: {n_cut} replies (with their prompts) were cut to {cfg['block_size']} tokens")
        data[split] = pairs
    if rt.master:
        print(f"reward model: {len(data['train']):,} pairs, {len(data['val']):,} held out | {finetune}: {trainable}")

    def get_batch(split, k):
        items = data[split]
        pick = trainer.batch_items(split, len(items), batch_size, k, seed)
        if pick is None:
            return None
        rows = [items[i] for i in pick]
        seqs = [r[0] for r in rows] + [r[2] for r in rows]       # chosen rows, then rejected rows
        masks = [r[1] for r in rows] + [r[3] for r in rows]
        idx = trainer.pad_right(seqs, tokenizer.pad_id)
        lengths = torch.tensor([len(s) for s in seqs])
        loss_mask = trainer.pad_right(masks, 0)
        margin = torch.tensor([r[4] for r in rows], dtype=torch.float32)
        return tuple(rt.to_device(t) for t in (idx, lengths, loss_mask, margin))

    def count(batch):
        idx, lengths, loss_mask, margin = batch
        # the pairwise and centring terms are means over pairs, the LM term a mean over chosen-reply tokens
        return {"pairs": len(margin), **({"tokens": loss_mask[:len(margin), 1:].sum()} if lm_coef else {})}

    def loss_fn(model_, batch, totals):
        idx, lengths, loss_mask, margin = batch
        B = len(margin)
        # one forward over chosen and rejected rows: the scalar at every position, and with the LM term the
        # log-probs of the chosen replies' next tokens (the head runs on those positions only)
        lm_targets = None
        if lm_coef:
            lm_targets = torch.full_like(idx, -1)
            lm_targets[:B, :-1] = idx[:B, 1:].masked_fill(loss_mask[:B, 1:] == 0, -1)
        values, lm_logps, aux_loss = model_(idx, lm_targets=lm_targets)                 # (2B, T), (2B, T)
        rewards = values.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
        r_chosen, r_rejected = rewards[:B], rewards[B:]
        diff = r_chosen - r_rejected
        # each term's sum over this batch / its total over the step: the loss of one batch of the step's pairs
        loss = (pairwise_loss(r_chosen, r_rejected, margin, center_coef) + aux_loss) * (B / totals["pairs"])
        if lm_coef:  # next-token loss on the chosen reply only
            loss = loss - lm_coef * lm_logps.sum() / totals["tokens"]
        return loss, {"pair_accuracy": (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean(),
                      "reward_margin": diff.mean(), "reward_chosen": r_chosen.mean(),
                      "reward_rejected": r_rejected.mean()}

    def entries():
        return {**trainer.model_entries(model.gpt, tokenizer), "score_head": model.head.state_dict()}

    metrics = trainer.train(model, loss_fn, get_batch, cfg, rt, stage="reward", count=count,
                            checkpoint_entries=entries, resume_from=resume_from, best_metric="pair_accuracy",
                            higher_is_better=True)
    if rt.master:
        print(json.dumps(metrics))


if __name__ == "__main__":
    common.cli(main)
