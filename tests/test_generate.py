import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import generate
import quantize
from model import GPT, ModelConfig
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EN = ("the a small model learns to add numbers and answer questions about cities rivers people who lives in "
      "which city is capital of what how many apples").split()


@pytest.fixture(scope="module")
def tok():
    # English only: Chinese characters and emoji stay split into single-byte tokens, which is what the
    # streaming decoder has to cope with
    rng = random.Random(0)
    texts = [" ".join(rng.choice(EN) for _ in range(12)) + f" {rng.randint(0, 999)}." for _ in range(400)]
    return Tokenizer.train(texts, vocab_size=400)


# ------------------------------------------------------------------------------------------------ streaming

def test_stream_decoder_never_prints_half_a_character(tok):
    text = "Hello 世界！我们 🙂👨‍👩‍👧 café end"
    ids = tok.encode(text)
    # the test only means something if characters really are split across tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    d = generate.StreamDecoder(tok)
    chunks = [d.push(i) for i in ids]
    assert all("\ufffd" not in c for c in chunks), chunks
    assert "".join(chunks) + d.flush() == text
    # and each character is printed as soon as its last byte has arrived, not later
    for i in range(len(ids)):
        assert "".join(chunks[:i + 1]) == tok.decode(ids[:i + 1]).rstrip("\ufffd")
    # a real U+FFFD in the text is passed on like any other character
    d = generate.StreamDecoder(tok)
    ids = tok.encode("a \ufffd b")
    assert "".join(d.push(i) for i in ids) + d.flush() == "a \ufffd b"


def test_stream_decoder_does_not_stall_on_invalid_bytes(tok):
    cont = tok.encode("世")[1:]  # continuation bytes alone are invalid UTF-8 for good
    ids = cont * 4 + tok.encode(" ok")
    d = generate.StreamDecoder(tok)
    chunks = [d.push(i) for i in ids]
    assert "".join(chunks[:len(cont) * 4]) != "", "undecodable bytes must be let through, not held forever"
    assert "".join(chunks) + d.flush() == tok.decode(ids)


