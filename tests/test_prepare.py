"""prepare.py: the world's files and their layout, every accepted schema from local files (through the same
datasets.load_dataset path as hub data sets), each kind of bad input, atomic writes, the loaders."""
import functools
import itertools
import re
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import common
import prepare
import world
from tokenizer import Tokenizer

SMALL_WORLD = dict(n_people=20, n_sft=300, n_sft_val=40, n_pref=200, n_pref_val=40, n_prompts=100,
                   n_prompts_val=48, val_pool_size=60)
WORLD_FILES = {"tokenizer.json", "meta.json", "train.bin", "val.bin", "sft_train.npz", "sft_val.npz",
               "pref_train.npz", "pref_val.npz", "prompts_train.npz", "prompts_val.npz", "prompts_train.jsonl",
               "prompts_val.jsonl"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_world(monkeypatch):
    monkeypatch.setattr(world, "generate_world", functools.partial(world.generate_world, **SMALL_WORLD))


def prepare_world(monkeypatch, out, *args):
    small_world(monkeypatch)
    return prepare.main([f"--dataset={out}", "--world_mb=0.05", *args])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    out = str(tmp_path_factory.mktemp("world") / "w")
    meta = prepare_world(mp, out)
    mp.undo()
    return out, meta, Tokenizer.load(os.path.join(out, "tokenizer.json"))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------- the world's files

def test_world_writes_every_documented_file_and_meta(prepared):
    out, meta, tok = prepared
    assert set(os.listdir(out)) == WORLD_FILES  # and no leftover .tmp
    with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk == meta
    assert meta["vocab_size"] == tok.vocab_size and meta["dtype"] == "uint16" and meta["source"] == "world"
    assert meta["kinds"] == ["pretrain", "sft", "pref", "prompts"]
    for split in ("train", "val"):
        assert meta[f"sft_{split}"] == SMALL_WORLD[f"n_sft{'_val' if split == 'val' else ''}"]
        assert meta[f"{split}_tokens"] == os.path.getsize(os.path.join(out, f"{split}.bin")) // 2


def test_pretraining_bins_are_documents_joined_by_eot(prepared, monkeypatch):
    out, meta, tok = prepared
    small_world(monkeypatch)
    w = world.generate_world(seed=1337, corpus_mb=0.05)
    for split in ("train", "val"):
        data = np.memmap(os.path.join(out, f"{split}.bin"), dtype=np.uint16, mode="r")
        assert len(data) == meta[f"{split}_tokens"] and data[-1] == tok.eot_id
        cuts = np.flatnonzero(np.asarray(data) == tok.eot_id)
        assert len(cuts) == len(w[f"corpus_{split}"])
        starts = np.concatenate([[0], cuts[:-1] + 1])
        for k in (0, 1, len(cuts) - 1):
            assert tok.decode(data[starts[k]:cuts[k]]) == w[f"corpus_{split}"][k]


def test_sft_arrays_are_render_chat_and_mask_covers_only_assistant_turns(prepared):
    out, meta, tok = prepared
    with np.load(os.path.join(out, "sft_train.npz"), allow_pickle=False) as z:
        assert z["ids"].dtype == np.int32 and z["loss_mask"].dtype == np.uint8 and z["offsets"].dtype == np.int64
        assert len(z["offsets"]) == meta["sft_train"] + 1 and len(z["ids"]) == len(z["loss_mask"]) == z["offsets"][-1]
    ids, masks = prepare.load_ragged(os.path.join(out, "sft_train.npz"), "ids"), \
        prepare.load_ragged(os.path.join(out, "sft_train.npz"), "loss_mask")
    convs = world.generate_world(seed=1337, corpus_mb=0.05, **SMALL_WORLD)["sft_train"]
    assert len(ids) == len(convs)
    for seq, mask, conv in zip(ids, masks, convs):
        want_ids, want_mask = tok.render_chat(conv["messages"])
        assert seq.tolist() == want_ids and mask.tolist() == want_mask
        # what the mask selects is exactly each assistant reply followed by its end-of-turn token
        picked = [int(t) for t, m in zip(seq, mask) if m]
        want = [t for msg in conv["messages"] if msg["role"] == "assistant"
                for t in tok.encode(msg["content"]) + [tok.end_id]]
        assert picked == want


def test_pref_arrays(prepared):
    out, meta, tok = prepared
    pairs = world.generate_world(seed=1337, corpus_mb=0.05, **SMALL_WORLD)["pref_val"]
    path = os.path.join(out, "pref_val.npz")
    prompts, chosen, rejected = (prepare.load_ragged(path, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert len(prompts) == len(chosen) == len(rejected) == len(pairs) == meta["pref_val"]
    for p, c, r, pair in zip(prompts, chosen, rejected, pairs):
        assert p.tolist() == tok.render_prompt(pair["messages"])
        assert p[-len(tok.generation_prompt):].tolist() == tok.generation_prompt
        assert c.tolist() == tok.encode(pair["chosen"]) + [tok.end_id]
        assert r.tolist() == tok.encode(pair["rejected"]) + [tok.end_id]


def test_prompt_files_and_load_prompts(prepared):
    out, meta, tok = prepared
    for split in ("train", "val"):
        rows = read_jsonl(os.path.join(out, f"prompts_{split}.jsonl"))
        assert len(rows) == meta[f"prompts_{split}"]
        assert all(set(r) == {"messages", "answer", "task", "lang"} for r in rows)
        assert all(r["task"] in world.TASKS and r["lang"] in world.LANGS and r["answer"] for r in rows)
        loaded = prepare.load_prompts(out, split)
        ids = prepare.load_ragged(os.path.join(out, f"prompts_{split}.npz"), "ids")
        for row, item, seq in zip(rows, loaded, ids):
            assert item["ids"] == seq.tolist() == tok.render_prompt(row["messages"])
            assert item["answer"] == row["answer"] and item["messages"][-1]["role"] == "user"


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(prepared, monkeypatch, tmp_path):
    out, _, _ = prepared
    prepare_world(monkeypatch, str(tmp_path / "again"))
    for name in sorted(WORLD_FILES):
        with open(os.path.join(out, name), "rb") as a, open(tmp_path / "again" / name, "rb") as b:
            assert a.read() == b.read(), name
    prepare_world(monkeypatch, str(tmp_path / "other"), "--seed=1")
    with open(os.path.join(out, "train.bin"), "rb") as a, open(tmp_path / "other" / "train.bin", "rb") as b:
        assert a.read() != b.read()


NO_FLAW_ARGS = ("--flaw_wrong_language_en=0", "--flaw_wrong_language_zh=0", "--flaw_pleasantry=0")


def test_flaw_settings_default_to_the_worlds_and_reach_the_sft_file(prepared, monkeypatch, tmp_path):
    assert {k: getattr(prepare, f"flaw_{k}") for k in world.FLAW_RATES} == world.FLAW_RATES
    assert prepared[1]["world"]["flaw_rates"] == world.FLAW_RATES
    out = str(tmp_path / "polite")
    meta = prepare_world(monkeypatch, out, *NO_FLAW_ARGS[:2], "--flaw_pleasantry=1")
    rates = {"wrong_language_en": 0.0, "wrong_language_zh": 0.0, "pleasantry": 1.0}
    assert meta["world"]["flaw_rates"] == rates
    tok = Tokenizer.load(os.path.join(out, "tokenizer.json"))
    convs = world.generate_world(seed=1337, corpus_mb=0.05, **SMALL_WORLD, flaw_rates=rates)["sft_train"]
    ids = prepare.load_ragged(os.path.join(out, "sft_train.npz"), "ids")
    for seq, conv in zip(ids, convs, strict=True):
        assert seq.tolist() == tok.render_chat(conv["messages"])[0]
        replies = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
        assert all(world.reply_flaws(r, conv["lang"]) == ["pleasantry"] for r in replies), replies


def test_clean_data_with_the_flawed_datas_tokenizer_has_the_same_pretraining_tokens(prepared, monkeypatch, tmp_path):
    # flaws touch only the SFT and preference sets: prepared with the flawed data's tokenizer, clean data has the
    # same pretraining tokens and prompts, so one pretrained model serves both (what prepare.py's settings promise)
    out, _, _ = prepared
    clean = tmp_path / "clean"
    meta = prepare_world(monkeypatch, str(clean), *NO_FLAW_ARGS, f"--tokenizer={out}")
    assert meta["world"]["flaw_rates"] == world.NO_FLAWS
    for name in ("tokenizer.json", "train.bin", "val.bin", "prompts_train.npz", "prompts_val.npz",
                 "prompts_train.jsonl", "prompts_val.jsonl"):
        with open(os.path.join(out, name), "rb") as a:
            assert a.read() == (clean / name).read_bytes(), name
    for name in ("sft_train.npz", "sft_val.npz", "pref_train.npz"):
        with open(os.path.join(out, name), "rb") as a:
            assert a.read() != (clean / name).read_bytes(), name


@pytest.mark.parametrize("arg", ["--flaw_pleasantry=1.5", "--flaw_wrong_language_zh=-0.1"])
def test_a_flaw_rate_outside_0_1_is_an_error_naming_the_setting(monkeypatch, tmp_path, arg):
    with pytest.raises(common.UserError, match=re.escape(arg)):
        prepare_world(monkeypatch, str(tmp_path / "bad"), arg)
    assert not (tmp_path / "bad").exists()


def test_world_tokenizer_never_merges_a_value_with_its_neighbours(prepared, monkeypatch):
    # trained on the raw text, "<name>住在哪里" became one token and a held-out fact's question was unlearnable
    out, _, tok = prepared
    people = world.generate_world(seed=1337, corpus_mb=0.05, **SMALL_WORLD)["people"]

    def boundaries(text):
        ends, pos = set(), 0
        for t in tok.encode(text):
            pos += len(tok.decode([t]))
            ends.add(pos)
        assert pos == len(text)  # every token is whole characters
        return ends

    for p in people:
        for attr in world.ATTRIBUTES:
            question = world.FACT_QUESTIONS["zh"][attr][0].format(n=p["zh"])
            assert len(p["zh"]) in boundaries(question), question
            value = world.fact_value(p, attr, "zh")
            reply = world.fact_reply(p, attr, "zh", value)
            assert reply.index(value) in boundaries(reply) and len(p["zh"]) in boundaries(reply), reply
    assert boundaries("四百八十九") == {1, 2, 3, 4, 5}  # numerals one by one: 489 is 四|百|八|十|九


# ------------------------------------------------------------------------------------------- real data: schemas

def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def run(tmp_path, source, *args, name="out"):
    out = str(tmp_path / name)
    meta = prepare.main([f"--source={source}", f"--dataset={out}", "--vocab_size=300", "--val_fraction=0.25", *args])
    return out, meta, Tokenizer.load(os.path.join(out, "tokenizer.json"))


def both_splits(out, prefix, key):
    return [tuple(x.tolist()) for split in ("train", "val")
            for x in prepare.load_ragged(os.path.join(out, f"{prefix}_{split}.npz"), key)]


DOCS = ["The cat sat on the mat.", "A dog ran in the park.", "小猫在睡觉。", "Birds sing in the morning.",
        "Two plus two is four."]
PRETRAIN_SOURCES = {
    "jsonl": lambda d: write_jsonl(d / "p.jsonl", [{"text": t} for t in DOCS]),
    "json": lambda d: write_json(d / "p.json", [{"text": t} for t in DOCS]),
    "parquet": lambda d: write_parquet(d / "p.parquet", [{"text": t} for t in DOCS]),
    "txt": lambda d: _write_txt(d / "p.txt", "\n\n".join(DOCS[:3]) + "\n<|endoftext|>\n" + "\n\n\n".join(DOCS[3:])),
}


def _write_txt(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", sorted(PRETRAIN_SOURCES))
def test_pretraining_text_from_every_file_type(tmp_path, fmt):
    out, meta, tok = run(tmp_path, PRETRAIN_SOURCES[fmt](tmp_path))
    assert meta["kinds"] == ["pretrain"] and set(os.listdir(out)) == {"tokenizer.json", "meta.json", "train.bin",
                                                                        "val.bin"}
    docs = []
    for split in ("train", "val"):
        data = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16).tolist()
        assert data[-1] == tok.eot_id
        text = tok.decode(data, skip_special=False)
        docs += text.split("<|endoftext|>")[:-1]
    assert sorted(docs) == sorted(DOCS)  # every document once, whole, and the val split is not empty
    assert meta["val_tokens"] > 0


MESSAGES = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"},
     {"role": "assistant", "content": "再见！"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def _user_reply(user, reply, system=None):
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


SFT_SOURCES = {  # name -> (write(dir), expected conversations)
    "messages.jsonl": (lambda d: write_jsonl(d / "m.jsonl", [{"messages": m} for m in MESSAGES]), MESSAGES),
    "sharegpt.json": (lambda d: write_json(d / "s.json", [{"conversations": [
        {"from": SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in m]} for m in MESSAGES]), MESSAGES),
    "alpaca.jsonl": (lambda d: write_jsonl(d / "a.jsonl", [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "写一句诗", "output": "床前明月光"},
        {"instruction": "Add.", "input": "1 2", "output": "3", "system": "Math."}]),
        [_user_reply("Translate to French.\n\ncat", "chat"), _user_reply("Say hi.", "hi"),
         _user_reply("写一句诗", "床前明月光"), _user_reply("Add.\n\n1 2", "3", "Math.")]),
    "prompt_response.parquet": (lambda d: write_parquet(d / "pr.parquet", [
        {"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)]),
        [_user_reply(f"q{i}", f"a{i}") for i in range(4)]),
    "prompt_output_field.json": (lambda d: write_json(d / "po.json", {"version": 2, "data": [
        {"prompt": f"问{i}", "output": f"答{i}"} for i in range(4)]}), [_user_reply(f"问{i}", f"答{i}") for i in range(4)]),
}


@pytest.mark.parametrize("name", sorted(SFT_SOURCES))
def test_every_sft_schema(tmp_path, name):
    write, expected = SFT_SOURCES[name]
    out, meta, tok = run(tmp_path, write(tmp_path))
    assert meta["kinds"] == ["sft"] and meta["sft_train"] + meta["sft_val"] == len(expected)
    assert meta["sft_val"] >= 1
    got = sorted(zip(both_splits(out, "sft", "ids"), both_splits(out, "sft", "loss_mask")))
    want = sorted((tuple(i), tuple(m)) for i, m in map(tok.render_chat, expected))
    assert got == want


HH = [
    ("\n\nHuman: What is 2+2?\n\nAssistant: 4", "\n\nHuman: What is 2+2?\n\nAssistant: 5"),
    ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a fruit\n\nAssistant: Apple",
     "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a fruit\n\nAssistant: Go away"),
    ("\n\nHuman: 你好\n\nAssistant: 你好！", "\n\nHuman: 你好\n\nAssistant: 走开"),
    ("\n\nHuman: Capital of France?\n\nAssistant: Paris", "\n\nHuman: Capital of France?\n\nAssistant: Rome"),
]
HH_EXPECTED = [
    ([{"role": "user", "content": "What is 2+2?"}], "4", "5"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "Name a fruit"}], "Apple", "Go away"),
    ([{"role": "user", "content": "你好"}], "你好！", "走开"),
    ([{"role": "user", "content": "Capital of France?"}], "Paris", "Rome"),
]
PLAIN_PAIRS = [(f"question {i}", f"good {i}", f"bad {i}") for i in range(4)]
PREF_SOURCES = {
    "prompt_chosen_rejected.jsonl": (lambda d: write_jsonl(d / "p.jsonl", [
        {"prompt": p, "chosen": c, "rejected": r} for p, c, r in PLAIN_PAIRS]),
        [([{"role": "user", "content": p}], c, r) for p, c, r in PLAIN_PAIRS]),
    "selected.parquet": (lambda d: write_parquet(d / "z.parquet", [
        {"prompt": p, "selected": c, "rejected": r} for p, c, r in PLAIN_PAIRS]),
        [([{"role": "user", "content": p}], c, r) for p, c, r in PLAIN_PAIRS]),
    "hh_dialogues.jsonl": (lambda d: write_jsonl(d / "hh.jsonl", [{"chosen": c, "rejected": r} for c, r in HH]),
                           HH_EXPECTED),
}


@pytest.mark.parametrize("name", sorted(PREF_SOURCES))
def test_every_preference_schema(tmp_path, name):
    write, expected = PREF_SOURCES[name]
    out, meta, tok = run(tmp_path, write(tmp_path))
    assert meta["kinds"] == ["pref"] and meta["pref_train"] + meta["pref_val"] == len(expected)
    got = sorted(zip(*(both_splits(out, "pref", k) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))))
    want = sorted((tuple(tok.render_prompt(m)), tuple(tok.encode(c) + [tok.end_id]),
                   tuple(tok.encode(r) + [tok.end_id])) for m, c, r in expected)
    assert got == want


def test_hh_dialogues_that_differ_before_the_last_turn_keep_only_the_differing_reply():
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
           "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: y"}
    rec = prepare.to_pref(row, "t.jsonl, line 1")
    assert rec == {"messages": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "x"}


def test_a_dialogue_prompt_waiting_for_the_reply():
    # hh-rlhf derivatives: prompt = "\n\nHuman: ...\n\nAssistant:", chosen/rejected = the replies alone
    rec = prepare.to_pref({"prompt": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: name a fruit\n\nAssistant:",
                           "chosen": " apple", "rejected": " no"}, "t.jsonl, line 1")
    assert rec == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                {"role": "user", "content": "name a fruit"}], "chosen": "apple", "rejected": "no"}


