"""
Evaluation of a chat model on the held-out checkable prompts: greedy and sampled exact match (world.check_answer)
and the clean-reply rate (world.is_clean_reply), overall, per task family and per language, with per-prompt
verdicts for a paired test against another stage. Every policy stage plugs ExactMatchEval into trainer.train.
"""
import json
import os

import prepare
import world
from common import UserError, dataset_dir, write_atomic
from engine import generate_replies, sample_replies


def reply_metrics(rows, greedy, sampled=None):
    """Score replies to checkable prompts. rows: prompt rows (each with `answer`, and `task` and `lang` when known);
    greedy: one reply text per row; sampled: None, or a list of k reply texts per row. A reply is right when
    world.check_answer accepts it and clean when world.is_clean_reply(reply, the row's lang) holds (rows whose
    language is not one of world.LANGS get no clean verdict). Returns (metrics, verdicts):
    metrics {"exact_match", "clean_rate"} (shares of rows) each also `_by_task` and `_by_lang` (dicts of shares),
    and with sampled the same four for the k samples ("exact_match_sampled": the mean over rows of the share of
    a row's k samples that are right, etc.) and "eval_samples": k; verdicts one dict per row: task, lang, right
    (0/1), clean (0/1 or None), and with sampled sampled_right and sampled_clean (counts out of k)."""
    k = len(sampled[0]) if sampled else 0
    verdicts = []
    for i, (row, text) in enumerate(zip(rows, greedy)):
        lang = row.get("lang", "?")
        judge_clean = lang in world.LANGS

        def right(t):
            return int(bool(world.check_answer(t, row["answer"], row.get("task"))))

        def clean(t):
            return int(world.is_clean_reply(t, lang)) if judge_clean else None
        v = {"task": row.get("task", "?"), "lang": lang, "right": right(text), "clean": clean(text)}
        if k:
            v["sampled_right"] = sum(right(t) for t in sampled[i])
            v["sampled_clean"] = sum(clean(t) for t in sampled[i]) if judge_clean else None
        verdicts.append(v)

    def rates(key, scale=1):
        scored = [v for v in verdicts if v[key] is not None]
        share = lambda vs: sum(v[key] for v in vs) / (scale * len(vs)) if vs else 0.0  # noqa: E731
        by = {group: {} for group in ("task", "lang")}
        for group in by:
            for value in sorted({v[group] for v in scored}):
                by[group][value] = share([v for v in scored if v[group] == value])
        return share(scored), by["task"], by["lang"]
    metrics = {}
    for name, key, scale in (("exact_match", "right", 1), ("clean_rate", "clean", 1),
                             ("exact_match_sampled", "sampled_right", k), ("clean_rate_sampled", "sampled_clean", k)):
        if scale:
            metrics[name], metrics[f"{name}_by_task"], metrics[f"{name}_by_lang"] = rates(key, scale)
    if k:
        metrics["eval_samples"] = k
    return metrics, verdicts


