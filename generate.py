"""
Chat with a checkpoint in the terminal, or generate once for a script.

    python generate.py --ckpt=checkpoints/sft/ckpt.pt                        # multi-turn chat, streamed
    python generate.py --ckpt=checkpoints/sft/ckpt.pt --prompt="3+4=?"       # answer once, exit
    python generate.py --ckpt=checkpoints/pretrain/ckpt.pt --prompt="Once"   # continue plain text

Works with every policy checkpoint (pretrain, sft, dpo, ppo), a quantized one (quantize.py) included; a
pretraining checkpoint never saw the chat template, so it continues plain text instead of chatting.
In the chat: /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply (at the prompt: quits).
"""
import sys

import torch

import common
import engine
from model import check_sampling
from tokenizer import StreamDecoder

# -----------------------------------------------------------------------------
ckpt = 'checkpoints/sft/ckpt.pt'
prompt = ''                # non-empty: answer this once and exit
system = ''                # system message that starts every conversation (chat checkpoints)
max_new_tokens = 256
temperature = engine.CHAT_SAMPLING["temperature"]  # 0 (or below 1e-5) = greedy
top_k = engine.CHAT_SAMPLING["top_k"]              # 0 = off
top_p = engine.CHAT_SAMPLING["top_p"]              # 1.0 = off
repetition_penalty = 1.0   # > 1 discourages tokens already in the context
seed = 1337
device = 'auto'            # auto = cuda, then mps, then cpu
compile = 'auto'           # a torch.compile'd decode step: auto = on CUDA only (on the CPU its warm-up costs more
                           # than a chat saves; README, speed)
# -----------------------------------------------------------------------------

COMMANDS = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def fit_chat(tokenizer, messages, block_size, max_new_tokens):
    """Render `messages` as a prompt that leaves room for the reply inside the context window, dropping the
    oldest exchanges first (a system message stays while anything else can go). Returns (prompt ids, the
    messages kept, note or None). A single message too long even alone is cut from its start: the end of what
    the user wrote is what the reply must follow."""
    budget = block_size - min(max_new_tokens, block_size // 2)
    msgs = list(messages)
    ids = tokenizer.render_prompt(msgs)
    dropped = 0
    while len(ids) > budget:
        first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs) - 1)
        if first == len(msgs) - 1:
            break  # only the newest message is left to drop
        # one exchange: the oldest non-system message and any replies up to the next user message
        end = first + 1
        while end < len(msgs) - 1 and msgs[end]["role"] != "user":
            end += 1
        dropped += end - first
        del msgs[first:end]
        ids = tokenizer.render_prompt(msgs)
    note = f"(dropped the {dropped} oldest messages to fit the {block_size}-token context)" if dropped else None
    if len(ids) > budget:  # the newest message alone (with the system message, if any) is still too long
        last = msgs[-1]
        body = tokenizer.encode(last["content"])
        # the template's tokens around the message: role header, end of turn, assistant header (and an imported
        # model's default system message, which its template always puts first)
        room = max(budget - len(tokenizer.render_prompt([{"role": last["role"], "content": ""}])), 1)
        if len(body) > room:
            body = body[-room:]
            note = f"(the message is too long for the {block_size}-token context: kept its last {room} tokens)"
        else:
            note = f"(left out the system message to fit the {block_size}-token context)"
        ids = tokenizer.render_prompt([{"role": last["role"], "content": tokenizer.decode(body)}])
        while len(ids) > budget and body:  # the cut text may re-encode a little longer next to the header
            body = body[len(ids) - budget:]
            ids = tokenizer.render_prompt([{"role": last["role"], "content": tokenizer.decode(body)}])
    return ids, msgs, note