def test_prompt_sets_from_jsonl_messages_and_txt(tmp_path):
    rows = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i), "task": "add"} for i in range(4)]
    out, meta, tok = run(tmp_path, write_jsonl(tmp_path / "q.jsonl", rows))
    assert meta["kinds"] == ["prompts"]
    got = read_jsonl(os.path.join(out, "prompts_train.jsonl")) + read_jsonl(os.path.join(out, "prompts_val.jsonl"))
    assert sorted((g["messages"][0]["content"], g["answer"], g["task"], g["lang"]) for g in got) == \
        sorted((r["prompt"], r["answer"], "add", "en") for r in rows)
    # messages that end with a user turn are prompts, not SFT; their language is guessed when not given
    convs = [[{"role": "user", "content": "你好吗"}], [{"role": "user", "content": "How are you?"}]] * 2
    out, meta, _ = run(tmp_path, write_jsonl(tmp_path / "m.jsonl", [{"messages": m} for m in convs]), name="m")
    got = read_jsonl(os.path.join(out, "prompts_train.jsonl")) + read_jsonl(os.path.join(out, "prompts_val.jsonl"))
    assert sorted((g["lang"], g["answer"]) for g in got) == [("en", None)] * 2 + [("zh", None)] * 2
    # a .txt file with --kind=prompts: one prompt a line, blank lines skipped
    txt = _write_txt(tmp_path / "q.txt", "first prompt\n\nsecond prompt\nthird\nfourth\n")
    out, meta, _ = run(tmp_path, txt, "--kind=prompts", name="t")
    assert meta["prompts_train"] + meta["prompts_val"] == 4


