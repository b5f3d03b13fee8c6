"""
The whole life of a chat model in one command, ending with a report card.

    python pipeline.py                                  # the embedded world, CPU sizes: ~16 min on 2 cores
    python pipeline.py --seed=2 --out_dir=runs/seed2    # another seed, in its own folder
    python pipeline.py config/pipeline_gpu.py           # real public data sets on a GPU (see the README)
    python pipeline.py --restart=True                   # redo every stage instead of going on from the last done

Runs prepare -> pretrain -> sft -> dpo -> reward model -> ppo -> grpo, each as its own script (exactly what you
would type), each stage starting from the previous one's checkpoint:

    pretrain -> sft -> dpo
                sft -> reward model
                sft + reward model -> ppo, grpo     (rewards: the reward model plus the exact answer checker)

Checkpoints go to <out_dir>/<stage>/ (by default checkpoints/, where the stage scripts look by themselves), each
stage's printed output to <out_dir>/logs/<stage>.log. A stage that finished is not run again (pipeline.json
records it); one that was interrupted is continued with --resume=True. At the end it answers the same held-out
prompts with every stage's model and writes <out_dir>/report.md: each stage's metrics, time and tokens; greedy and
sampled exact match and the clean-reply rate, overall, per language and per task family; each alignment stage
against SFT (gains, and the paired sign test over the held-out prompts for greedy and sampled exact match); the
answers side by side; and the curves (<out_dir>/curves.png and each stage's PNG).

Variant stages (VARIANTS) run a base stage with one setting changed, from the same start, each in its own folder:
dpo_ipo, dpo_hinge, dpo_simpo, dpo_orpo (DPO's loss types; dpo itself is sigmoid) and grpo_batch, grpo_none
(GRPO's advantage scalings; grpo itself divides by the group's std). The methods table, every one of them
against the same SFT model:

    python pipeline.py config/pipeline_methods.py       # reuses the stages a default run in the same out_dir did
"""
import json
import math
import os
import shlex
import subprocess
import sys
import time

import torch

import common
import engine
import prepare
import world

# -----------------------------------------------------------------------------
out_dir = 'checkpoints'        # every stage's folder, the logs and the report
dataset = 'world'              # data/<dataset>/: what every stage trains on
prepare_args = ('',)           # one prepare.py run per entry ('' = the embedded world; {dataset} and {data} are
                               # --dataset and its folder); once per out_dir
stages = ('pretrain', 'sft', 'dpo', 'reward', 'ppo', 'grpo')
# extra arguments per stage (a config/PRESET.py and/or --key=value), after the ones the pipeline sets itself
pretrain_args = ''
sft_args = ''
dpo_args = ''
reward_args = ''
ppo_args = ''
grpo_args = ''
n_report_prompts = 3           # held-out prompts answered by every stage in the report
report_max_new_tokens = 40
seed = 1337
device = 'auto'
restart = False                # True: run every stage again, even those that finished
pool = ()                      # out_dirs of finished runs (seeds): write <out_dir>/seeds.md across them, run nothing
# -----------------------------------------------------------------------------

SCRIPTS = {"pretrain": "pretrain.py", "sft": "sft.py", "dpo": "dpo.py", "reward": "reward_model.py",
           "ppo": "ppo.py", "grpo": "ppo.py"}
# variant stages: a base stage's run with one setting changed, from the same start, in its own folder (for the
# methods table: every DPO loss type and GRPO advantage scaling on the same SFT model)
# ({dataset} is the run's --dataset). sft_clean is SFT on the same data without the demonstration flaws (prepared
# by config/pipeline_seeds.py's second prepare run): the ceiling that removing the flaws can reach
VARIANTS = {"dpo_ipo": ("dpo", "--loss_type=ipo"), "dpo_hinge": ("dpo", "--loss_type=hinge"),
            "dpo_simpo": ("dpo", "--loss_type=simpo"), "dpo_orpo": ("dpo", "--loss_type=orpo"),
            "grpo_batch": ("grpo", "--advantage_scale=batch"), "grpo_none": ("grpo", "--advantage_scale=none"),
            "sft_clean": ("sft", "--dataset={dataset}_clean")}