def evaluate_exact_match(model, tokenizer, dataset, device, max_prompts=200, max_new_tokens=32, batch_size=32,
                         autocast=None, n_samples=3, eval_samples=0, seed=0, compile=False):
    """Greedy answers to the first `max_prompts` checkable prompts of data/<dataset>/prompts_val, generated in
    batches (engine.generate_replies: left padding, cut at the first special token, i.e. the end of turn), and,
    with eval_samples = k > 0, k sampled answers to each at the chat's settings (engine.sample_replies with
    engine.CHAT_SAMPLING, its generator seeded with `seed`: the same model gives the same samples), all scored by
    reply_metrics (world.check_answer, world.is_clean_reply). Returns reply_metrics' metrics plus "exact_match_n"
    (prompts scored), "samples": [[prompt, response, answer, right], ...] (the first n_samples greedy answers with
    their verdict) and "verdicts": per prompt (reply_metrics' verdicts with "id", the prompt's line number in
    prompts_val.jsonl, counting from 0). exact_match 0.0 and empty dicts when the set has no checkable prompt.
    compile=True decodes with the compiled step (GPT.generate_stream)."""
    rows = prepare.load_prompts(dataset, "val")  # each with its rendered prompt in "ids"
    items = [(i, row) for i, row in enumerate(rows) if row.get("answer") is not None][:max_prompts]
    prompts = [row["ids"] for _, row in items]
    # longest first and in batches of similar length: less padding, and a too-long batch fails at once
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    responses = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        replies = generate_replies(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, device,
                                   autocast=autocast, compile=compile)
        for i, reply in zip(chunk, replies):
            responses[i] = reply.text
    sampled = None
    if eval_samples and items:
        sampled = [[r.text for r in replies] for replies in
                   sample_replies(model, tokenizer, prompts, eval_samples, max_new_tokens, device, seed,
                                  batch_size=2 * batch_size, autocast=autocast)]
    metrics, verdicts = reply_metrics([row for _, row in items], responses, sampled)
    for (i, _), v in zip(items, verdicts):
        v["id"] = i

    def question(row):  # what the user asked (ChatML's role names are text: decode(ids) would show them)
        users = [m["content"] for m in row.get("messages") or [] if m.get("role") == "user"]
        return users[-1] if users else tokenizer.decode(row["ids"])
    samples = [[question(row), response, row["answer"], bool(v["right"])]
               for (_, row), response, v in list(zip(items, responses, verdicts))[:n_samples]]
    return {**metrics, "exact_match_n": len(items), "samples": samples, "verdicts": verdicts}


class ExactMatchEval:
    """The `evaluate` a chat stage gives train(): evaluate_exact_match on the data set's held-out checkable prompts,
    or nothing when it has none (a real data set) or max_prompts is 0. Sampled answers (eval_samples per prompt)
    are scored at the final evaluation only (the one at step final_step, read from the metrics train() passes),
    where they cost eval_samples x the greedy pass. The last evaluation's sample answers are kept in .samples (they
    stay out of the metrics) and its per-prompt verdicts written to out_dir/eval_prompts.jsonl (one JSON object
    per prompt: id, task, lang, right, clean, sampled_right, sampled_clean; the pipeline's paired sign test reads
    them) by the master process."""

    def __init__(self, dataset, tokenizer, rt, max_prompts, max_new_tokens, n_samples=4, eval_samples=0,
                 final_step=None, out_dir=None, seed=0):
        self.dataset, self.tokenizer, self.rt = dataset, tokenizer, rt
        self.max_prompts, self.max_new_tokens, self.n_samples = max_prompts, max_new_tokens, n_samples
        self.eval_samples, self.final_step, self.out_dir, self.seed = eval_samples, final_step, out_dir, seed
        if eval_samples < 0:
            raise UserError(f"--eval_samples={eval_samples}: must be 0 (none) or more")
        self.enabled = max_prompts > 0 and os.path.exists(os.path.join(dataset_dir(dataset), "prompts_val.jsonl"))
        self.samples = []

    def __call__(self, model, metrics=None):
        if not self.enabled:
            return {}
        step = (metrics or {}).get("step")
        final = self.final_step is None or step is None or step >= self.final_step
        result = evaluate_exact_match(model, self.tokenizer, self.dataset, self.rt.device,
                                      max_prompts=self.max_prompts, max_new_tokens=self.max_new_tokens,
                                      autocast=self.rt.autocast, n_samples=self.n_samples,
                                      eval_samples=self.eval_samples if final else 0, seed=self.seed,
                                      compile=self.rt.compile)
        self.samples = result.pop("samples")
        verdicts = result.pop("verdicts")
        if self.out_dir and self.rt.master:
            os.makedirs(self.out_dir, exist_ok=True)
            write_atomic(os.path.join(self.out_dir, "eval_prompts.jsonl"),
                         lambda f: f.writelines(json.dumps(v, ensure_ascii=False) + "\n" for v in verdicts),
                         mode="w")
        return result


def print_samples(samples, title="sample answers to held-out prompts (greedy)"):
    """Print evaluate_exact_match's samples: each prompt, the model's answer, and whether the checker took it."""
    if not samples:
        return
    print(title + ":")
    for prompt, response, answer, right in samples:  # as evaluate_exact_match scored them
        verdict = "right" if right else f"wrong, expected {answer}"
        print(f"  > {' '.join(prompt.split())}\n    {' '.join(response.split()) or '(no answer)'}   [{verdict}]")