def test_sft_and_preference_rows_as_prompts_drop_the_replies(tmp_path):
    out, meta, _ = run(tmp_path, SFT_SOURCES["messages.jsonl"][0](tmp_path), "--kind=prompts")
    got = read_jsonl(os.path.join(out, "prompts_train.jsonl")) + read_jsonl(os.path.join(out, "prompts_val.jsonl"))
    assert sorted(json.dumps(g["messages"]) for g in got) == sorted(json.dumps(m[:-1]) for m in MESSAGES)
    out, meta, _ = run(tmp_path, PREF_SOURCES["hh_dialogues.jsonl"][0](tmp_path), "--kind=prompts", name="hh")
    got = read_jsonl(os.path.join(out, "prompts_train.jsonl")) + read_jsonl(os.path.join(out, "prompts_val.jsonl"))
    assert sorted(json.dumps(g["messages"]) for g in got) == sorted(json.dumps(m) for m, _, _ in HH_EXPECTED)


def test_max_rows_limits_what_is_read(tmp_path):
    src = write_jsonl(tmp_path / "many.jsonl", [{"text": f"document number {i}"} for i in range(40)])
    out, meta, _ = run(tmp_path, src, "--max_rows=8")
    assert meta["train_tokens"] + meta["val_tokens"] < 8 * 12