# what each stage starts from (the reward model is used by ppo and grpo through --reward_from)
INIT_FROM = {"sft": "pretrain", "dpo": "sft", "reward": "sft", "ppo": "sft", "grpo": "sft"}
# the headline figures of each stage, in the order the report shows them
REPLY_METRICS = ("exact_match", "exact_match_sampled", "clean_rate", "clean_rate_sampled")
KEY_METRICS = {"pretrain": ("val_loss", "ppl"), "sft": ("val_loss",) + REPLY_METRICS,
               "dpo": ("pref_accuracy", "logp_pref_accuracy", "reward_margin", "kl") + REPLY_METRICS,
               "reward": ("pair_accuracy", "reward_margin"),
               "ppo": ("reward_mean", "kl", "exact_match_start") + REPLY_METRICS,
               "grpo": ("reward_mean", "kl", "zero_spread", "exact_match_start") + REPLY_METRICS}
ROOT = os.path.dirname(os.path.abspath(__file__))


def base_stage(stage):
    """The stage a variant stage is a run of (dpo for dpo_ipo); a stage itself otherwise."""
    return VARIANTS[stage][0] if stage in VARIANTS else stage


def stage_command(stage, cfg):
    """The command line of one stage: its script, the pipeline's own settings, then the user's extra arguments
    (a variant stage: its base stage's, then its own setting)."""
    folder = os.path.join(cfg["out_dir"], stage)
    base = base_stage(stage)
    cmd = [sys.executable, os.path.join(ROOT, SCRIPTS[base]), f"--dataset={cfg['dataset']}", f"--out_dir={folder}",
           f"--seed={cfg['seed']}", f"--device={cfg['device']}"]
    if base in INIT_FROM:
        cmd.append(f"--init_from={os.path.join(cfg['out_dir'], INIT_FROM[base])}")
    if base in ("ppo", "grpo"):
        cmd += [f"--algo={base}", f"--reward_from={os.path.join(cfg['out_dir'], 'reward')}"]
    return cmd + shlex.split(cfg[f"{base}_args"]) + ([VARIANTS[stage][1].format(dataset=cfg["dataset"])]
                                                     if stage in VARIANTS else [])