def fit_text(tokenizer, text, block_size, max_new_tokens):
    """Plain-text prompt for a pretraining checkpoint (Tokenizer.render_text) that leaves room for the reply.
    Long text keeps its end."""
    budget = block_size - min(max_new_tokens, block_size // 2)
    return tokenizer.render_text(text)[-budget:]


def stream_reply(model, tokenizer, ids, gen, out):
    """Generate after `ids`, writing text to `out` as it is made; returns the reply's token ids (no stop token).
    Stops at any special token: end of turn/text, or a role header an undertrained model starts on its own."""
    stop = engine.stop_ids(tokenizer)  # the rule every reply ends by (engine.generate_replies)
    idx = torch.tensor([ids], dtype=torch.long, device=gen["device"])
    max_new = min(gen["max_new_tokens"], model.config.block_size - len(ids))
    decoder = StreamDecoder(tokenizer)
    reply = []
    with gen["ctx"]:
        for step in model.generate_stream(idx, max_new, temperature=gen["temperature"], top_k=gen["top_k"],
                                          top_p=gen["top_p"], repetition_penalty=gen["repetition_penalty"],
                                          stop_tokens=stop, pad_id=tokenizer.pad_id, generator=gen["generator"],
                                          compile=gen["compile"]):
            t = int(step[0])
            if t in tokenizer.special_ids:
                break
            reply.append(t)
            out.write(decoder.push(t))
            out.flush()
    out.write(decoder.flush())
    out.flush()
    return reply


def chat_loop(model, tokenizer, chat, gen, system_msg):
    """The terminal REPL. Returns when the user quits."""
    start = [{"role": "system", "content": system_msg}] if (chat and system_msg) else []
    history = list(start)
    block_size = model.config.block_size
    print(f"{'chat' if chat else 'text continuation (pretraining checkpoint)'}: {COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave
            print()
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        if chat:
            messages = history + [{"role": "user", "content": line}]
            ids, messages, note = fit_chat(tokenizer, messages, block_size, gen["max_new_tokens"])
        else:
            ids, note = fit_text(tokenizer, line, block_size, gen["max_new_tokens"]), None
            sys.stdout.write(line)  # show the continuation joined to its start
        if note:
            print(note, file=sys.stderr)
        try:
            reply = stream_reply(model, tokenizer, ids, gen, sys.stdout)
        except KeyboardInterrupt:  # stop this reply only; it is not kept in the history
            print("\n(interrupted)", file=sys.stderr)
            continue
        print()
        if chat:
            history = messages + [{"role": "assistant", "content": tokenizer.decode(reply)}]


def main(argv=None):
    cfg = common.configure(globals(), argv)
    check_sampling(cfg["temperature"], cfg["top_k"], cfg["top_p"], cfg["repetition_penalty"])
    if cfg["max_new_tokens"] < 1:
        raise common.UserError(f"--max_new_tokens must be >= 1, got {cfg['max_new_tokens']}")
    path = cfg["ckpt"]

    rt = common.setup(device=cfg["device"], seed=cfg["seed"], compile=cfg["compile"])
    checkpoint, model, tokenizer = engine.load_policy(path, rt.device)
    chat = checkpoint["stage"] != "pretrain"
    print(f"{path}: stage {checkpoint['stage']}, {model.num_params() / 1e6:.2f}M parameters, "
          f"context {model.config.block_size}, device {rt.device}", file=sys.stderr)
    if not chat and cfg["system"]:
        print("(--system ignored: a pretraining checkpoint has no chat template)", file=sys.stderr)

    gen = dict(device=rt.device, ctx=rt.autocast, max_new_tokens=cfg["max_new_tokens"],
               temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
               top_p=cfg["top_p"] if cfg["top_p"] < 1 else None, repetition_penalty=cfg["repetition_penalty"],
               generator=torch.Generator(device=rt.device).manual_seed(cfg["seed"]), compile=rt.compile)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show some character must not crash the chat
        sys.stdout.reconfigure(errors="replace")

    if cfg["prompt"]:
        if chat:
            messages = ([{"role": "system", "content": cfg["system"]}] if cfg["system"] else []) + \
                       [{"role": "user", "content": cfg["prompt"]}]
            ids, _, note = fit_chat(tokenizer, messages, model.config.block_size, cfg["max_new_tokens"])
        else:
            ids, note = fit_text(tokenizer, cfg["prompt"], model.config.block_size, cfg["max_new_tokens"]), None
            sys.stdout.write(cfg["prompt"])
        if note:
            print(note, file=sys.stderr)
        reply = engine.generate_replies(model, tokenizer, [ids], gen["max_new_tokens"], gen["device"],
                                        temperature=gen["temperature"], top_k=gen["top_k"], top_p=gen["top_p"],
                                        repetition_penalty=gen["repetition_penalty"], generator=gen["generator"],
                                        autocast=gen["ctx"], compile=gen["compile"])[0]
        print(reply.text)
        return

    if hasattr(sys.stdin, "reconfigure"):  # nor must odd bytes typed or piped in
        sys.stdin.reconfigure(errors="replace")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input(), where available)
        except ImportError:
            pass
    chat_loop(model, tokenizer, chat, gen, cfg["system"])


if __name__ == "__main__":
    common.cli(main)  # UserError -> one line `error: ...`, exit 2; Ctrl-C (loading, one-shot answer) -> exit 130
