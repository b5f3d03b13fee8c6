"""
The whole life of a chat model in one command, ending with a report card.

    python pipeline.py                                  # the embedded world, CPU sizes: ~10 minutes on 2 cores
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
prompts with every stage's model and writes <out_dir>/report.md: each stage's metrics, time and tokens, exact
match per task family, the answers side by side, and the curves (<out_dir>/curves.png and each stage's PNG).
"""
import json
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
prepare_args = ('',)           # one prepare.py run per entry ('' = the embedded world); once per out_dir
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
# -----------------------------------------------------------------------------

SCRIPTS = {"pretrain": "pretrain.py", "sft": "sft.py", "dpo": "dpo.py", "reward": "reward_model.py",
           "ppo": "ppo.py", "grpo": "ppo.py"}
# what each stage starts from (the reward model is used by ppo and grpo through --reward_from)
INIT_FROM = {"sft": "pretrain", "dpo": "sft", "reward": "sft", "ppo": "sft", "grpo": "sft"}
# the headline figures of each stage, in the order the report shows them
KEY_METRICS = {"pretrain": ("val_loss", "ppl"), "sft": ("val_loss", "exact_match"),
               "dpo": ("pref_accuracy", "logp_pref_accuracy", "reward_margin", "kl", "exact_match"),
               "reward": ("pair_accuracy", "reward_margin"),
               "ppo": ("reward_mean", "kl", "exact_match_start", "exact_match"),
               "grpo": ("reward_mean", "kl", "exact_match_start", "exact_match")}
ROOT = os.path.dirname(os.path.abspath(__file__))


def stage_command(stage, cfg):
    """The command line of one stage: its script, the pipeline's own settings, then the user's extra arguments."""
    folder = os.path.join(cfg["out_dir"], stage)
    cmd = [sys.executable, os.path.join(ROOT, SCRIPTS[stage]), f"--dataset={cfg['dataset']}", f"--out_dir={folder}",
           f"--seed={cfg['seed']}", f"--device={cfg['device']}"]
    if stage in INIT_FROM:
        cmd.append(f"--init_from={os.path.join(cfg['out_dir'], INIT_FROM[stage])}")
    if stage in ("ppo", "grpo"):
        cmd += [f"--algo={stage}", f"--reward_from={os.path.join(cfg['out_dir'], 'reward')}"]
    return cmd + shlex.split(cfg[f"{stage}_args"])


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
    unknown = [s for s in stages if s not in SCRIPTS]
    if unknown:
        raise common.UserError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(SCRIPTS)}")
    os.makedirs(out_dir, exist_ok=True)
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
            cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), f"--dataset={dataset}", *shlex.split(extra)]
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
        shown = ", ".join(f"{k} {fmt(metrics[k])}" for k in KEY_METRICS[stage] if k in metrics)
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
        for key in CURVES[stage]:
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


def write_report(cfg, state, answers):
    done = [s for s in stages if s in state["stages"]]
    lines = [f"# Report card: {out_dir}", "",
             f"Data set `{dataset}`, seed {seed}. Every figure is measured on held-out data: val loss on held-out "
             f"text, exact match on held-out checkable prompts (greedy decoding, world.check_answer), preference and "
             f"pair accuracy on held-out pairs.", "",
             "| stage | time | tokens | key metrics |", "| --- | ---: | ---: | --- |"]
    for s in done:
        st = state["stages"][s]
        m = st["metrics"]
        shown = ", ".join(f"{k} {fmt(m[k])}" for k in KEY_METRICS[s] if k in m)
        lines.append(f"| {s} | {st['seconds'] / 60:.1f} min | {st.get('tokens', 0):,} | {shown} |")
    total = sum(state["stages"][s]["seconds"] for s in done)
    lines += ["", f"Training time in all: {total / 60:.1f} min.", ""]

    em_stages = [s for s in done if "exact_match_by_task" in state["stages"][s]["metrics"]]
    if em_stages:
        tasks = sorted({t for s in em_stages for t in state["stages"][s]["metrics"]["exact_match_by_task"]})
        langs = sorted({t for s in em_stages for t in state["stages"][s]["metrics"].get("exact_match_by_lang", {})})
        lines += ["## Exact match on held-out checkable prompts", "",
                  "| | " + " | ".join(em_stages) + " |", "| --- |" + " ---: |" * len(em_stages)]
        for t in ["all"] + tasks + langs:
            cells = []
            for s in em_stages:
                m = state["stages"][s]["metrics"]
                v = (m["exact_match"] if t == "all" else m["exact_match_by_task"].get(t,
                     m.get("exact_match_by_lang", {}).get(t)))
                cells.append("" if v is None else f"{100 * v:.1f}%")
            lines.append(f"| {'**all**' if t == 'all' else t} | " + " | ".join(cells) + " |")
        n_em = state["stages"][em_stages[0]]["metrics"].get("exact_match_n")
        lines += ["", f"({n_em} prompts per stage; per-language rows: en, zh.)", ""]

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


if __name__ == "__main__":
    common.cli(main)