def test_given_tokenizer_is_reused_and_kinds_accumulate(prepared, tmp_path):
    # a data folder holds one tokenization: adding SFT data to a pretraining folder reuses its tokenizer
    src = PRETRAIN_SOURCES["jsonl"](tmp_path)
    out, _, tok = run(tmp_path, src, name="both")
    sft = SFT_SOURCES["messages.jsonl"][0](tmp_path)
    with pytest.raises(common.UserError, match="another tokenizer.*--tokenizer="):
        run(tmp_path, sft, "--vocab_size=280", name="both")
    _, meta, tok2 = run(tmp_path, sft, f"--tokenizer={out}", name="both")
    assert tok2.to_json() == tok.to_json() and meta["kinds"] == ["pretrain", "sft"]
    assert set(os.listdir(out)) == {"tokenizer.json", "meta.json", "train.bin", "val.bin", "sft_train.npz",
                                    "sft_val.npz"}


# ------------------------------------------------------------------------------------------------ bad input

def _bad_bytes(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


BAD_INPUTS = [  # (file name, bytes, extra args, the error must match)
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c\n', (), r"broken\.jsonl, line 3: malformed JSON"),
    ("broken.json", b'[{"text": "a"},\n {"text": "b",\n]', (), r"broken\.json, line 3: malformed JSON"),
    ("notobj.jsonl", b'{"text": "a"}\n["text"]\n', (), r"notobj\.jsonl, line 2: expected a JSON object"),
    ("missing.jsonl", b'{"prompt": "p", "response": "r"}\n\n{"prompt": "q"}\n', (),
     r"missing\.jsonl, line 3: expected SFT fields .*'prompt'\+'response'.*the row has \['prompt'\]"),
    ("unknown.jsonl", b'{"title": "x", "body": "y"}\n', (), r"unknown\.jsonl, line 1: cannot tell the kind.*--kind="),
    ("wrongkind.jsonl", b'{"prompt": "p", "response": "r"}\n', ("--kind=pref",),
     r"wrongkind\.jsonl, line 1: expected preference fields"),
    ("badrole.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n', (),
     r"badrole\.jsonl, line 1: messages\[1\]: unknown role 'robot'"),
    ("notstr.jsonl", b'{"text": "a"}\n{"text": 5}\n', (), r"notstr\.jsonl, line 2: field 'text' must be a string"),
    ("empty.jsonl", b"", (), r"empty\.jsonl: empty file"),
    ("blank.txt", b"  \n\n", (), r"blank\.txt: empty file"),
    ("empty.json", b"[]", (), r"empty\.json: expected a non-empty JSON list"),
    ("latin1.txt", "caf\u00e9\n".encode("utf-8") + "na\u00efve\n".encode("latin-1"), (),
     r"latin1\.txt, line 2: not UTF-8"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', (), r"latin1\.jsonl, line 2: not UTF-8"),
    ("data.csv", b"text\nhello\n", (), r"unsupported file type \.csv"),
    ("hh_bad.jsonl", b'{"chosen": "yes", "rejected": "no"}\n', (), r"hh_bad\.jsonl, line 1: .*share no dialogue"),
    ("sft.txt", b"hello\n", ("--kind=sft",), r"a \.txt file is pretraining text or prompts"),
    ("kind.jsonl", b'{"text": "a"}\n', ("--kind=chat",), r"--kind=chat: expected one of"),
]


@pytest.mark.parametrize("name,data,args,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_one_line_error_naming_file_and_line(tmp_path, name, data, args, match):
    src = _bad_bytes(tmp_path, name, data)
    with pytest.raises(common.UserError, match=match) as e:
        prepare.main([f"--source={src}", f"--dataset={tmp_path / 'out'}", *args])
    assert "\n" not in str(e.value)
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")] if (tmp_path / "out").exists() else True


def test_empty_parquet_and_missing_file(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(tmp_path / "e.parquet"))
    with pytest.raises(common.UserError, match=r"e\.parquet: empty file"):
        prepare.main([f"--source={tmp_path / 'e.parquet'}", f"--dataset={tmp_path / 'out'}"])
    with pytest.raises(common.UserError, match=r"nope\.jsonl: no such file"):
        prepare.main([f"--source={tmp_path / 'nope.jsonl'}", f"--dataset={tmp_path / 'out'}"])


def test_cli_prints_one_error_line_and_writes_nothing(tmp_path):
    # the whole command: exit status 2, `error: FILE, line N: ...` on stderr, no traceback, existing files intact
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"old")
    src = _bad_bytes(tmp_path, "bad.jsonl", b'{"text": "a"}\n{oops}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "prepare.py", f"--source={src}", f"--dataset={out}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "bad.jsonl, line 2: malformed JSON" in r.stderr
    assert sorted(os.listdir(out)) == ["train.bin"] and (out / "train.bin").read_bytes() == b"old"
    # a hub name that cannot be reached (offline here) is the same kind of one-line error
    r = subprocess.run([sys.executable, "prepare.py", "--source=nobody/no-such-dataset", f"--dataset={out}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot load it from the Hugging Face hub" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------- atomic writes, loaders

def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = str(tmp_path / "f.bin")
    common.write_atomic(path, lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.write_atomic(path, crash)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_the_temp_file_is_the_writers_own(tmp_path):
    # two pipelines started together both prepare data/world: a temp name shared by both processes let one rename
    # the other's half-written file away; each writer's temp file carries its process id
    seen = []

    def write(f):
        seen.extend(os.listdir(tmp_path))
        f.write(b"x")

    common.write_atomic(str(tmp_path / "f.bin"), write)
    assert seen == [f"f.bin.{os.getpid()}.tmp"] and os.listdir(tmp_path) == ["f.bin"]


def test_npz_files_carry_no_timestamp(tmp_path, monkeypatch):
    # np.savez stamps each member with the time of writing: two runs a few seconds apart would differ in bytes
    import time
    arrays = dict(ids=np.arange(7, dtype=np.int32), offsets=np.array([0, 7], dtype=np.int64))
    monkeypatch.setattr(time, "time", lambda: 1.0e9)
    prepare.save_npz(str(tmp_path / "a.npz"), **arrays)
    monkeypatch.setattr(time, "time", lambda: 1.7e9)
    prepare.save_npz(str(tmp_path / "b.npz"), **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert z["ids"].tolist() == list(range(7))


def test_load_ragged_rejects_missing_keys_and_bad_offsets(tmp_path):
    path = str(tmp_path / "x.npz")
    prepare.save_npz(path, ids=np.arange(5, dtype=np.int32), offsets=np.array([0, 2, 5], dtype=np.int64))
    assert [a.tolist() for a in prepare.load_ragged(path, "ids")] == [[0, 1], [2, 3, 4]]
    with pytest.raises(common.UserError, match="no arrays 'chosen_ids'/'chosen_offsets'"):
        prepare.load_ragged(path, "chosen_ids")
    prepare.save_npz(path, ids=np.arange(5, dtype=np.int32), offsets=np.array([0, 3, 2, 5], dtype=np.int64))
    with pytest.raises(common.UserError, match="does not index"):
        prepare.load_ragged(path, "ids")
    with pytest.raises(common.UserError, match="not found"):
        prepare.load_ragged(str(tmp_path / "none.npz"), "ids")


def test_token_dtype_fits_the_vocabulary():
    assert prepare.token_dtype(6400) == np.uint16 and prepare.token_dtype(65535) == np.uint16
    assert prepare.token_dtype(65536) == np.uint32 and prepare.token_dtype(151_000) == np.uint32


# ------------------------------------------------------------------------- large local files, text kept as it is

def read(source, *args):
    """prepare.read_records on a source, with the defaults of prepare.py and `--key=value` args."""
    cfg = dict(source=str(source), kind="", split="train", subset="", max_rows=0)
    for a in args:
        k, v = a[2:].split("=", 1)
        cfg[k] = int(v) if k == "max_rows" else v
    return prepare.read_records(cfg)


# each row ~260 bytes: 55,000 rows are ~14 MB, more than the first block a type-inferring JSON reader looks at
FILLER = "Explain the following passage in one sentence, and keep it short: " + "lorem ipsum dolor sit amet " * 6


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_a_large_jsonl_whose_optional_field_turns_from_null_to_text_late_prepares(tmp_path):
    # 55,000 Alpaca rows, `system` null in all but the last ten: the datasets JSON reader inferred the type from
    # its first block and stopped with a cast error naming line 48,650 (the first string is on line 54,991)
    n = 55_000
    rows = [json.dumps({"instruction": f"{FILLER}{i}", "input": "", "output": f"answer {i}",
                        "system": f"system {i}" if i >= n - 10 else None}) for i in range(n)]
    kind, records, skipped = read(write_lines(tmp_path / "big.jsonl", rows))
    assert kind == "sft" and len(records) == n and not skipped
    assert records[0]["messages"] == [{"role": "user", "content": f"{FILLER}0"},
                                      {"role": "assistant", "content": "answer 0"}]
    assert [r["messages"][0] for r in records[-10:]] == [{"role": "system", "content": f"system {i}"}
                                                         for i in range(n - 10, n)]
    assert all(r["messages"][0]["role"] == "user" for r in records[:-10])
    # a bad row that late is reported on its own line
    rows[54_994] = json.dumps({"instruction": "x", "output": 5})
    with pytest.raises(common.UserError, match=r"big2\.jsonl, line 54995: field 'output' must be a string"):
        read(write_lines(tmp_path / "big2.jsonl", rows))


def test_a_large_prompt_file_whose_answer_turns_from_number_to_text_late_prepares(tmp_path):
    # the answer was an int64 column for the reader's first block: "Failed to parse string ... as a scalar of type
    # int64" for the rows after it
    n = 55_000
    answers = [i for i in range(n - 5)] + [f"x{i}" for i in range(5)]
    rows = [json.dumps({"prompt": f"{FILLER}{i}", "answer": a, "task": "add"}) for i, a in enumerate(answers)]
    kind, records, _ = read(write_lines(tmp_path / "q.jsonl", rows))
    assert kind == "prompts" and [r["answer"] for r in records] == [str(a) for a in answers]
    # and the same rows as one JSON list, read up to an error late in it, named by the line its item starts on
    path = tmp_path / "q.json"
    rows[54_000] = json.dumps({"prompt": ["not", "text"]})
    path.write_text("[\n" + ",\n".join(rows) + "\n]\n", encoding="utf-8")
    with pytest.raises(common.UserError, match=r"q\.json, line 54002: field 'prompt' must be a string"):
        read(path)


def test_json_items_are_named_by_their_line_in_a_list_held_by_an_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"version": 2, "notes": {"a": [1, 2]},\n "data": [\n  {"text": "one"},\n\n  {"text": 7}\n]}',
                    encoding="utf-8")
    with pytest.raises(common.UserError, match=r"d\.json, line 5: field 'text' must be a string"):
        read(path)


def test_max_rows_stops_reading_before_a_bad_line(tmp_path):
    src = write_lines(tmp_path / "m.jsonl", [json.dumps({"text": f"doc {i}"}) for i in range(5)] + ["{oops"])
    _, records, _ = read(src, "--max_rows=5")
    assert records == [f"doc {i}" for i in range(5)]


BOM = "\ufeff"


@pytest.mark.parametrize("name,content,kind_arg,first", [
    ("b.txt", "First document.\n\nSecond one.\n", "", "First document."),
    ("p.txt", "first prompt\nsecond prompt\n", "prompts", "first prompt"),
    ("b.jsonl", '{"text": "First document."}\n{"text": "Second one."}\n', "", "First document."),
    ("b.json", '[{"text": "First document."}, {"text": "Second one."}]', "", "First document."),
    ("l.json", '{"text": "First document."}\n{"text": "Second one."}\n', "", "First document."),
])
def test_a_utf8_byte_order_mark_is_dropped_and_the_file_accepted(tmp_path, name, content, kind_arg, first):
    # a .txt kept U+FEFF at the start of its first document or prompt; .jsonl and .json with a mark were refused
    path = tmp_path / name
    path.write_bytes((BOM + content).encode("utf-8"))
    kind, records, _ = read(path, *([f"--kind={kind_arg}"] if kind_arg else []))
    got = records[0] if kind == "pretrain" else records[0]["messages"][0]["content"]
    assert got == first and not any(BOM in json.dumps(r, ensure_ascii=False) for r in records)


def test_null_and_empty_text_in_a_parquet_file_skip_their_rows_and_are_counted(tmp_path, capsys):
    # a null `text` stopped the whole run ("the row has []") while an empty one was skipped and counted
    texts = ["The cat sat.", None, "A dog ran.", "", "Birds sing.", "   ", "Fish swim."]
    out, meta, _ = run(tmp_path, write_parquet(tmp_path / "n.parquet", [{"text": t} for t in texts]))
    assert meta["pretrain_skipped_rows"] == 3
    assert "skipped 3 rows: 3 with a null or empty required field" in capsys.readouterr().out
    _, records, skipped = read(tmp_path / "n.parquet")
    assert records == [t for t in texts if t and t.strip()] and skipped == {prepare.NO_TEXT: 3}


def test_null_optional_fields_are_absent_and_null_required_fields_skip_the_row(tmp_path):
    sft = [
        {"instruction": "Add.", "input": None, "output": "3", "system": None},                  # kept, as if absent
        {"instruction": "Add.", "input": "1 2", "output": None},                                # no reply: skipped
        {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},                              # kept, no system
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},  # skipped
        {"messages": None, "instruction": "Say hi.", "output": "hi"},                           # kept
        {"conversations": None},                                                                # skipped
    ]
    _, records, skipped = read(write_jsonl(tmp_path / "s.jsonl", sft), "--kind=sft")
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "3"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]]
    assert skipped == {prepare.NO_TEXT: 3}
    pref = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": None},
            {"prompt": "p", "chosen": None, "rejected": "b"}, {"prompt": None, "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "", "rejected": "b"}]
    _, records, skipped = read(write_jsonl(tmp_path / "p.jsonl", pref))
    assert records == [{"messages": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"}]
    assert skipped == {prepare.NO_TEXT: 3, "chosen == rejected": 1}
    prompts = [{"prompt": "q1", "answer": None, "task": None, "lang": None}, {"prompt": None, "answer": "4"},
               {"prompt": "q2", "answer": 0}]
    _, records, skipped = read(write_jsonl(tmp_path / "q.jsonl", prompts))
    assert [(r["answer"], r["task"], r["lang"]) for r in records] == [(None, "open", "en"), ("0", "open", "en")]
    assert skipped == {prepare.NO_TEXT: 1}
    # as prompts, an SFT row needs no reply: a null one does not skip it
    _, records, skipped = read(write_jsonl(tmp_path / "sp.jsonl", sft[:2]), "--kind=prompts")
    assert [r["messages"] for r in records] == [[{"role": "user", "content": "Add."}],
                                                [{"role": "user", "content": "Add.\n\n1 2"}]] and not skipped
    # the first row's required field null: the kind still follows from the fields it names
    kind, records, skipped = read(write_jsonl(tmp_path / "f.jsonl", [{"text": None}, {"text": "doc"}]))
    assert kind == "pretrain" and records == ["doc"] and skipped == {prepare.NO_TEXT: 1}


def test_readers_hand_the_text_through_unchanged(tmp_path):
    # rows of a structured file are one document or message each, kept byte for byte: no stripping, no newline
    # normalising, no splitting on "<|endoftext|>" (only a .txt file uses it as a separator)
    texts = ["  indented start\r\nCRLF line\r\n", "a <|endoftext|> inside\n\n", "\ttab\u3000全角空格 "]
    for name, write in (("t.jsonl", write_jsonl), ("t.parquet", write_parquet)):
        _, records, _ = read(write(tmp_path / name, [{"text": t} for t in texts]))
        assert records == texts, name
    sft = [{"prompt": " leading space", "response": "def f():\n    return 1\n"}]
    _, records, _ = read(write_jsonl(tmp_path / "c.jsonl", sft))
    assert records[0]["messages"] == [{"role": "user", "content": " leading space"},
                                      {"role": "assistant", "content": "def f():\n    return 1\n"}]
    pair = {"prompt": "q ", "chosen": " yes\n", "rejected": "no"}
    _, records, _ = read(write_jsonl(tmp_path / "pr.jsonl", [pair]))
    assert (records[0]["chosen"], records[0]["rejected"]) == (" yes\n", "no")
    # a .txt file: documents between blank lines or "<|endoftext|>", their own text as it was, CRLF included
    path = tmp_path / "t.txt"
    path.write_bytes(b"    Once upon a time,\r\nthe end.  \r\n\r\nSecond<|endoftext|>Third\n<|endoftext|>\n\n\nLast")
    _, records, _ = read(path)
    assert records == ["    Once upon a time,\r\nthe end.  ", "Second", "Third", "Last"]
    path.write_text(" a prompt with spaces \n\nsecond\r\n", encoding="utf-8")
    _, records, _ = read(path, "--kind=prompts")
    assert [r["messages"][0]["content"] for r in records] == [" a prompt with spaces ", "second"]


def test_a_single_document_is_split_between_characters(tmp_path):
    # one document: its tail is held out; cut by token and decoded, half a character became U+FFFD on both sides
    text = "The cat sleeps: " + "".join(chr(0x20000 + 37 * i) for i in range(41))  # 4-byte characters, each once
    out, meta, tok = run(tmp_path, write_jsonl(tmp_path / "one.jsonl", [{"text": text}]))
    parts = []
    for split in ("train", "val"):
        data = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16).tolist()
        assert data[-1] == tok.eot_id
        parts.append(tok.decode(data[:-1]))
    assert parts[0] + parts[1] == text and parts[1]


def test_a_corrupt_parquet_page_is_a_one_line_error_with_status_2(tmp_path):
    # a read error in the middle of a parquet file aborted the process (status 134) instead of the one-line error
    rows = [{"text": f"document number {i} " + "x" * 40} for i in range(4000)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "good.parquet"), row_group_size=500,
                   compression="snappy")
    data = bytearray((tmp_path / "good.parquet").read_bytes())
    data[len(data) // 2:len(data) // 2 + 2000] = b"\x41" * 2000  # inside a middle row group's pages
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "prepare.py", f"--source={tmp_path / 'bad.parquet'}",
                        f"--dataset={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
    rows = re.search(r"bad\.parquet, rows (\d+)-(\d+): cannot read them", r.stderr)
    # the damaged row group, from its first row not read: the rows before it were read
    assert rows and int(rows[1]) > 1 and int(rows[2]) % 500 == 0 and int(rows[2]) - int(rows[1]) < 500, r.stderr


def test_a_hub_stream_failing_mid_way_names_the_row_and_its_nulls_are_treated_alike(monkeypatch):
    import datasets

    def rows():
        yield {"prompt": "q1", "response": "a1", "system": None}
        yield {"prompt": "q2", "response": None, "system": None}  # a column the row has no value for
        raise ConnectionError("the connection was reset\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: rows())
    with pytest.raises(common.UserError, match=r"^--source=someone/chats \(train\), row 3: cannot read it "
                                                r"\(ConnectionError: the connection was reset\)$"):
        read("someone/chats")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: itertools.islice(rows(), 2))
    kind, records, skipped = read("someone/chats")
    assert kind == "sft" and len(records) == 1 and skipped == {prepare.NO_TEXT: 1}
