"""
The training plumbing every stage imports: batching, the one training loop with its run state (checkpoints, best,
Ctrl-C, exact resume with optimizer, grad scaler and RNG), optimizer and LR schedule, metrics log and plots.
Evaluation on held-out checkable prompts is in evaluation.py; what every module needs (errors, the command line,
device, checkpoint files) is in common.py, and a stage imports it from there.

A stage script stays "config constants, data, loss, call the loop":

    import common, trainer
    # ---- config: every lowercase int/float/bool/str/tuple constant is a setting (--key=value, config/PRESET.py)
    out_dir = 'checkpoints/sft'; max_iters = 500; batch_size = 16; grad_accum = 1; ...
    # ----
    def main():
        cfg = common.configure(globals())                     # config/PRESET.py files, then --key=value
        rt = common.setup(device, dtype, seed, compile)       # device, autocast, grad scaler, DDP
        model = ...                                           # an nn.Module on rt.device
        def get_batch(split, k): ...                          # k-th micro-batch of 'train' or 'val'
                                                              # (shuffled_batch / ordered_batch pick the items)
        def count(batch): ...                                 # -> {"tokens": answer tokens} (or {"pairs": n})
        def loss_fn(model, batch, totals): ...                # -> (sum of token losses / totals["tokens"],
                                                              #     {"pref_accuracy": ..., ...})
        metrics = trainer.train(model, loss_fn, get_batch, cfg, rt, stage='sft', count=count,
                                checkpoint_entries=lambda: trainer.model_entries(model, tokenizer))
        print(json.dumps(metrics))
    if __name__ == '__main__':
        common.cli(main)

A stage whose step is not "micro-batches, one optimizer step" (PPO: rollouts, then several updates) passes
train(step_fn=...) and keeps everything else of the loop.
"""
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import lora
import quantize
from common import UserError, load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_atomic
from engine import model_from_checkpoint
from evaluation import print_samples
from model import disable_dropout
from prepare import check_tokenizer_matches


@functools.lru_cache(maxsize=4)
def _permutation(n_items, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n_items)


def shuffled_batch(n_items, batch_size, k, seed):
    """Item indices of training micro-batch k over a finite data set (SFT conversations, preference pairs):
    epoch after epoch, each a fresh shuffle seeded with (seed, epoch), every item once per epoch. A pure function
    of k, as train() needs for exact resume and DDP."""
    positions = np.arange(k * batch_size, (k + 1) * batch_size)
    epochs, within = np.divmod(positions, n_items)
    return np.array([_permutation(n_items, seed, int(e))[i] for e, i in zip(epochs, within)])


def ordered_batch(n_items, batch_size, k):
    """Item indices of validation micro-batch k, in order; None once the set is used up (as train() expects)."""
    if k * batch_size >= n_items:
        return None
    return np.arange(k * batch_size, min((k + 1) * batch_size, n_items))


def fit_sequence(ids, loss_mask, max_len):
    """Cut a rendered sequence (prompt + answer, loss_mask 1 on what is learned) to at most max_len tokens without
    losing the answer: the oldest prompt tokens go first. Only when the last answer (with the assistant header in
    front of it) is longer than max_len on its own is it the answer's end that is cut. Returns (ids, loss_mask,
    cut) with cut None, 'prompt' or 'answer', so that a stage can say how many it had to cut."""
    n = len(ids)
    if n <= max_len:
        return ids, loss_mask, None
    m = np.asarray(loss_mask)
    starts = np.flatnonzero((m[1:] == 1) & (m[:-1] == 0)) + 1  # where each learned span begins
    start = int(starts[-1]) if len(starts) else (0 if m[0] else n)
    if n - (start - 1) <= max_len:
        return ids[n - max_len:], loss_mask[n - max_len:], "prompt"
    head = max(start - 1, 0)
    return ids[head:head + max_len], loss_mask[head:head + max_len], "answer"


def fit_pairs(pairs, max_len):
    """prepare.load_pairs' (prompt, chosen, rejected, margin) -> ([(chosen ids, chosen mask, rejected ids, rejected
    mask, margin)], how many sequences had to be cut): each reply follows its prompt, mask 1 on the reply (with its
    end of turn), cut to max_len tokens by fit_sequence."""
    out, n_cut = [], 0
    for prompt, chosen, rejected, margin in pairs:
        row = []
        for reply in (chosen, rejected):
            ids = np.concatenate([prompt, reply])
            mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(reply), np.uint8)])
            ids, mask, cut = fit_sequence(ids, mask, max_len)
            row += [ids, mask]
            n_cut += cut is not None
        out.append((*row, margin))
    return out, n_cut


