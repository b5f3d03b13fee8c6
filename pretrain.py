"""
Pretraining: next-token prediction on random windows of the prepared corpus (data/<dataset>/train.bin).

    python prepare.py                                   # the embedded default data set -> data/world/
    python pretrain.py                                  # tiny CPU model -> checkpoints/pretrain/ckpt.pt
    python pretrain.py config/pretrain_gpu_small.py     # a preset, then any --key=value on top
    python pretrain.py --resume=True                    # continue an interrupted run exactly where it stopped
    torchrun --standalone --nproc_per_node=2 pretrain.py    # data parallel (DDP)

Writes ckpt.pt (last, resumable), best.pt (best val loss), metrics.jsonl and loss.png to out_dir, prints a
generated sample and, last, a JSON line with the final val_loss and ppl.
"""
import json
import math
import os

import numpy as np
import torch

import common
import prepare
import trainer
from model import GPT, ModelConfig

# -----------------------------------------------------------------------------
# data and output
dataset = 'world'              # data/<dataset>/ written by prepare.py (a value containing '/' is a path)
out_dir = 'checkpoints/pretrain'
init_from = 'scratch'          # 'scratch', or a pretraining checkpoint (file or folder) to go on from: its weights
                               # and shape are kept, optimizer and schedule start afresh (e.g. on new data)
resume = False                 # continue out_dir/ckpt.pt exactly: weights, optimizer, step, RNG, data position
# model shape (used with init_from='scratch'); the vocabulary size comes from the data set's tokenizer
n_layer = 4
n_head = 4
n_kv_head = 2                  # grouped-query attention: 2 key/value heads serve 4 query heads
n_embd = 128
block_size = 256               # context length in tokens
dropout = 0.0
tie_embeddings = True
n_experts = 0                  # > 0: Mixture-of-Experts MLP with this many experts
n_experts_per_tok = 2
n_shared_experts = 0
# optimization
max_iters = 1000
batch_size = 16                # sequences per micro-batch, per process
grad_accum = 1                 # micro-batches per optimizer step, over all processes
learning_rate = 2e-3
min_lr = 2e-4                  # the cosine schedule ends here (0 = learning_rate / 10)
warmup_iters = 30
lr_decay_iters = 0             # 0 = max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                # 0 = no clipping
# evaluation and logging
eval_interval = 200
eval_iters = 20                # val batches per evaluation (always the same windows, so evaluations compare)
log_interval = 10
sample_tokens = 100            # length of the sample generated at the end (0 = none)
sample_prompt = ''             # its beginning ('' = the start of a new document)
# system
device = 'auto'                # auto = cuda, then mps, then cpu
dtype = 'auto'                 # auto = bfloat16 on CUDA (float16 on old GPUs), float32 elsewhere
compile = 'auto'               # torch.compile: auto = on CUDA only
grad_checkpoint = False        # recompute each block and the head's logits in backward: less memory, more time
seed = 1337
# -----------------------------------------------------------------------------


def main():
    cfg = common.configure(globals())
    rt = common.setup(device, dtype, seed, compile)
    tokenizer = prepare.load_tokenizer(dataset)
    files = {split: prepare.token_file(dataset, split) for split in ("train", "val")}  # (path, dtype)
    for path, token_dtype in files.values():
        n_tokens = os.path.getsize(path) // token_dtype.itemsize
        if n_tokens <= block_size:
            raise common.UserError(f"{path} has {n_tokens} tokens, fewer than --block_size={block_size} + 1")

    # the model: from scratch, from a checkpoint to go on from, or from our own checkpoint to resume
    resume_from = trainer.resume_checkpoint(cfg, "pretrain")
    start = resume_from
    if start is None and init_from != "scratch":
        start = common.load_checkpoint(init_from, stages=("pretrain",))
    if start is not None:
        prepare.check_tokenizer_matches(start, dataset)
        model_config = ModelConfig.from_dict(start["model_config"])
        if block_size > model_config.block_size:
            raise common.UserError(f"--block_size={block_size} exceeds the checkpoint's context of "
                                    f"{model_config.block_size} tokens")
        model = GPT(model_config)
        model.load_state_dict(start["model"])
    else:
        model_config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer,
                                   n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, dropout=dropout,
                                   tie_embeddings=tie_embeddings, n_experts=n_experts,
                                   n_experts_per_tok=n_experts_per_tok, n_shared_experts=n_shared_experts)
        model = GPT(model_config)
    model.grad_checkpoint = grad_checkpoint  # a training-time setting, not saved in model_config
    model.to(rt.device)
    if rt.master:
        tokens_per_step = grad_accum * batch_size * block_size
        n_params, n_body = model.num_params() / 1e6, model.num_params(exclude_embedding=True) / 1e6
        precision = str(rt.dtype).replace("torch.", "")
        print(f"model: {n_params:.2f}M parameters ({n_body:.2f}M without the embedding), vocab "
              f"{model_config.vocab_size}, context {model_config.block_size} | {tokens_per_step:,} tokens per step | "
              f"device {rt.device}, {precision}{', compiled' if rt.compile else ''}"
              f"{f', {rt.world_size} processes' if rt.ddp else ''}")

    def get_batch(split, k):
        # A pure function of (split, k): the windows come from a generator seeded with k, so a resumed run and a
        # torchrun run see exactly the batches of one uninterrupted process. Val windows do not depend on the seed,
        # so val losses compare across runs. The memmap is reopened per batch: numpy's memmap keeps every page it
        # has touched, and one kept open over a large corpus grows without end.
        data = np.memmap(files[split][0], dtype=files[split][1], mode="r")
        rng = np.random.default_rng([1, k] if split == "val" else [0, seed, k])
        ix = rng.integers(0, len(data) - block_size, size=batch_size)
        x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
        return rt.to_device(x), rt.to_device(y)

    def count(batch):
        return {"tokens": batch[1].numel()}

    def loss_fn(model, batch, totals):
        x, y = batch
        _, loss = model(x, y)  # the mean over this batch's tokens
        return loss * (y.numel() / totals["tokens"]), {}

    def evaluate(model, metrics):
        return {"ppl": math.exp(min(metrics["val_loss"], 700.0))}  # 700: beyond it exp overflows a float

    metrics = trainer.train(model, loss_fn, get_batch, cfg, rt, stage="pretrain", count=count, evaluate=evaluate,
                            checkpoint_entries=lambda: trainer.model_entries(model, tokenizer),
                            resume_from=resume_from)

    if rt.master and sample_tokens > 0:
        # a pretrained model continues text; [eot] says "a new document starts here", as in the corpus
        ids = [tokenizer.eot_id] + tokenizer.encode(sample_prompt)
        ids = ids[-(model_config.block_size - 1):]
        n_new = min(sample_tokens, model_config.block_size - len(ids))
        generator = torch.Generator(device=rt.device).manual_seed(seed)
        with rt.autocast:
            out = model.generate(torch.tensor([ids], device=rt.device), n_new, temperature=0.8, top_k=50,
                                 stop_tokens=[tokenizer.eot_id], pad_id=tokenizer.pad_id, generator=generator)
        print(f"sample: {sample_prompt}{tokenizer.decode(out[0, len(ids):].tolist())}")
    if rt.master:
        print(json.dumps(metrics))


if __name__ == "__main__":
    common.cli(main)