def run_logged(cmd, log_path):
    """Run a command with its stdout in log_path and its stderr (progress bars, errors) on the terminal; returns
    the exit status. The log also gets the command line, so a failed stage can be rerun by hand."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=None)
        try:
            return p.wait()
        except KeyboardInterrupt:  # the stage got the Ctrl-C too: let it save its checkpoint and exit
            return p.wait()


def last_json(log_path):
    with open(log_path, encoding="utf-8") as f:
        for line in reversed(f.read().splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    return {}


def stage_tokens(folder):
    """Tokens the stage processed: the last `tokens` the training loop logged (PPO: prompt + response tokens of its
    rollouts)."""
    tokens = 0
    path = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                tokens = r.get("tokens", tokens)
    return tokens


def fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main():
    cfg = common.configure(globals())
    unknown = [s for s in stages if s not in SCRIPTS and s not in VARIANTS]
    if unknown:
        raise common.UserError(f"--stages: unknown stage(s) {unknown}; known: {', '.join([*SCRIPTS, *VARIANTS])}")
    os.makedirs(out_dir, exist_ok=True)
    if pool:
        path = os.path.join(out_dir, "seeds.md")
        lines = pooled_report(pool)
        common.write_atomic(path, lambda f: f.write("\n".join(lines)), mode="w")
        print("\n".join(lines) + f"\nwritten to {path}")
        return
    state_path = os.path.join(out_dir, "pipeline.json")
    state = {"stages": {}}
    if os.path.exists(state_path) and not restart:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    logs = os.path.join(out_dir, "logs")
    t_start = time.time()

    def save_state():
        common.write_atomic(state_path, lambda f: json.dump(state, f, indent=1, ensure_ascii=False), mode="w")

    # data: prepared once per set of prepare_args (a run cut short during prepare prepares again)
    data = common.dataset_dir(dataset)
    n = len(stages) + 1
    if state.get("prepare") == list(prepare_args) and os.path.exists(os.path.join(data, "meta.json")):
        print(f"[1/{n}] prepare: {data} done earlier, kept", flush=True)
    else:
        t0 = time.time()
        print(f"[1/{n}] prepare -> {data}", flush=True)
        for extra in prepare_args:
            cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), f"--dataset={dataset}",
                   *shlex.split(extra.format(dataset=dataset, data=data))]
            if run_logged(cmd, os.path.join(logs, "prepare.log")):
                raise common.UserError(f"prepare failed: see {os.path.join(logs, 'prepare.log')}")
        state["prepare"] = list(prepare_args)
        save_state()
        print(f"      done in {time.time() - t0:.0f}s", flush=True)

    for i, stage in enumerate(stages, 2):
        folder = os.path.join(out_dir, stage)
        cmd = stage_command(stage, cfg)
        done = state["stages"].get(stage)
        if done and done.get("command") == cmd[1:] and os.path.exists(os.path.join(folder, "ckpt.pt")):
            print(f"[{i}/{n}] {stage}: done earlier ({done['seconds']:.0f}s), kept", flush=True)
            continue
        resuming = os.path.exists(os.path.join(folder, "ckpt.pt")) and not restart and done is None \
            and state.get("running") == stage
        print(f"[{i}/{n}] {stage}{' (resuming)' if resuming else ''} -> {folder}", flush=True)
        state["running"] = stage
        save_state()
        t0 = time.time()
        log_path = os.path.join(logs, f"{stage}.log")
        if not resuming and os.path.exists(log_path):
            os.remove(log_path)
        status = run_logged(cmd + (["--resume=True"] if resuming else []), log_path)
        if status in (130, 143):
            state.setdefault("partial_seconds", {})[stage] = time.time() - t0 + \
                (state.get("partial_seconds", {}).get(stage, 0) if resuming else 0)
            save_state()
            print(f"interrupted during {stage}: run the same command again to continue", file=sys.stderr)
            sys.exit(status)
        if status:
            raise common.UserError(f"{stage} failed (exit status {status}): see {log_path}")
        metrics = last_json(log_path)
        seconds = time.time() - t0 + (state.get("partial_seconds", {}).get(stage, 0) if resuming else 0)
        state["stages"][stage] = {"command": cmd[1:], "seconds": seconds, "metrics": metrics,
                                  "tokens": stage_tokens(folder)}
        state.pop("running", None)
        state.get("partial_seconds", {}).pop(stage, None)
        save_state()
        shown = ", ".join(f"{k} {fmt(metrics[k])}" for k in KEY_METRICS[base_stage(stage)] if k in metrics)
        print(f"      done in {seconds:.0f}s: {shown}", flush=True)

    answers = side_by_side(cfg, state)
    path = write_report(cfg, state, answers)
    print(f"report: {path} ({time.time() - t_start:.0f}s in all)")
    for prompt, row in answers:
        print(f"\n> {prompt}")
        for stage, text in row:
            print(f"  {stage:>8}: {text}")


# ----------------------------------------------------------------------------------------------------------------
# the same prompts, every stage

def report_prompts(n):
    """n held-out prompts of different task families and languages (the val set is interleaved by task and
    language, so its first prompts already vary); on a data set without them, none."""
    try:
        rows = prepare.load_prompts(dataset, "val")
    except common.UserError:
        return []
    picked, seen = [], set()
    for r in rows:  # one per task family first, single-turn (easier to read side by side)
        if len(r["messages"]) == 1 and r.get("task") not in seen:
            picked.append(r)
            seen.add(r.get("task"))
        if len(picked) == n:
            break
    return picked


@torch.no_grad()
def answer(model, tokenizer, row, chat):
    """Greedy answer: chat checkpoints get the chat template; the pretraining checkpoint the corpus's own
    'Question: ... Answer:' form, which is how it saw questions answered."""
    if chat:
        ids = row["ids"]
    else:
        q = row["messages"][-1]["content"]
        ids = [tokenizer.eot_id] + tokenizer.encode(f"Question: {q}\nAnswer:" if row.get("lang") != "zh"
                                                    else f"问题：{q}\n回答：")
    ids = ids[-(model.config.block_size - report_max_new_tokens):]
    text = engine.generate_replies(model, tokenizer, [ids], report_max_new_tokens, "cpu")[0].text
    return (text if chat else text.split("\n")[0]).strip()


def side_by_side(cfg, state):
    rows = report_prompts(n_report_prompts)
    table = []
    models = {}
    for stage in stages:
        path = os.path.join(out_dir, stage, "ckpt.pt")
        if stage != "reward" and stage in state["stages"] and os.path.exists(path):
            models[stage] = engine.model_from_checkpoint(common.load_checkpoint(path), "cpu")
    for row in rows:
        line = []
        for stage, (model, tok) in models.items():
            text = answer(model, tok, row, chat=stage != "pretrain")
            mark = ""
            if row.get("answer") is not None:
                mark = " ✓" if world.check_answer(text, row["answer"], row.get("task")) else " ✗"
            line.append((stage, (text or "(no answer)") + mark))
        table.append((row["messages"][-1]["content"], line))
    return table


# ----------------------------------------------------------------------------------------------------------------
# the report card

CURVES = {"pretrain": ("train_loss", "val_loss"), "sft": ("train_loss", "val_loss"), "dpo": ("train_loss", "val_loss"),
          "reward": ("train_pair_accuracy", "pair_accuracy"), "ppo": ("reward_mean", "exact_match"),
          "grpo": ("reward_mean", "exact_match")}


def plot_curves(cfg, path):
    """One figure with a panel per stage: its loss, or its reward and exact match, against the step."""
    from matplotlib.figure import Figure
    done = [s for s in stages if os.path.exists(os.path.join(out_dir, s, "metrics.jsonl"))]
    if not done:
        return None
    fig = Figure(figsize=(10, 2.6 * ((len(done) + 1) // 2)), dpi=100)
    axes = fig.subplots((len(done) + 1) // 2, 2, squeeze=False).flatten()
    for ax, stage in zip(axes, done):
        with open(os.path.join(out_dir, stage, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        for key in CURVES[base_stage(stage)]:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), "o-" if len(pts) < 20 else "-", ms=3, lw=1, label=key.replace("_", " "))
        ax.set_title(stage)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(done):]:
        ax.set_visible(False)
    fig.tight_layout()
    common.write_atomic(path, lambda f: fig.savefig(f, format="png"))
    return path


def sign_test(wins, losses):
    """Two-sided exact binomial test of `wins` against `losses` (the discordant pairs; ties left out) under
    p = 1/2: min(1, 2 P(X <= min(wins, losses))) with X ~ Binomial(wins + losses, 1/2) (the sign test, e.g.
    Conover, Practical Nonparametric Statistics, 3.4). 1.0 when there is no discordant pair."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integer arithmetic until this one division