def pad_right(seqs, value, dtype=torch.long):
    """list of 1-D sequences -> (B, longest) tensor, padded on the right with `value`."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(np.asarray(s), dtype=dtype)
    return out


def next_token_batch(seqs, masks, pad_id):
    """Right-padded next-token training batch: (x, y, loss_mask), each (B, longest - 1). y[:, t] is the token after
    x[:, t], and it counts where the mask of *that* token (the target) is 1, so the model learns to produce the
    answer and its end of turn, never the prompt; padding has mask 0. Right padding needs no attention mask: a
    causal model never looks ahead at it."""
    ids, mask = pad_right(seqs, pad_id), pad_right(masks, 0)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def batch_items(split, n_items, batch_size, k, seed):
    """Item indices of micro-batch k of a finite data set: shuffled_batch for 'train', ordered_batch for 'val'."""
    if split == "train":
        return shuffled_batch(n_items, batch_size, k, seed)
    return ordered_batch(n_items, batch_size, k)


# Settings a resumed run may change: they say how long to run, how often to evaluate or log, where and how fast to
# compute (grad_checkpoint too: it recomputes activations, the math stays the same), what to print. Every other
# setting changes the run's trajectory (which items are seen, the loss, the model), so a resumed run refuses a new
# value instead of silently continuing another run.
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "log_interval", "eval_iters", "eval_prompts", "eval_max_new_tokens",
                     "n_samples", "sample_tokens", "sample_prompt", "device", "dtype", "compile", "grad_checkpoint",
                     "resume", "out_dir")
# the settings that decide what is loaded before the loop starts (the weights, the adapters, the data)
LOADING_KEYS = ("init_from", "dataset", "finetune", "lora_r", "lora_alpha", "lora_dropout", "lora_head")


def check_resume_config(saved, cfg, where, keys=None):
    """UserError naming the first setting of `cfg` (or of `keys`) that differs from `saved`, the train_config of
    the checkpoint being resumed at `where`, unless it is in RESUME_MAY_CHANGE. Settings the checkpoint does not
    record (an older version's) are not compared."""
    for key in keys or cfg:
        if key in RESUME_MAY_CHANGE or key not in saved or key not in cfg:
            continue
        was, now = saved[key], cfg[key]
        if isinstance(was, (list, tuple)) and isinstance(now, (list, tuple)):
            was, now = tuple(was), tuple(now)
        if was != now:
            raise UserError(f"--resume=True: {where} was trained with --{key}={was}, not --{key}={now}; a "
                            f"resumed run keeps the settings that shape it (start a new --out_dir to change it)")


def resume_checkpoint(cfg, stage):
    """With --resume=True, the checkpoint to continue from (out_dir/ckpt.pt of this stage); None otherwise. A
    setting that decides what is loaded (LOADING_KEYS) and differs from the checkpoint's is a UserError here;
    train() checks the others once the stage has derived its defaults."""
    if not cfg["resume"]:
        return None
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if not os.path.exists(path):
        raise UserError(f"--resume=True but {path} does not exist (nothing to resume; drop --resume)")
    ckpt = load_checkpoint(path, stages=(stage,))
    if "optimizer" not in ckpt:
        raise UserError(f"{path}: has no training state to resume from (it is a final or best checkpoint)")
    check_resume_config(ckpt.get("train_config", {}), cfg, cfg["out_dir"], keys=LOADING_KEYS)
    return ckpt


def model_entries(model, tokenizer):
    """The checkpoint entries of a policy: `model_config`, `model` (LoRA adapters merged and any quantized base
    dequantized, so the next stage gets a plain full-precision GPT) and `tokenizer`. A model with LoRA adapters
    also gets `lora_config` and `adapter` (the adapters alone): what --resume=True puts back on the base."""
    sd = lora.merged_state_dict(model)  # a plain model's own state dict, tensor for tensor
    entries = {"model_config": model.config.to_dict(), "model": sd, "tokenizer": tokenizer.to_json()}
    if lora.lora_layers(model):
        entries.update(lora_config=lora.lora_config(model), adapter=lora.lora_state_dict(model))
    return entries


FINETUNE_KEYS = ("init_from", "dataset", "block_size", "resume", "out_dir", "finetune", "lora_r", "lora_alpha",
                 "lora_dropout", "lora_head", "grad_checkpoint")


def init_finetune(cfg, stage, init_stages):
    """The GPT a fine-tuning stage (SFT, DPO, the reward model's trunk, PPO) trains, on the CPU in training mode:
    cfg['init_from'] loaded (a checkpoint of one of `init_stages`, with the data set's tokenizer), set up for
    cfg['finetune'] (full | lora | qlora, lora.setup_finetune) and cfg['grad_checkpoint'] (GPT.grad_checkpoint),
    and with --resume=True the run's own weights or adapters put back. Returns (model, tokenizer, init checkpoint,
    resume checkpoint or None, the "trainable x of y" line)."""
    resume_from = resume_checkpoint(cfg, stage)
    init = load_checkpoint(cfg["init_from"], stages=init_stages)
    if "quantization" in init:
        raise UserError(f"{cfg['init_from']}: a quantized checkpoint cannot be trained; start from the "
                        f"full-precision one (--finetune=qlora quantizes the base itself)")
    check_tokenizer_matches(init, cfg["dataset"])
    model, tokenizer = model_from_checkpoint(init, "cpu")
    cfg["block_size"] = cfg["block_size"] or model.config.block_size
    if cfg["block_size"] > model.config.block_size:
        raise UserError(f"--block_size={cfg['block_size']} exceeds the context of {cfg['init_from']} "
                        f"({model.config.block_size} tokens)")
    if resume_from is not None and cfg["finetune"] == "full":
        model.load_state_dict(resume_from["model"])
    line = lora.setup_finetune(model, cfg["finetune"], cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"],
                               cfg["lora_head"])
    if resume_from is not None and cfg["finetune"] != "full":
        lora.load_adapter(model, resume_from)
    model.grad_checkpoint = cfg["grad_checkpoint"]
    return model.train(), tokenizer, init, resume_from, line


def frozen_reference(model, init, finetune, device, nf4=False):
    """The frozen reference a preference or RL stage holds its policy `model` to, as a function with GPT.forward's
    arguments and results, run without gradient (reference(x) -> ((B, T, V) logits, aux_loss); reference(x,
    targets, loss_mask=..., return_logps=True) -> ((B, T) log-probs, aux_loss)): a frozen copy of the starting
    checkpoint `init` for full fine-tuning (nf4=True keeps the copy in NF4, ~4.13 bits per weight), else the policy
    itself with its LoRA adapters switched off, which costs no memory. Either runs in eval mode (no dropout); the
    policy's mode is restored."""
    reference = None
    if finetune == "full":
        reference, _ = model_from_checkpoint(init, "cpu")
        if nf4:
            quantize.quantize_model(reference, "nf4")
        reference = disable_dropout(reference).requires_grad_(False).to(device).eval()

    @torch.no_grad()
    def reference_forward(*args, **kwargs):
        if reference is not None:
            return reference(*args, **kwargs)
        was_training = model.training
        model.eval()
        try:
            with lora.disable_adapters(model):
                return model(*args, **kwargs)
        finally:
            model.train(was_training)
    return reference_forward


def finish_finetune(model, out_dir, stage, samples, metrics, master=True):
    """The end of a fine-tuning stage (sft, dpo, ppo): a LoRA/QLoRA run also writes its adapters alone (small) as
    out_dir/adapter.pt; then the sample answers and, last, the JSON line of the final metrics."""
    if not master:
        return
    if lora.lora_layers(model):
        path = os.path.join(out_dir, "adapter.pt")
        lora.save_adapter(model, path, extra={"stage": stage})
        print(f"adapters alone: {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    print_samples(samples)
    print(json.dumps(metrics, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------------------------
# optimizer and schedule

def make_optimizer(model, lr, weight_decay, betas, device_type):
    """AdamW over the trainable parameters (requires_grad; frozen LoRA bases are left out). Weight decay only on
    tensors of 2 or more dimensions (matmul weights, embeddings): decaying norm gains and biases pulls them to 0,
    which only hurts. Fused kernel on CUDA (one launch for all parameters). A group's optional `lr_scale` is a
    multiplier the trainer applies to the scheduled lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def lr_at(it, cfg):
    """Learning rate for update `it` (0-based): linear warmup over cfg['warmup_iters'] updates up to
    cfg['learning_rate'], then half a cosine down to cfg['min_lr'], reached at cfg['lr_decay_iters'] (0 means
    cfg['max_iters']) and kept after. min_lr == learning_rate gives a constant rate after warmup. In every stage
    min_lr 0 means learning_rate / 10 (the 10x decay of Hoffmann et al. 2022), so it follows a learning rate that a
    stage derives from its finetune mode."""
    lr, min_lr, warmup = cfg["learning_rate"], cfg["min_lr"] or cfg["learning_rate"] / 10, cfg["warmup_iters"]
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < warmup:
        return lr * (it + 1) / warmup
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ----------------------------------------------------------------------------------------------------------------
# logging, stopping, divergence

class MetricsLog:
    """metrics.jsonl (one JSON object per line, each with a `step`) and a PNG of chosen series in out_dir, master only.
    A fresh run starts a new log; a resumed one keeps the records up to the step it resumes from (a crashed run may
    have logged steps past its last checkpoint; those are redone). `panels`: one list of metric keys per subplot,
    each drawn against the step wherever a record has it (default: train and val loss, on a log scale)."""

    LOSS_PANELS = (("train_loss", "val_loss"),)

    def __init__(self, out_dir, enabled=True, resume_step=None, title="", panels=LOSS_PANELS, png="loss.png"):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.png = os.path.join(out_dir, png)
        self.enabled, self.title, self.panels, self.records = enabled, title, panels, []
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:  # a line cut short by a crash
                        continue
                    if r.get("step", 0) <= resume_step:
                        self.records.append(r)
        write_atomic(self.path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                        for r in self.records), mode="w")

    def log(self, record):
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def plot(self):
        """The PNG: one subplot per panel, each series against the step (validation points marked)."""
        if not self.enabled:
            return
        plot_metrics(self.records, self.panels, self.png, self.title)


def plot_metrics(records, panels, path, title=""):
    """Draw metrics.jsonl-style records to a PNG (atomically): one subplot per panel of keys."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state, works headless
    from matplotlib.ticker import FormatStrFormatter
    fig = Figure(figsize=(7, 1 + 3 * len(panels)), dpi=100)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, keys in zip(axes, panels):
        values = []
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                sparse = len(points) < 0.5 * max(1, sum("train_loss" in r or "reward_mean" in r for r in records))
                ax.plot(*zip(*points), "o-" if sparse else "-", ms=3, lw=1 if not sparse else 1.5,
                        label=key.replace("_", " "))
                values += [v for _, v in points]
        if values and all(v > 0 for v in values) and any("loss" in k for k in keys):
            ax.set_yscale("log")  # the late, small improvements of a loss stay visible
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
        if values:
            ax.legend()
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))


class GracefulStop:
    """Within this context the first Ctrl-C (SIGINT) or SIGTERM only sets `.signum`: the loop finishes the step it
    is in, saves a checkpoint and exits. A second Ctrl-C raises KeyboardInterrupt at once (the atomic writes still
    never leave a half-written file). Installs handlers only in the main thread."""

    def __enter__(self):
        self.signum, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:
            # a second Ctrl-C means "now". A SIGTERM after the Ctrl-C does not: torchrun sends one to its workers
            # when it gets Ctrl-C itself, and they should still save.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        print("\nstopping: saving a checkpoint after this step (press Ctrl-C again to quit without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


def check_finite(value, what, step, out_dir):
    """A NaN or infinite loss means training diverged: stop with a UserError that says where the last good
    checkpoint is (it is never overwritten by a diverged model)."""
    if math.isfinite(value):
        return
    path = os.path.join(out_dir, "ckpt.pt")
    kept = f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was written"
    raise UserError(f"{what} is {value} at step {step}: training diverged and was stopped; {kept}. "
                    f"Try a lower --learning_rate, more --warmup_iters or --grad_clip=1.0")


# ----------------------------------------------------------------------------------------------------------------
# the training loop

LOOP_KEYS = ("out_dir", "max_iters", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay",
             "beta1", "beta2", "grad_clip", "eval_interval", "log_interval")
BATCH_KEYS = ("batch_size", "grad_accum", "eval_iters")  # the loop's own step (loss_fn over micro-batches)
TRAIN_KEYS = LOOP_KEYS + BATCH_KEYS


def check_train_config(cfg, world_size=1, keys=TRAIN_KEYS):
    """UserError naming the setting for values the loop cannot work with."""
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise TypeError(f"trainer.train: the stage's config lacks {missing}")

    def need(ok, key, rule):
        if not ok:
            raise UserError(f"--{key}={cfg[key]!r}: {rule}")
    for k in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if k in keys:
            need(cfg[k] >= 1, k, "must be at least 1")
    for k in ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "min_lr"):
        need(cfg[k] >= 0, k, "must not be negative")
    need(cfg["learning_rate"] > 0, "learning_rate", "must be positive")
    need(cfg["min_lr"] <= cfg["learning_rate"], "min_lr", "must not exceed --learning_rate")
    for k in ("beta1", "beta2"):
        need(0 <= cfg[k] < 1, k, "must be in [0, 1)")
    if "grad_accum" in keys and cfg["grad_accum"] > world_size:  # below it: one micro-batch per process
        need(cfg["grad_accum"] % world_size == 0, "grad_accum", f"must be a multiple of the number of processes "
             f"({world_size}): it counts micro-batches over all of them")


def _global_totals(counts, device, ddp=False):
    """Sum the count dicts of several batches (count(batch) -> {"tokens": n, ...}, ints or integer tensors) and,
    under DDP, over all processes: {key: float32 0-dim tensor on `device`}, each at least 1, so that a step or an
    evaluation with nothing counted gives a loss of 0, not NaN."""
    keys = sorted({k for c in counts for k in c})
    vec = torch.stack([torch.stack([torch.as_tensor(c.get(k, 0), dtype=torch.long, device=device).reshape(())
                                    for k in keys]) for c in counts]).sum(0)
    if ddp:
        dist.all_reduce(vec)  # SUM over processes
    return dict(zip(keys, vec.clamp(min=1).float()))


def _count_tokens(batch):
    # tokens/s counts the elements of the batch's first tensor (the token ids by convention)
    while not torch.is_tensor(batch):
        if isinstance(batch, dict):
            batch = next(iter(batch.values()))
        elif isinstance(batch, (list, tuple)):
            batch = batch[0]
        else:
            return 0
    return batch.numel()


def _scalars(metrics):
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def train(model, loss_fn, get_batch, cfg, rt, *, stage, checkpoint_entries, count=None, evaluate=None,
          resume_from=None, optimizer=None, best_metric="val_loss", higher_is_better=False, step_fn=None,
          train_state=None, summary_keys=(), log_panels=MetricsLog.LOSS_PANELS, png="loss.png", name=None):
    """Train `model` and return the metrics of the final evaluation (a dict; also in the checkpoint).

    model: an nn.Module already on rt.device (weights loaded when resuming). The loop compiles it (rt.compile)
        and wraps it in DDP under torchrun; checkpoints come from the unwrapped module.
    count(batch) -> dict: what the batch's loss terms are averaged over, e.g. {"tokens": answer tokens counted}
        for a mean over masked tokens, {"pairs": n} for a mean over preference pairs (ints or integer tensors).
    loss_fn(model, batch, totals) -> (loss, metrics). totals: count()'s keys summed over every micro-batch of
        the step in every process (in an evaluation, over its val batches), as float 0-dim tensors. loss: the
        batch's share of the step's loss, i.e. each term's sum over the batch divided by its total (a token
        mean: sum of token losses / totals["tokens"]), so that the shares of all micro-batches and processes add
        up to the loss of one batch of all their items, whatever their lengths: gradient accumulation and DDP
        give exactly the update of that one batch (the loop sums the shares' gradients; DDP's averaging over
        processes is undone). metrics: a dict of scalars (floats or 0-dim tensors, same keys every call)
        averaged over micro-batches and val batches, e.g. DPO's pref_accuracy. It runs under rt.autocast. Call
        model(...) (its forward) only: that is what DDP synchronises.
    get_batch(split, k) -> batch for loss_fn, on rt.device. split 'train': k counts micro-batches over the
        whole run and all processes (each optimizer step uses grad_accum consecutive k). split 'val': k in
        range(eval_iters), and the same k must give the same batch every time; return None when a finite val
        set is used up. Make the batch a pure function of (split, k), e.g. seed a generator with (seed, k): that
        is what makes a resumed run identical to an uninterrupted one and torchrun identical to one process
        with the same global batch (grad_accum x batch_size). tokens/s counts the batch's first tensor.
    cfg: the stage's settings with the keys in TRAIN_KEYS (batch_size = micro-batch per process, grad_accum =
        micro-batches per optimizer step over all processes; below the number of processes, each process takes
        one micro-batch per step and the run says so); with step_fn, LOOP_KEYS. With resume_from, a setting
        that differs from the checkpoint's and is not in RESUME_MAY_CHANGE is a UserError.
    stage: the checkpoint's stage name (name: the progress bar's and plot's, default stage). checkpoint_entries()
        -> dict: model_config, model, tokenizer and any extras (e.g. a reward head); see model_entries. The loop
        adds stage, train_config, metrics, step, optimizer, scaler, rng, data_position, best, and train_state()
        (a dict: more training state, e.g. PPO's critic) to the last checkpoint.
    evaluate(model, metrics) -> dict: extra metrics at each evaluation (e.g. exact_match), given the unwrapped
        model in eval mode and this evaluation's val_loss and loss_fn metrics, plus `step` (the steps done: the
        final evaluation has step == max_iters). Runs on every process.
    resume_from: a checkpoint from resume_checkpoint(): restores optimizer, scaler, step, RNG states, data
        position and the best value; the stage has loaded the model weights (and its train_state) already.
    optimizer: default make_optimizer(model, ...) from cfg; pass one for custom parameter groups.
    best_metric / higher_is_better: what best.pt is chosen by; an evaluation without it (a data set without
        checkable prompts) counts as the best so far.
    step_fn(step, stop) -> (record, tokens, stopping): one whole training step of a stage whose step
        is not "micro-batches of loss_fn, one optimizer step" (PPO: rollouts, then several updates with
        rt.scaler), instead of loss_fn and get_batch (both None: evaluations then have no val loss). record: the
        step's scalars for the metrics log; tokens: processed this step; stopping: stop after this step, read from
        stop.signum (a Ctrl-C or SIGTERM during the step) at its end; every process must agree. It runs the
        optimizer steps itself; the loop has set the lr of this step.
    summary_keys: step-record keys whose mean over the last 10 steps joins each evaluation's metrics (PPO's
        reward_mean and kl). log_panels / png: the plot's panels and file name (MetricsLog).

    Each step: grad_accum micro-batches (no DDP gradient sync until the last), their counts totalled first,
    clip at grad_clip (0 = no clipping), optimizer step at lr_at(step); train_loss is the step's whole loss.
    Every eval_interval steps and at the end: val loss (weighted as in a step) over eval_iters batches
    plus evaluate(), a metrics.jsonl record, the plot, ckpt.pt (last, with the training state) and best.pt
    (model only) when best_metric improved. Logs train_loss, lr, grad_norm and tokens/s every log_interval
    steps. Ctrl-C/SIGTERM: finish the step, save ckpt.pt, exit 130/143. A NaN or inf loss:
    UserError before the optimizer step, so the last checkpoint stays good."""
    check_train_config(cfg, rt.world_size, LOOP_KEYS if step_fn else TRAIN_KEYS)
    if step_fn is None and count is None:
        raise TypeError("trainer.train: a stage with loss_fn passes count(batch) too")
    if step_fn is None and cfg["grad_accum"] < rt.world_size:
        if rt.master:
            print(f"note: --grad_accum={cfg['grad_accum']} is less than the {rt.world_size} processes: each process "
                  f"takes one micro-batch per step (grad_accum {rt.world_size})", file=sys.stderr)
        cfg = {**cfg, "grad_accum": rt.world_size}  # what the checkpoint records: the run as it trained
    if resume_from is not None:
        saved = resume_from.get("train_config", {})
        check_resume_config(saved, cfg, cfg["out_dir"])
        if rt.master and not cfg["lr_decay_iters"] and saved.get("max_iters", cfg["max_iters"]) != cfg["max_iters"]:
            print(f"note: --max_iters={cfg['max_iters']} (was {saved['max_iters']}) with --lr_decay_iters=0 "
                  f"stretches the learning-rate schedule from here on; set --lr_decay_iters to keep it",
                  file=sys.stderr)
    out_dir, max_iters = cfg["out_dir"], cfg["max_iters"]
    raw = model.to(rt.device)
    params = [p for p in raw.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = make_optimizer(raw, cfg["learning_rate"], cfg["weight_decay"], (cfg["beta1"], cfg["beta2"]),
                                   rt.device_type)

    # history: the recent step records, for summary_keys (the last 10 are kept in the checkpoint)
    step, next_k, tokens_seen, best, metrics, history = 0, 0, 0, None, {}, []
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        if rt.scaler.is_enabled() and resume_from.get("scaler"):  # empty when the run was not in fp16
            rt.scaler.load_state_dict(resume_from["scaler"])
        step, best, metrics = resume_from["step"], resume_from["best"], resume_from["metrics"]
        next_k, tokens_seen = resume_from["data_position"]["next_k"], resume_from["data_position"]["tokens_seen"]
        set_rng_state(resume_from["rng"])
        history = list(resume_from.get("recent_records", []))

    fwd = torch.compile(raw) if rt.compile else raw
    # torch.compile compiles on the first call of each kind (training step, no-grad evaluation): their times are
    # reported, since the warm-up is what a short run must win back
    compiling_step = rt.compile and step_fn is None  # a step_fn (PPO) does not run `fwd`
    compiling_eval = rt.compile and get_batch is not None  # the val loss runs the compiled forward
    # evaluation runs on `fwd`, never through DDP: its forward would sync buffers across processes
    ddp_model = DDP(fwd, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None) if rt.ddp else fwd
    log = MetricsLog(out_dir, enabled=rt.master, resume_step=step if resume_from is not None else None,
                     title=f"{name or stage}: {out_dir}", panels=log_panels, png=png)
    ckpt_path, best_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt")

    def save(path, training_state):
        if not rt.master:
            return
        obj = dict(checkpoint_entries())
        obj.update(stage=stage, train_config=dict(cfg), metrics=metrics, step=step)
        if training_state:
            obj.update(optimizer=optimizer.state_dict(), scaler=rt.scaler.state_dict(), rng=rng_state(), best=best,
                       data_position={"next_k": next_k, "tokens_seen": tokens_seen}, recent_records=history[-10:],
                       **(train_state or dict)())
        save_checkpoint(path, obj)

    def run_eval():
        # every process evaluates every val batch: identical numbers everywhere and no collectives needed
        raw.eval()
        result = {}
        if get_batch is not None:
            batches = []
            for k in range(cfg["eval_iters"]):
                batch = get_batch("val", k)
                if batch is None:
                    break
                batches.append(batch)
            if not batches:
                raise UserError(f"{stage}: the validation set is empty (get_batch('val', 0) gave nothing)")
            # the same weighting as a training step: one loss over all the val batches' items
            totals = _global_totals([count(b) for b in batches], rt.device)
            loss_sum, extra_sum = None, None
            with torch.no_grad():
                for batch in batches:
                    with rt.autocast:
                        loss, extra = loss_fn(fwd, batch, totals)
                    vec = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=loss.device).reshape(())
                                       for v in extra.values()]) if extra else torch.zeros(0, device=loss.device)
                    loss_sum = loss.detach().float() + (0 if loss_sum is None else loss_sum)
                    extra_sum = vec if extra_sum is None else extra_sum + vec
            values = (extra_sum / len(batches)).tolist()
            result = {"val_loss": loss_sum.item(), **dict(zip(extra, values))}
        if evaluate is not None:
            result.update(evaluate(raw, dict(result, step=step)))  # step: is it the final evaluation
        raw.train()
        return result

    def eval_and_save():
        nonlocal metrics, best, compiling_eval
        t0 = time.perf_counter()
        metrics = run_eval()
        if compiling_eval and rt.master:  # the first evaluation compiled the forward under no_grad
            tqdm.write(f"compiling the evaluation forward... {time.perf_counter() - t0:.0f} s (with the evaluation)",
                       file=sys.stderr)
        compiling_eval = False
        log.log({"step": step, **metrics})  # summary_keys are in the step records already
        recent = history[-10:]
        metrics.update({k: float(np.mean([r[k] for r in recent])) for k in summary_keys if recent})
        if rt.master:
            tqdm.write(f"step {step}: {_scalars(metrics)}")
            log.plot()
        value = metrics.get(best_metric)
        improved = value is None or best is None or (value > best if higher_is_better else value < best)
        if improved and value is not None:
            best = value
        save(ckpt_path, training_state=True)
        if improved:
            save(best_path, training_state=False)

    def batch_step(step, stop):
        # grad_accum micro-batches of loss_fn, one optimizer step. The micro-batches are fetched and counted first:
        # each loss_fn call then divides its sums by the step's global totals, so the summed gradients are those of
        # one batch of every item of the step. Host syncs: the all-reduce of the counts (under DDP), and that of
        # the loss, metrics, grad norm and Ctrl-C flag.
        nonlocal next_k
        accum_here = cfg["grad_accum"] // rt.world_size  # micro-batches per step in this process
        batches = [get_batch("train", next_k + rt.rank * accum_here + micro) for micro in range(accum_here)]
        totals = _global_totals([count(b) for b in batches], rt.device, rt.ddp)
        loss_sum, extra_sum = torch.zeros((), device=rt.device), {}
        for micro, batch in enumerate(batches):
            # gradients are all-reduced once per step, on the last micro-batch, not on every backward
            last = micro == accum_here - 1
            with (ddp_model.no_sync() if rt.ddp and not last else nullcontext()):
                with rt.autocast:
                    loss, extra = loss_fn(ddp_model, batch, totals)
                # DDP averages the gradients over processes; the shares of all processes are to be summed
                rt.scaler.scale(loss * rt.world_size).backward()
            loss_sum += loss.detach().float()
            for k, v in extra.items():
                extra_sum[k] = extra_sum.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32).detach()
        rt.scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] if cfg["grad_clip"] > 0 else math.inf)
        # loss: summed (each process holds its shares of the one loss); the rest: averaged over processes
        stats = torch.stack([loss_sum * rt.world_size, grad_norm.float().to(loss_sum.device),
                             torch.tensor(1.0 if stop.signum else 0.0, device=loss_sum.device)]
                            + [(v / accum_here).to(loss_sum.device) for v in extra_sum.values()])
        if rt.ddp:
            dist.all_reduce(stats)  # SUM: gloo has no AVG
            stats /= rt.world_size
        train_loss, norm, stopping, *extra_means = stats.tolist()
        check_finite(train_loss, "the training loss", step + 1, out_dir)
        if not rt.scaler.is_enabled():  # with fp16 an inf gradient only makes the scaler skip the step
            check_finite(norm, "the gradient norm", step + 1, out_dir)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        next_k += cfg["grad_accum"]
        record = {"train_loss": train_loss, "grad_norm": norm,
                  **{f"train_{k}": v for k, v in zip(extra_sum, extra_means)}}
        return record, sum(_count_tokens(b) for b in batches) * rt.world_size, bool(stopping)

    step_fn = step_fn or batch_step
    if resume_from is None and rt.master and os.path.exists(ckpt_path):
        print(f"note: {out_dir} has a checkpoint from an earlier run; it will be overwritten "
              f"(--resume=True continues it instead)", file=sys.stderr)
    if step >= max_iters and resume_from is not None:
        if rt.master:
            print(f"{ckpt_path} is at step {step} >= --max_iters={max_iters}: nothing to train", file=sys.stderr)
        return metrics

    raw.train()
    bar = tqdm(total=max_iters, initial=step, desc=name or stage, disable=not rt.master, dynamic_ncols=True,
               file=sys.stderr)
    with GracefulStop() as stop, bar:
        if resume_from is None:
            eval_and_save()  # the step-0 baseline, and a checkpoint exists from the start
        t_interval, tok_interval = 0.0, 0
        while step < max_iters:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            record, ntok, stopping = step_fn(step, stop)
            if compiling_step and rt.master:
                tqdm.write(f"compiling the training step... {time.perf_counter() - t0:.0f} s (with the first step)",
                           file=sys.stderr)
            compiling_step = False
            step += 1
            tokens_seen += ntok
            history.append(record)
            t_interval += time.perf_counter() - t0
            tok_interval += ntok
            bar.update(1)

            if step % cfg["log_interval"] == 0 or step == max_iters:
                tok_s = tok_interval / max(t_interval, 1e-9)
                log.log({"step": step, **record, "lr": lr, "tok_per_s": tok_s, "tokens": tokens_seen})
                shown = " ".join(f"{k.replace('train_', '')} {v:.4g}" for k, v in list(record.items())[:3])
                bar.set_postfix_str(f"{shown} lr {lr:.2e} {tok_s:,.0f} tok/s")
                t_interval, tok_interval = 0.0, 0
            if step % cfg["eval_interval"] == 0 or step == max_iters:
                eval_and_save()
            if stopping:  # every process saw the same all-reduced flag, so all stop at this same step
                bar.close()  # before the message below, so the two do not interleave
                if step % cfg["eval_interval"] and step != max_iters:
                    save(ckpt_path, training_state=True)
                if rt.ddp:
                    dist.barrier()  # nobody exits (and gets the others killed) before rank 0 has saved
                if rt.master:
                    print(f"interrupted at step {step}: saved {ckpt_path}; continue with --resume=True",
                          file=sys.stderr)
                raise SystemExit(128 + (stop.signum or signal.SIGINT))  # 130 for Ctrl-C, 143 for SIGTERM
    return metrics