def byte_ids(tok):
    """{byte value: the id of the token that is that one byte}: a byte-level BPE's base alphabet maps each byte to
    a printable character (the GPT-2 table: printable Latin-1 stands for itself, the rest is moved to 256 and up)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in keep}
    chars.update({b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in keep)})
    vocab = tok.tk.get_vocab()
    return {b: vocab[c] for b, c in chars.items()}


def streamed(tok, ids):
    d = generate.StreamDecoder(tok)
    chunks = [d.push(i) for i in ids]
    return chunks, d.flush()


def test_stream_output_equals_decode_for_the_examples_that_went_wrong(tok):
    by = byte_ids(tok)
    assert tok.decode([by[0xE4], by[0xB8], by[0xAD]]) == "中"  # the table is the tokenizer's own
    # a reply that decodes to "a\ufffd\ufffdb" was printed with four U+FFFD
    ids = tok.encode("a") + [by[0x80], by[0x80]] + tok.encode("b")
    assert tok.decode(ids) == "a\ufffd\ufffdb"
    chunks, rest = streamed(tok, ids)
    assert "".join(chunks) + rest == "a\ufffd\ufffdb"
    # an emoji after a stray lead byte was shown as two U+FFFD, though decode gives the emoji
    ids = [by[0xF0]] + [by[b] for b in "🙂".encode("utf-8")]
    assert tok.decode(ids) == "\ufffd🙂"
    chunks, rest = streamed(tok, ids)
    assert "".join(chunks) + rest == "\ufffd🙂"


STREAM_TEXTS = ["🙂👨‍👩‍👧🇨🇳", "𠀀𪚥𰻞龘 rare CJK (4-byte and 3-byte)", "a real \ufffd, and \ufffd\ufffd at the end\ufffd",
                "mixed 世界 café 🙂 end", "\ufffd"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_output_equals_decode_for_emoji_rare_cjk_and_real_replacement_chars(tok, text):
    ids = tok.encode(text)
    chunks, rest = streamed(tok, ids)
    assert "".join(chunks) + rest == tok.decode(ids) == text
    # nothing is held back longer than needed: after each id all but a trailing U+FFFD of decode is out
    for k in range(len(ids)):
        shown, full = "".join(chunks[:k + 1]), tok.decode(ids[:k + 1])
        assert shown == (full[:-1] if full.endswith("\ufffd") else full)


def test_stream_output_equals_decode_on_random_byte_token_sequences(tok):
    # property: for any ids, what the stream prints, joined, is decode(ids); most of these are invalid UTF-8,
    # mixed with lead bytes, continuation bytes, whole characters and multi-byte tokens
    by = byte_ids(tok)
    special = set(tok.special_ids)
    normal = [i for i in range(tok.vocab_size) if i not in special]
    pieces = [[by[b] for b in ch.encode("utf-8")] for ch in "中🙂é\ufffd𠀀"]
    for seed in range(300):
        rng = random.Random(seed)
        ids = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.5:
                ids.append(by[rng.choice([rng.randrange(256), rng.randrange(0x80, 0xC0), rng.randrange(0xC2, 0xF5)])])
            elif r < 0.7:
                ids += rng.choice(pieces)[:rng.randint(1, 4)]
            else:
                ids.append(rng.choice(normal))
        chunks, rest = streamed(tok, ids)
        assert "".join(chunks) + rest == tok.decode(ids), (seed, ids)


def test_stream_decoder_starts_afresh_after_flush(tok):
    by = byte_ids(tok)
    d = generate.StreamDecoder(tok)
    assert d.push(by[0xE4]) == "" and d.flush() == "\ufffd"
    assert "".join(d.push(i) for i in tok.encode("ok")) + d.flush() == "ok"


# ------------------------------------------------------------------------------------------------ context window

def conversation(n_exchanges, words=8):
    msgs = [{"role": "system", "content": "be brief"}]
    for k in range(n_exchanges):
        msgs.append({"role": "user", "content": f"question {k} " + "apples " * words})
        msgs.append({"role": "assistant", "content": f"answer {k} " + "rivers " * words})
    msgs.append({"role": "user", "content": "last question"})
    return msgs


def test_fit_chat_keeps_everything_when_it_fits(tok):
    msgs = conversation(2, words=1)
    ids, kept, note = generate.fit_chat(tok, msgs, block_size=256, max_new_tokens=64)
    assert kept == msgs and note is None
    assert ids == tok.render_prompt(msgs) and ids[-len(tok.generation_prompt):] == tok.generation_prompt


def test_fit_chat_drops_oldest_exchanges_first_and_keeps_system(tok):
    msgs = conversation(12)
    block_size, max_new = 128, 32
    ids, kept, note = generate.fit_chat(tok, msgs, block_size, max_new)
    assert len(ids) <= block_size - max_new
    assert ids == tok.render_prompt(kept)
    assert kept[0] == msgs[0], "the system message must survive while older turns can go"
    assert kept[-1] == msgs[-1], "the new question must be kept"
    n_dropped = len(msgs) - len(kept)
    assert n_dropped > 0 and n_dropped % 2 == 0, "whole exchanges are dropped"
    assert kept[1:] == msgs[1 + n_dropped:], "the oldest turns go first, the newest stay"
    assert kept[1]["role"] == "user"
    # maximal: one more exchange would not have fitted
    assert len(tok.render_prompt([msgs[0]] + msgs[n_dropped - 1:])) > block_size - max_new
    assert "dropped" in note


def test_fit_chat_cuts_a_too_long_message_from_its_start(tok):
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "apples " * 200 + "the end"}]
    ids, kept, note = generate.fit_chat(tok, msgs, block_size=64, max_new_tokens=256)
    assert len(ids) <= 64 - 32  # max_new_tokens is capped at half the context
    head = [tok.start_id] + tok.encode("user\n")
    assert ids[:len(head)] == head
    assert ids[-len(tok.generation_prompt) - 2:] == [tok.end_id] + tok.encode("\n") + tok.generation_prompt
    assert tok.decode(ids).endswith("apples the end\nassistant\n")
    assert "too long" in note


def test_fit_text_starts_a_document_and_keeps_the_end(tok):
    assert generate.fit_text(tok, "the cat", 64, 16) == [tok.eot_id] + tok.encode("the cat")
    ids = generate.fit_text(tok, "apples " * 100 + "the end", 64, 16)
    assert len(ids) == 48 and tok.decode(ids).endswith("apples the end")


# ------------------------------------------------------------------------------------------------ command line

def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                      tie_embeddings=False)  # tied + random init just echoes the last token (a header)
    return GPT(cfg).eval()


def save_checkpoint(path, tok, stage, seed=0, quantization=None):
    model = tiny_model(tok, seed)
    cfg = model.config
    ckpt = {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_json(),
            "stage": stage, "train_config": {}, "metrics": {}}
    if quantization:
        ckpt["quantization"] = quantize.quantize_model(model, quantization)
        ckpt["model"] = model.state_dict()
    if stage == "reward":
        ckpt["value_head"] = {"weight": torch.zeros(1, cfg.n_embd), "bias": torch.zeros(1)}
    torch.save(ckpt, path)
    return model.eval()


def run(*args, stdin=""):
    return subprocess.run([sys.executable, "generate.py", "--device=cpu", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120)


def greedy(model, tok, ids):
    out = model.generate(torch.tensor([ids]), min(20, model.config.block_size - len(ids)), temperature=0,
                         stop_tokens=sorted(tok.special_ids))[0, len(ids):].tolist()
    return tok.decode(out)  # special ids (the stop token, padding) are skipped by decode


def test_prompt_answers_once_with_the_chat_template(tok, tmp_path):
    path = str(tmp_path / "sft.pt")
    model = save_checkpoint(path, tok, "sft")
    r = run(f"--ckpt={path}", "--prompt=how many apples", "--temperature=0", "--max_new_tokens=20")
    assert r.returncode == 0, r.stderr
    want = greedy(model, tok, tok.render_prompt([{"role": "user", "content": "how many apples"}]))
    assert want and r.stdout == want + "\n"


def test_pretrain_checkpoint_continues_plain_text(tok, tmp_path):
    path = str(tmp_path / "pretrain.pt")
    model = save_checkpoint(path, tok, "pretrain")
    r = run(f"--ckpt={path}", "--prompt=the capital of", "--temperature=0", "--max_new_tokens=20")
    assert r.returncode == 0, r.stderr
    want = greedy(model, tok, [tok.eot_id] + tok.encode("the capital of"))
    assert want and r.stdout == "the capital of" + want + "\n"


def test_chat_repl_reset_exit_and_ctrl_d(tok, tmp_path):
    path = str(tmp_path / "sft.pt")
    save_checkpoint(path, tok, "sft")
    r = run(f"--ckpt={path}", "--max_new_tokens=8", stdin="hello\n/reset\n你好 🙂\n/exit\nnot reached\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "history cleared" in r.stderr and r.stdout.count(">>> ") == 4
    r = run(f"--ckpt={path}", "--max_new_tokens=8", stdin="hello\n")  # then end of input = Ctrl-D
    assert r.returncode == 0 and "Traceback" not in r.stderr and r.stdout.count(">>> ") == 2


def test_chat_repl_ctrl_c_at_the_prompt_exits_cleanly(tok, tmp_path):
    path = str(tmp_path / "sft.pt")
    save_checkpoint(path, tok, "sft")
    p = subprocess.Popen([sys.executable, "generate.py", "--device=cpu", f"--ckpt={path}"], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, deadline = b"", time.time() + 60
    while b">>> " not in out and time.time() < deadline:  # wait until it sits at the input prompt
        if select.select([p.stdout], [], [], 1.0)[0]:
            out += os.read(p.stdout.fileno(), 4096)
    assert b">>> " in out
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and b"Traceback" not in err, err


def test_reward_checkpoint_is_refused_with_one_line(tok, tmp_path):
    path = str(tmp_path / "reward.pt")
    save_checkpoint(path, tok, "reward")
    r = run(f"--ckpt={path}", "--prompt=hi")
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert path in lines[0] and "reward" in lines[0]


# ------------------------------------------------------------------------------------------------ main() in process
# (the same code path as the command line minus interpreter start-up, which costs seconds per run)

@pytest.fixture
def run_main(monkeypatch, capsys):
    # main() writes its settings into the module's globals (configure); restore them after each test
    for k in common.config_keys(vars(generate)):
        monkeypatch.setattr(generate, k, getattr(generate, k))

    def call(*args):
        generate.main(["--device=cpu", *args])
        return capsys.readouterr().out
    return call


def test_sampling_is_reproducible_with_a_seed(tok, tmp_path, run_main):
    path = str(tmp_path / "sft.pt")
    save_checkpoint(path, tok, "sft")
    args = [f"--ckpt={path}", "--prompt=hi", "--temperature=1.5", "--top_k=0", "--top_p=1.0", "--max_new_tokens=30"]
    a, b, c = run_main(*args, "--seed=1"), run_main(*args, "--seed=1"), run_main(*args, "--seed=2")
    assert a == b and len(a) > 1
    assert c != a


def test_system_message_goes_in_front_of_the_prompt(tok, tmp_path, run_main):
    path = str(tmp_path / "sft.pt")
    model = save_checkpoint(path, tok, "sft")
    out = run_main(f"--ckpt={path}", "--prompt=how many apples", "--system=be brief", "--temperature=0",
                   "--max_new_tokens=20")
    want = greedy(model, tok, tok.render_prompt([{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "how many apples"}]))
    assert want and out == want + "\n"


@pytest.mark.parametrize("kind", ["missing", "garbage", "not_ours", "directory_without_ckpt", "wrong_weights"])
def test_bad_checkpoints_are_user_errors_naming_the_file(tok, tmp_path, run_main, kind):
    path = str(tmp_path / f"{kind}.pt")
    if kind == "garbage":
        with open(path, "wb") as f:
            f.write(b"this is not a checkpoint\n" * 10)
    elif kind == "not_ours":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "directory_without_ckpt":
        path = str(tmp_path)
    elif kind == "wrong_weights":  # our keys, but weights of another shape than its model_config says
        save_checkpoint(path, tok, "sft")
        ckpt = torch.load(path, weights_only=True)
        ckpt["model_config"]["n_embd"] = 64
        torch.save(ckpt, path)
    with pytest.raises(common.UserError) as e:
        run_main(f"--ckpt={path}", "--prompt=hi")
    named = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("arg", ["--temperature=-1", "--top_p=0", "--top_p=1.5", "--top_k=-3", "--max_new_tokens=0",
                                 "--repetition_penalty=0", "--repetition_penalty=-1e-300", "--temperature=1e999",
                                 "--top_p=-1e-300", "--repetition_penalty=1e999"])
def test_bad_sampling_settings_are_user_errors(run_main, arg):
    with pytest.raises(common.UserError, match=arg.split("=")[0]):
        run_main("--ckpt=does/not/matter.pt", "--prompt=hi", arg)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_checkpoint_generates_like_the_quantized_model(tok, tmp_path, run_main, mode):
    path = str(tmp_path / f"{mode}.pt")
    model = save_checkpoint(path, tok, "sft", quantization=mode)
    assert any(isinstance(m, (quantize.Linear4bit, quantize.Linear8bit)) for m in model.modules())
    out = run_main(f"--ckpt={path}", "--prompt=how many apples", "--temperature=0", "--max_new_tokens=20")
    want = greedy(model, tok, tok.render_prompt([{"role": "user", "content": "how many apples"}]))
    assert want and out == want + "\n"


def test_chat_keeps_history_and_reset_clears_it(tok, monkeypatch, capsys):
    model = tiny_model(tok)
    prompts = []  # the prompt ids of every reply, as the model received them
    real_stream = model.generate_stream

    def spy(idx, *args, **kwargs):
        prompts.append(idx[0].tolist())
        return real_stream(idx, *args, **kwargs)
    monkeypatch.setattr(model, "generate_stream", spy)
    lines = iter(["how many apples", "and rivers", "/reset", "who lives in the city", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    gen = dict(device="cpu", ctx=torch.autocast("cpu", enabled=False), max_new_tokens=6, temperature=0, top_k=None,
               top_p=None, repetition_penalty=1.0, generator=None, compile=False)
    generate.chat_loop(model, tok, True, gen, "be brief")
    assert len(prompts) == 3
    sys_msg, u1, u2, u3 = ({"role": r, "content": c} for r, c in [("system", "be brief"), ("user", "how many apples"),
                                                                  ("user", "and rivers"),
                                                                  ("user", "who lives in the city")])
    assert prompts[0] == tok.render_prompt([sys_msg, u1])
    a1 = capsys.readouterr().out.split("\n")[0]  # the first reply as streamed to the terminal
    assert a1 and prompts[1] == tok.render_prompt([sys_msg, u1, {"role": "assistant", "content": a1}, u2])
    assert prompts[2] == tok.render_prompt([sys_msg, u3]), "/reset keeps the system message and nothing else"


@pytest.mark.parametrize("args", [("--temperature=1e-39",), ("--temperature=1e-45",), ("--temperature=0.0000099",),
                                  ("--temperature=1e-39", "--top_p=1e-300", "--top_k=1")])
def test_extreme_temperatures_are_greedy_instead_of_a_traceback(tok, tmp_path, run_main, args):
    # --temperature=1e-39 made the logits inf and sampling failed ("probability tensor contains either inf, nan
    # or element < 0"); a temperature below 1e-5 is greedy
    path = str(tmp_path / "sft.pt")
    model = save_checkpoint(path, tok, "sft")
    out = run_main(f"--ckpt={path}", "--prompt=how many apples", "--max_new_tokens=20", *args)
    want = greedy(model, tok, tok.render_prompt([{"role": "user", "content": "how many apples"}]))
    assert want and out == want + "\n"


@pytest.mark.parametrize("args", [("--repetition_penalty=1e-300",), ("--repetition_penalty=1e300",),
                                  ("--repetition_penalty=1e-300", "--temperature=1e300"),
                                  ("--temperature=1e-5", "--repetition_penalty=1e300"),
                                  ("--top_k=1000000", "--top_p=1e-300", "--temperature=3e38")])
def test_extreme_sampling_settings_answer_instead_of_a_traceback(tok, tmp_path, args):
    path = str(tmp_path / "sft.pt")
    save_checkpoint(path, tok, "sft")
    r = run(f"--ckpt={path}", "--prompt=how many apples", "--max_new_tokens=20", *args)
    assert r.returncode == 0 and "Traceback" not in r.stderr and r.stdout.strip(), r.stderr