def read_verdicts(folder):
    """A stage's per-prompt verdicts (evaluation.ExactMatchEval's eval_prompts.jsonl) by prompt id; {} without."""
    path = os.path.join(folder, "eval_prompts.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {v["id"]: v for v in map(json.loads, f)}


def paired_counts(stage, reference, key, k_stage=1, k_reference=1):
    """(prompts where `stage` does better, prompts where `reference` does) on the prompts both scored: by the
    verdict `key` as a share of k (right: 0/1 of 1; sampled_right: a count of k samples), ties left out; None when
    either lacks the key."""
    ids = sorted(set(stage) & set(reference))
    if not ids or any(stage[i].get(key) is None or reference[i].get(key) is None for i in ids):
        return None
    # a / k_s > b / k_r compared in integers: no float ties
    diffs = [stage[i][key] * k_reference - reference[i][key] * k_stage for i in ids]
    return sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)


def pct(v):
    return "" if v is None else f"{100 * v:.1f}%"


def write_report(cfg, state, answers):
    done = [s for s in stages if s in state["stages"]]
    lines = [f"# Report card: {out_dir}", "",
             f"Data set `{dataset}`, seed {seed}. Every figure is measured on held-out data: val loss on held-out "
             f"text; on held-out checkable prompts (world.check_answer) exact match of the greedy reply and of "
             f"sampled replies at the chat's settings (temperature, top-k, top-p of generate.py; the mean over the "
             f"samples of each prompt), and the clean-reply rate (world.is_clean_reply: in the question's language, "
             f"no demonstrated flaw); preference and pair accuracy on held-out pairs.", "",
             "| stage | time | tokens | key metrics |", "| --- | ---: | ---: | --- |"]
    for s in done:
        st = state["stages"][s]
        m = st["metrics"]
        shown = ", ".join(f"{k} {fmt(m[k])}" for k in KEY_METRICS[base_stage(s)] if k in m)
        lines.append(f"| {s} | {st['seconds'] / 60:.1f} min | {st.get('tokens', 0):,} | {shown} |")
    total = sum(state["stages"][s]["seconds"] for s in done)
    lines += ["", f"Training time in all: {total / 60:.1f} min.", ""]

    em_stages = [s for s in done if "exact_match_by_task" in state["stages"][s]["metrics"]]
    tables = (("exact_match", "Exact match, greedy"), ("exact_match_sampled", "Exact match, sampled"),
              ("clean_rate", "Clean-reply rate, greedy"), ("clean_rate_sampled", "Clean-reply rate, sampled"))
    for key, title in tables:
        have = [s for s in em_stages if key in state["stages"][s]["metrics"]]
        if not have:
            continue
        ms = {s: state["stages"][s]["metrics"] for s in have}
        tasks = sorted({t for s in have for t in ms[s].get(f"{key}_by_task", {})})
        langs = sorted({t for s in have for t in ms[s].get(f"{key}_by_lang", {})})
        lines += [f"## {title} on held-out checkable prompts", "",
                  "| | " + " | ".join(have) + " |", "| --- |" + " ---: |" * len(have)]
        for t in ["all"] + langs + tasks:
            cells = [pct(ms[s][key] if t == "all" else ms[s].get(f"{key}_by_lang", {}).get(
                t, ms[s].get(f"{key}_by_task", {}).get(t))) for s in have]
            lines.append(f"| {'**all**' if t == 'all' else t} | " + " | ".join(cells) + " |")
        n_em = ms[have[0]].get("exact_match_n")
        k = ms[have[0]].get("eval_samples")
        lines += ["", f"({n_em} prompts per stage" + (f", {k} samples each" if "sampled" in key and k else "")
                  + "; rows: all, per language, per task family.)", ""]

    lines += against_sft(state, done)

    if answers:
        lines += ["## The same held-out prompts, every stage (greedy)", ""]
        for prompt, row in answers:
            lines += [f"**{prompt}**", ""] + [f"- {stage}: {text}" for stage, text in row] + [""]

    curves = plot_curves(cfg, os.path.join(out_dir, "curves.png"))
    if curves:
        lines += ["## Curves", "", "![curves](curves.png)", ""]
        for s in done:
            for png in ("loss.png", "reward.png"):
                if os.path.exists(os.path.join(out_dir, s, png)):
                    lines.append(f"- {s}: [{s}/{png}]({s}/{png})")
        lines.append("")
    path = os.path.join(out_dir, "report.md")
    common.write_atomic(path, lambda f: f.write("\n".join(lines)), mode="w")
    return path


