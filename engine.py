"""
Replies, generated one way for every caller: exact-match evaluation, PPO/GRPO rollouts, the pipeline's report and
generate.py's one-shot answer all call generate_replies (chat streams token by token but stops by the same rule,
stop_ids). A policy is loaded from a checkpoint (plain or quantized) here too.

    model, tokenizer = engine.model_from_checkpoint(common.load_checkpoint(path, common.POLICY_STAGES), device)
    replies = engine.generate_replies(model, tokenizer, [tokenizer.render_prompt(messages)], 64, device)
    replies[0].text, replies[0].ids, replies[0].stop
"""
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch

import quantize
from common import POLICY_STAGES, UserError, load_checkpoint
from model import GPT, left_pad
from tokenizer import Tokenizer

# The chat's sampling settings (generate.py's and serve.py's defaults): evaluation's sampled exact match and
# clean-reply rate sample with exactly these, so that they measure what a user of the chat gets.
CHAT_SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.9}


def model_from_checkpoint(ckpt, device):
    """(GPT, Tokenizer) from a loaded checkpoint, the model on `device` in eval mode. A quantized checkpoint
    (with a `quantization` entry, written by quantize.py) is rebuilt by quantize.load_quantized_model. LoRA
    adapters never need merging here: every checkpoint's `model` holds the merged weights."""
    try:
        tokenizer = Tokenizer.from_json(ckpt["tokenizer"])
    except (ValueError, TypeError) as e:
        raise UserError(f"checkpoint: its tokenizer cannot be loaded: {e}") from None
    if "quantization" in ckpt:
        model = quantize.load_quantized_model(ckpt, device)
    else:
        model = GPT.from_checkpoint(ckpt).to(device)
    return model.eval(), tokenizer


def load_policy(path, device):
    """(checkpoint dict, GPT in eval mode on `device`, Tokenizer) from a policy checkpoint (ckpt.pt or its folder)
    that generate.py and serve.py chat with. The reward model is refused (common.POLICY_STAGES): it scores text
    and has no language-model head. UserError, naming the path, for a file that is not a checkpoint of ours or
    whose contents do not build a model."""
    checkpoint = load_checkpoint(path, stages=POLICY_STAGES)
    try:
        model, tokenizer = model_from_checkpoint(checkpoint, device)
    except (UserError, TypeError, ValueError, KeyError) as e:  # has our keys, but not our contents
        raise UserError(f"{path}: cannot build the model from it: {e}") from None
    return checkpoint, model, tokenizer


def stop_ids(tokenizer):
    """The tokens a reply ends at: every special token (end of turn or text, or a role header an undertrained
    model starts on its own)."""
    return sorted(tokenizer.special_ids)


def cut_reply(tokens, special_ids):
    """Generated ids -> (the reply: the ids before the first special token; that token, or None when there is
    none: the reply ran out of room). What generate wrote after the stop token (padding) is not part of it."""
    cut = next((j for j, t in enumerate(tokens) if t in special_ids), None)
    if cut is None:
        return list(tokens), None
    return list(tokens[:cut]), tokens[cut]


class Reply(NamedTuple):
    ids: list              # the reply's token ids, without the token that ended it
    stop: Optional[int]    # that special token (tokenizer.end_id for a finished turn), None: ran out of room
    text: str              # tokenizer.decode(ids)


@torch.no_grad()
def generate_replies(model, tokenizer, prompts, max_new_tokens, device, *, temperature=0.0, top_k=None,
                     top_p=None, repetition_penalty=1.0, generator=None, autocast=None, compile=False):
    """Replies to a batch of prompts (lists of token ids, e.g. tokenizer.render_prompt(messages)) in one batched,
    KV-cached model.generate on `device` (where the model is): left-padded with an attention mask, each prompt cut
    to its last block_size - 1 tokens (the question and the assistant header are at the end), at most
    min(max_new_tokens, block_size - longest prompt) new tokens, each reply cut at its first special token
    (cut_reply). temperature 0 = greedy; top_k None/0 = off; compile=True decodes with the compiled step
    (GPT.generate_stream). Runs in eval mode (no dropout) and restores the
    model's mode. Returns a list of Reply, in the prompts' order."""
    block_size = model.config.block_size
    seqs = [list(p)[-(block_size - 1):] for p in prompts]
    idx, mask = left_pad(seqs, tokenizer.pad_id)
    n_new = min(max_new_tokens, block_size - idx.shape[1])
    was_training = model.training
    model.eval()
    try:
        with autocast or nullcontext():
            out = model.generate(idx.to(device), n_new, temperature=temperature, top_k=top_k or None, top_p=top_p,
                                 repetition_penalty=repetition_penalty, stop_tokens=stop_ids(tokenizer),
                                 attention_mask=mask.to(device), pad_id=tokenizer.pad_id, generator=generator,
                                 compile=compile)
    finally:
        model.train(was_training)
    replies = []
    for row in out[:, idx.shape[1]:].tolist():
        ids, stop = cut_reply(row, tokenizer.special_ids)
        replies.append(Reply(ids, stop, tokenizer.decode(ids)))
    return replies


def sample_replies(model, tokenizer, prompts, k, max_new_tokens, device, seed, *, batch_size=64, autocast=None,
                   **sampling):
    """k sampled replies to each of `prompts` (lists of token ids), at the chat's settings (CHAT_SAMPLING) unless
    `sampling` overrides them (temperature, top_k, top_p, repetition_penalty). Reproducible: the draws come from
    one torch.Generator seeded with `seed`, and the rows are generated in a fixed order (longest prompts first, in
    batches of at most batch_size rows, a prompt's k copies side by side), so the same model, prompts, k, seed and
    batch_size give the same replies. Returns a list with one list of k Reply per prompt, in the prompts' order."""
    if k < 1 or batch_size < 1:
        raise UserError(f"sample_replies: k ({k}) and batch_size ({batch_size}) must be at least 1")
    settings = {**CHAT_SAMPLING, **sampling}
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    rows = [i for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) for _ in range(k)]
    out = [[] for _ in prompts]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        replies = generate_replies(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, device,
                                   generator=gen, autocast=autocast, **settings)
        for i, reply in zip(chunk, replies):
            out[i].append(reply)
    return out
