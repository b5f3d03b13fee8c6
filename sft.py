"""
Supervised fine-tuning: teach the pretrained model to answer in the chat template.

    python sft.py                                  # full fine-tuning of checkpoints/pretrain -> checkpoints/sft
    python sft.py --finetune=lora                  # low-rank adapters only (lora.py), merged into the checkpoint
    python sft.py --finetune=qlora                 # adapters on a frozen NF4 base (quantize.py)
    python sft.py --dataset=belle --init_from=checkpoints/pretrain_belle --resume=True

Each conversation is rendered with the chat template (tokenizer.render_chat) and the loss counts only the
assistant's tokens and the end-of-turn token that closes each assistant turn: the model learns to answer and to
stop, never to predict the user. Conversations are right-padded per batch; one longer than the context loses its
oldest prompt tokens (trainer.fit_sequence), and how many were cut is printed.

Evaluation: val loss, and on held-out checkable prompts, when the data set has them (the embedded world does),
exact match (world.check_answer) and the clean-reply rate (world.is_clean_reply) of the greedy replies and, at the
final evaluation, of eval_samples sampled replies per prompt at the chat's settings, each overall, per task family
and per language (evaluation.ExactMatchEval; per-prompt verdicts in eval_prompts.jsonl). Writes
ckpt.pt (LoRA merged, so the next stage loads a plain model), best.pt, adapter.pt for LoRA/QLoRA, metrics.jsonl
and loss.png to out_dir, prints a few sample answers and, last, a JSON line with the final metrics.
"""
import common
import evaluation
import prepare
import trainer

# -----------------------------------------------------------------------------
# data, input and output
dataset = 'world'              # data/<dataset>/sft_{train,val}.npz from prepare.py
init_from = 'checkpoints/pretrain'   # the pretraining checkpoint (file or folder) to fine-tune
out_dir = 'checkpoints/sft'
resume = False                 # continue out_dir/ckpt.pt exactly (weights or adapters, optimizer, step, RNG)
block_size = 0                 # longest sequence trained on; 0 = the model's context
# what trains
finetune = 'full'              # full | lora | qlora
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.0
lora_head = False              # also adapt the output head (only when it is not tied to the embedding)
# optimization
max_iters = 800
batch_size = 32                # conversations per micro-batch, per process
grad_accum = 1
learning_rate = 0.0            # 0 = the finetune mode's default: 1e-3 for full, 4e-3 for lora and qlora
min_lr = 0.0                   # 0 = learning_rate / 10
warmup_iters = 30
lr_decay_iters = 0             # 0 = max_iters
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation
eval_interval = 400
eval_iters = 10                # val batches per evaluation (the val set in order)
log_interval = 10
eval_prompts = 640             # held-out checkable prompts scored per evaluation (the default data: all 640; 0 = none)
eval_max_new_tokens = 40
eval_samples = 4               # sampled answers per held-out prompt (chat settings), final evaluation only; 0 = none
n_samples = 4                  # sample answers printed at the end
# system
device = 'auto'
dtype = 'auto'
compile = 'auto'
grad_checkpoint = False        # recompute each block and the head's logits in backward: less memory, more time
seed = 1337
# -----------------------------------------------------------------------------

DEFAULT_LR = {"full": 1e-3, "lora": 4e-3, "qlora": 4e-3}


def main():
    cfg = common.configure(globals())
    rt = common.setup(device, dtype, seed, compile)
    model, tokenizer, _, resume_from, trainable = trainer.init_finetune(cfg, "sft", ("pretrain", "sft", "dpo", "ppo"))
    cfg["learning_rate"] = learning_rate or DEFAULT_LR[finetune]

    # the conversations, cut to the context once here
    data = {}
    for split in ("train", "val"):
        path, ids, masks = prepare.load_sft(dataset, split)
        if not ids:
            raise common.UserError(f"{path}: no conversations")
        fitted = [trainer.fit_sequence(i, m, cfg["block_size"] + 1) for i, m in zip(ids, masks)]
        if not any(m.any() for _, m, _ in fitted):
            raise common.UserError(f"{path}: no assistant turn to learn from (every loss mask is 0)")
        cut = [c for _, _, c in fitted]
        if rt.master and any(cut):
            print(f"sft_{split}: {cut.count('prompt')} of {len(cut)} conversations longer than {cfg['block_size'] + 1} "
                  f"tokens lost their oldest prompt tokens, {cut.count('answer')} the end of their answer")
        data[split] = [(i, m) for i, m, _ in fitted]
    if rt.master:
        n_tok = sum(int(m.sum()) for _, m in data["train"])
        print(f"sft: {len(data['train']):,} conversations ({n_tok:,} answer tokens), {len(data['val']):,} held out | "
              f"{finetune}: {trainable} | lr {cfg['learning_rate']:g}")

    def get_batch(split, k):
        items = data[split]
        pick = trainer.batch_items(split, len(items), batch_size, k, seed)
        if pick is None:
            return None
        x, y, loss_mask = trainer.next_token_batch([items[i][0] for i in pick], [items[i][1] for i in pick],
                                                   tokenizer.pad_id)
        return rt.to_device(x), rt.to_device(y), rt.to_device(loss_mask)

    def count(batch):
        return {"tokens": batch[2].sum()}  # the answer tokens the loss is averaged over

    def loss_fn(model, batch, totals):
        x, y, loss_mask = batch
        _, loss = model(x, y, loss_mask=loss_mask)  # the mean over this batch's answer tokens
        # x its share of the step's answer tokens: every answer token weighs the same, whatever batch it is in
        return loss * (loss_mask.sum() / totals["tokens"]), {}

    evaluate = evaluation.ExactMatchEval(dataset, tokenizer, rt, eval_prompts, eval_max_new_tokens, n_samples,
                                      eval_samples, max_iters, out_dir, seed)
    metrics = trainer.train(model, loss_fn, get_batch, cfg, rt, stage="sft", count=count, evaluate=evaluate,
                            checkpoint_entries=lambda: trainer.model_entries(model, tokenizer),
                            resume_from=resume_from)
    trainer.finish_finetune(model, out_dir, "sft", evaluate.samples, metrics, rt.master)


if __name__ == "__main__":
    common.cli(main)