def against_sft(state, done):
    """The report's section that compares each alignment stage with SFT on the same held-out prompts: gains in
    greedy and sampled exact match and clean-reply rate, time, and the paired sign test (sign_test) over the
    prompts where the two differ, for greedy and for sampled exact match."""
    if "sft" not in done:
        return []
    sft_m, sft_v = state["stages"]["sft"]["metrics"], read_verdicts(os.path.join(out_dir, "sft"))
    rows = []
    for s in done:
        m = state["stages"][s]["metrics"]
        if s in ("pretrain", "sft", "reward") or "exact_match" not in m or not sft_v:
            continue
        v = read_verdicts(os.path.join(out_dir, s))
        cells = [s, f"{state['stages'][s]['seconds'] / 60:.1f} min"]
        for key, verdict in (("exact_match", "right"), ("exact_match_sampled", "sampled_right")):
            gain = f"{100 * (m[key] - sft_m[key]):+.1f}" if key in m and key in sft_m else ""
            k = (m.get("eval_samples", 1), sft_m.get("eval_samples", 1)) if verdict == "sampled_right" else (1, 1)
            counts = paired_counts(v, sft_v, verdict, *k)
            test = "" if counts is None else f"{counts[0]} / {counts[1]}, p = {sign_test(*counts):.3g}"
            cells += [f"{pct(m.get(key))} ({gain})" if gain else pct(m.get(key)), test]
        for key in ("clean_rate", "clean_rate_sampled"):
            gain = f" ({100 * (m[key] - sft_m[key]):+.1f})" if key in m and key in sft_m else ""
            cells.append(pct(m.get(key)) + gain)
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["## Against SFT, on the same held-out prompts", "",
            "Change in points against SFT in brackets. Sign test: the prompts where the stage does better / worse "
            "than SFT (greedy: right or not; sampled: the share of its samples that are right), and the two-sided "
            "exact binomial p-value on them (ties left out).", "",
            f"SFT: greedy {pct(sft_m.get('exact_match'))}, sampled {pct(sft_m.get('exact_match_sampled'))}, clean "
            f"{pct(sft_m.get('clean_rate'))} greedy, {pct(sft_m.get('clean_rate_sampled'))} sampled.", "",
            "| stage | time | exact match, greedy | better / worse, sign test | exact match, sampled | "
            "better / worse, sign test | clean, greedy | clean, sampled |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, ""]


# ----------------------------------------------------------------------------------------------------------------
# several runs (seeds) side by side

def pooled_report(runs):
    """The table across finished runs of the same data (one per seed): per policy stage, greedy and sampled exact
    match on each run and their mean with its change against SFT; the sign test against SFT pooled over the runs
    (each run's prompts are pairs of their own: wins and losses are summed over the runs, then sign_test); the
    clean-reply rate; the share of the gap between SFT and sft_clean (clean-demonstration SFT) in mean sampled
    exact match that the stage recovers, where every run has sft_clean; and the mean time."""
    states = []
    for run in runs:
        path = os.path.join(run, "pipeline.json")
        if not os.path.exists(path):
            raise common.UserError(f"--pool: {path} not found: run the pipeline with --out_dir={run} first")
        with open(path, encoding="utf-8") as f:
            states.append(json.load(f)["stages"])
    names = [s for s in states[0] if all(s in st for st in states)
             and "exact_match" in states[0][s]["metrics"]]
    if "sft" not in names:
        raise common.UserError("--pool: every run needs a finished sft stage with exact match")

    def mean(stage, key):
        vals = [st[stage]["metrics"].get(key) for st in states]
        return None if None in vals else sum(vals) / len(vals)

    def seeds(stage, key):
        return " / ".join(pct(st[stage]["metrics"].get(key)) for st in states)

    verdicts = {}  # (run, stage) -> read_verdicts: each file read once

    def verdicts_of(run, stage):
        if (run, stage) not in verdicts:
            verdicts[run, stage] = read_verdicts(os.path.join(run, stage))
        return verdicts[run, stage]

    gap = None
    if "sft_clean" in names:
        gap = mean("sft_clean", "exact_match_sampled") - mean("sft", "exact_match_sampled")
    lines = [f"# {len(runs)} runs: {', '.join(runs)}", "",
             "Exact match on the held-out checkable prompts of each run (greedy, and sampled at the chat's settings), "
             "then the mean and its change against SFT in points. Sign test against SFT: the prompts where the stage "
             "does better / worse, summed over the runs, and the two-sided exact binomial p-value. Gap recovered: "
             "(stage - SFT) / (sft_clean - SFT) in mean sampled exact match, sft_clean being SFT on the same "
             "demonstrations without their flaws.", "",
             "| stage | greedy, each run | mean | better / worse, p | sampled, each run | mean | better / worse, p | "
             "gap recovered | clean, sampled (mean) | time (mean) |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for stage in names:
        cells = [stage]
        for key, verdict in (("exact_match", "right"), ("exact_match_sampled", "sampled_right")):
            m, m_sft = mean(stage, key), mean("sft", key)
            change = "" if stage == "sft" or m is None or m_sft is None else f" ({100 * (m - m_sft):+.1f})"
            wins = losses = 0
            for run, st in zip(runs, states):
                k = ((st[stage]["metrics"].get("eval_samples", 1), st["sft"]["metrics"].get("eval_samples", 1))
                     if verdict == "sampled_right" else (1, 1))
                counts = paired_counts(verdicts_of(run, stage), verdicts_of(run, "sft"), verdict, *k)
                if counts is None:
                    wins = None
                    break
                wins, losses = wins + counts[0], losses + counts[1]
            test = "" if stage == "sft" or wins is None else f"{wins} / {losses}, p = {sign_test(wins, losses):.3g}"
            cells += [seeds(stage, key), pct(m) + change, test]
        m = mean(stage, "exact_match_sampled")
        cells.append("" if gap is None or stage in ("sft", "sft_clean") or m is None or gap <= 0
                     else f"{100 * (m - mean('sft', 'exact_match_sampled')) / gap:.0f}%")
        cells.append(pct(mean(stage, "clean_rate_sampled")))
        cells.append(f"{sum(st[stage]['seconds'] for st in states) / len(states) / 60:.1f} min")
        lines.append("| " + " | ".join(cells) + " |")
    totals = [sum(v["seconds"] for v in st.values()) / 60 for st in states]
    lines += ["", "Time of all stages in each run: " + ", ".join(f"{t:.1f} min" for t in totals) + ".", ""]
    return lines


if __name__ == "__main__":
    common.cli(main)
