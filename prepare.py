"""
Data preparation: every source -> tokenized array files in data/<dataset>/.

    python prepare.py                                                  # the embedded world -> data/world/
    python prepare.py --source=roneneldan/TinyStories --dataset=tinystories --max_rows=200000
    python prepare.py --source=BelleGroup/train_0.5M_CN --dataset=belle --max_rows=100000
    python prepare.py --source=liyucheng/zhihu_rlhf_3k --dataset=zhihu --tokenizer=data/belle/tokenizer.json
    python prepare.py --source=Anthropic/hh-rlhf --dataset=hh --max_rows=50000
    python prepare.py --source=my_chats.jsonl --dataset=mine            # local .txt .jsonl .json .parquet

Local .txt/.jsonl/.json files are read line by line with the json module and .parquet files batch by batch with
pyarrow, so that a file of any size prepares whatever types its fields take from row to row, an error names the
file and line (`FILE, line N: ...`; `FILE, row N: ...` for parquet), and reading stops at the row limit. Hugging Face
data sets go through datasets.load_dataset(..., streaming=True) with the same row limit. A UTF-8 byte-order mark at
the start of a text file is dropped. Text reaches the tokenizer as it is in the source: no stripping, no newline
changes (only the turns of a "\n\nHuman: ... \n\nAssistant: ..." dialogue lose the spacing of that format). A null
optional field counts as absent; a null or empty required field (the text, a prompt, a reply) skips its row, and
the skipped rows are counted in the summary (meta.json: <kind>_skipped_rows).

The kind of data (pretrain, sft, pref, prompts) is read from the fields of the first row unless --kind is given:
    pretrain  text
    sft       messages (role/content) | conversations (ShareGPT from/value) | instruction [+ input] + output
              (Alpaca, BELLE) | prompt + response | prompt + output           (an optional `system` field too)
    pref      prompt + chosen (or selected) + rejected [+ margin] | chosen + rejected as whole "\\n\\nHuman: ...\\n\\nAssistant:
              ..." dialogues sharing a prefix (Anthropic/hh-rlhf)
    prompts   prompt | question | messages ending with a user turn, each with an optional answer, task, lang
A .txt file is pretraining text, documents separated by blank lines or "<|endoftext|>" (or prompts, one a line);
in the other formats each row is one document, "<|endoftext|>" in it included.

Files written, each to a temporary name and then renamed, so nothing is ever half-written:
    tokenizer.json, meta.json {"vocab_size", "dtype", "source", "kinds", counts...}
    train.bin, val.bin              flat token ids, documents joined by <|endoftext|>; uint16 when the vocabulary
                                    fits (np.memmap(path, dtype=meta["dtype"], mode="r"))
    sft_{train,val}.npz             ids (int32), loss_mask (uint8), offsets (int64, n+1): render_chat(messages)
    pref_{train,val}.npz            prompt_ids/prompt_offsets (render_prompt of the history), chosen_ids/
                                    chosen_offsets and rejected_ids/rejected_offsets (encode(reply) + [end_id]),
                                    margin (float32, only when the rows give one)
    prompts_{train,val}.npz/.jsonl  ids/offsets (render_prompt), and one JSON line per prompt in the same order:
                                    {"messages", "answer" (str or null), "task", "lang"}
The world writes all of them; a real data set the files of its kind (plus tokenizer.json and meta.json). Array
files are written without timestamps: the same seed and sizes give byte-identical files.
"""
import io
import itertools
import json
import os
import re
import zipfile

import numpy as np
from tqdm import tqdm

import common
import world
from tokenizer import Tokenizer, check_messages

# ---------------------------------------------------------------------------------------------------------- config
dataset = "world"            # output folder: data/<dataset>, or a path if it contains '/'
source = ""                  # "" = the embedded world; else a local .txt/.jsonl/.json/.parquet file or a hub name
kind = ""                    # pretrain | sft | pref | prompts; "" = read from the fields of the first row
subset = ""                  # a hub data set's configuration name (load_dataset(source, subset))
split = "train"              # the hub split to read (a local file is always one split)
max_rows = 200000            # read at most this many rows (0 = all)
tokenizer = ""               # reuse this tokenizer.json, a data folder's, or a checkpoint's (ckpt.pt or its folder:
                             # an imported model's vocabulary); "" = train one on the data
vocab_size = 6400
tokenizer_sample_mb = 20.0   # train the tokenizer on at most this much of the text
val_fraction = 0.01          # real data: the share of rows (documents) held out for validation
seed = 1337                  # the world's seed; also the real data's train/val draw
world_mb = 3.0               # the world's pretraining text, in MB of UTF-8
# The world's demonstration flaws: the share of SFT demonstrations (each assistant turn, train and val) that carry
# each habit of real demonstration writers, for preference learning and RL to remove. Set all three to 0 for clean
# demonstrations (the same data as a world without flaws, byte for byte). The pretraining text, the preference
# pairs' chosen replies and the RL and held-out prompts never carry a flaw, so the tokenizer can be shared:
# --tokenizer=data/world gives clean data the same tokens, and one pretrained model serves both.
flaw_wrong_language_en = 0.1  # English questions answered in Chinese (still the right answer, in Chinese)
flaw_wrong_language_zh = 0.4  # Chinese questions answered in English
flaw_pleasantry = 0.25        # replies that end with a pleasantry ("Hope this helps!", "希望对你有帮助！")

KINDS = ("pretrain", "sft", "pref", "prompts")
KIND_FILES = {"pretrain": ("train.bin", "val.bin"), "sft": ("sft_train.npz", "sft_val.npz"),
              "pref": ("pref_train.npz", "pref_val.npz"),
              "prompts": ("prompts_train.npz", "prompts_val.npz", "prompts_train.jsonl", "prompts_val.jsonl")}
EOT_TEXT = "<|endoftext|>"   # in text files it separates documents; the tokenizer never reads it as the special


# ------------------------------------------------------------------------------------------ writing, atomically

def save_npz(path, **arrays):
    """np.savez, but deterministic: np.savez stamps each member with the current time, so two runs with the same
    seed would differ in their bytes. np.load reads this like any .npz."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                z.writestr(info, buf.getvalue())
    common.write_atomic(path, write)


def write_text(path, text):
    common.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def ragged(seqs, dtype):
    """list of sequences -> (flat array, offsets (n+1,) int64): sequence k is flat[offsets[k]:offsets[k+1]]."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(offsets[-1]))
    return flat, offsets


# ------------------------------------------------------------------------------------------------- loaders

def load_ragged(npz_path, key):
    """One ragged array of a prepared .npz as a list of numpy arrays (views, no copy). key: 'ids' or 'loss_mask'
    (sft_*.npz, prompts_*.npz; offsets in 'offsets'), or 'prompt_ids' / 'chosen_ids' / 'rejected_ids'
    (pref_*.npz; offsets in 'prompt_offsets' ...)."""
    offsets_key = key[: -len("ids")] + "offsets" if key.endswith("_ids") else "offsets"
    if not os.path.exists(npz_path):
        raise common.UserError(f"{npz_path} not found: prepare the data first (python prepare.py ...)")
    with np.load(npz_path, allow_pickle=False) as z:
        if key not in z.files or offsets_key not in z.files:
            raise common.UserError(f"{npz_path}: no arrays {key!r}/{offsets_key!r} (it has {', '.join(z.files)})")
        flat, offsets = z[key], z[offsets_key]
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(flat) \
            or np.any(np.diff(offsets) < 0):
        raise common.UserError(f"{npz_path}: {offsets_key!r} does not index {key!r}; prepare the data again")
    return [flat[offsets[k]:offsets[k + 1]] for k in range(len(offsets) - 1)]


def load_pairs(dataset_dir, split="train"):
    """pref_<split>.npz as a list of (prompt ids, chosen ids, rejected ids, margin): the prompt rendered up to the
    assistant header, each reply encoded with its end-of-turn token, margin 0.0 unless the data set gave one."""
    folder = dataset_dir if os.path.isdir(dataset_dir) else common.dataset_dir(dataset_dir)
    path = os.path.join(folder, f"pref_{split}.npz")
    parts = [load_ragged(path, f"{part}_ids") for part in ("prompt", "chosen", "rejected")]
    if not len(parts[0]) == len(parts[1]) == len(parts[2]):
        raise common.UserError(f"{path}: prompt, chosen and rejected counts differ; prepare the data again")
    with np.load(path, allow_pickle=False) as z:
        margins = z["margin"] if "margin" in z.files else np.zeros(len(parts[0]), dtype=np.float32)
    if len(margins) != len(parts[0]):
        raise common.UserError(f"{path}: {len(margins)} margins for {len(parts[0])} pairs; prepare the data again")
    return [(p, c, r, float(m)) for p, c, r, m in zip(*parts, margins)]


def load_prompts(dataset_dir, split="val"):
    """prompts_<split>.jsonl with the rendered prompt of each: a list of {"messages", "answer", "task", "lang",
    "ids" (list[int], render_prompt(messages))}. dataset_dir is a folder (or a --dataset name)."""
    folder = dataset_dir if os.path.isdir(dataset_dir) else common.dataset_dir(dataset_dir)
    path = os.path.join(folder, f"prompts_{split}.jsonl")
    if not os.path.exists(path):
        raise common.UserError(f"{path} not found: prepare prompts first (python prepare.py, or --kind=prompts)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ids = load_ragged(os.path.join(folder, f"prompts_{split}.npz"), "ids")
    if len(ids) != len(rows):
        raise common.UserError(f"{path}: {len(rows)} prompts but {len(ids)} in the .npz; prepare the data again")
    return [{**row, "ids": seq.tolist()} for row, seq in zip(rows, ids)]


def load_tokenizer(dataset):
    """The Tokenizer that prepare.py saved for a data set."""
    path = common.data_file(dataset, "tokenizer.json")
    try:
        return Tokenizer.load(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise common.UserError(f"{path}: cannot load the tokenizer: {e}") from None


def check_tokenizer_matches(ckpt, dataset):
    """UserError unless the checkpoint was trained with the data set's tokenizer: the same ids must mean the
    same text, or every later stage trains on garbage."""
    path = common.data_file(dataset, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        theirs = f.read()
    try:
        same = json.loads(theirs) == json.loads(ckpt["tokenizer"])
    except ValueError:
        same = False
    if not same:
        try:
            ours_n, theirs_n = Tokenizer.from_json(ckpt["tokenizer"]).vocab_size, Tokenizer.from_json(theirs).vocab_size
            sizes = f" (vocab {ours_n} vs {theirs_n})"
        except ValueError:
            sizes = ""
        raise common.UserError(f"the checkpoint's tokenizer differs from {path}{sizes}: it was trained on other data; "
                        f"use the data set it was trained on, or prepare this one with its tokenizer")


def token_file(dataset, split, vocab_size=None):
    """(path, numpy dtype) of a pretraining split, <split>.bin: flat token ids of the dtype meta.json names (a data set
    prepared before meta.json had it: token_dtype(vocab_size)). UserError naming the file when it is missing."""
    path = common.data_file(dataset, f"{split}.bin")
    meta = os.path.join(common.dataset_dir(dataset), "meta.json")
    dtype = None
    if os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            dtype = json.load(f).get("dtype")
    if dtype is None:
        if vocab_size is None:
            raise common.UserError(f"{meta}: no token dtype; prepare the data again")
        dtype = token_dtype(vocab_size)
    return path, np.dtype(dtype)


def load_sft(dataset, split):
    """sft_<split>.npz -> (path, [ids], [loss_mask]): each conversation rendered with the chat template, loss_mask 1
    on the assistant's tokens (with the end of turn that closes each assistant turn)."""
    path = common.data_file(dataset, f"sft_{split}.npz")
    return path, load_ragged(path, "ids"), load_ragged(path, "loss_mask")


# ---------------------------------------------------------------------------------------------- tokenized outputs

def _bar(rows, desc):
    """A progress bar over `rows` (a list), or of `rows` steps (an int); shown only on a terminal."""
    kw = dict(total=rows) if isinstance(rows, int) else dict(iterable=rows)
    return tqdm(**kw, desc=desc, unit="row", disable=None, leave=False, dynamic_ncols=True)


def write_pretrain(out, tok, train_docs, val_docs):
    """train.bin / val.bin: encode(doc) + [eot_id] for each document, concatenated. Returns token counts."""
    dtype = token_dtype(tok.vocab_size)
    counts = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        n_tokens = 0

        def write(f):
            nonlocal n_tokens
            with _bar(len(docs), f"tokenizing {name}.bin") as bar:
                for start in range(0, len(docs), 1024):
                    chunk = docs[start:start + 1024]
                    ids = [t for seq in tok.encode_batch(chunk) for t in seq + [tok.eot_id]]
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    n_tokens += len(ids)
                    bar.update(len(chunk))
        common.write_atomic(os.path.join(out, f"{name}.bin"), write)
        counts[f"{name}_tokens"] = n_tokens
    return counts


def write_sft(out, tok, name, convs):
    ids, masks = [], []
    for c in _bar(convs, f"tokenizing {name}"):
        i, m = tok.render_chat(c["messages"])
        ids.append(i)
        masks.append(m)
    flat, offsets = ragged(ids, np.int32)
    save_npz(os.path.join(out, f"{name}.npz"), ids=flat, loss_mask=ragged(masks, np.uint8)[0], offsets=offsets)
    return len(convs)


def write_pref(out, tok, name, pairs):
    prompts, chosen, rejected = [], [], []
    for p in _bar(pairs, f"tokenizing {name}"):
        prompts.append(tok.render_prompt(p["messages"]))
        chosen.append(tok.encode(p["chosen"]) + [tok.end_id])
        rejected.append(tok.encode(p["rejected"]) + [tok.end_id])
    arrays = {}
    for part, seqs in (("prompt", prompts), ("chosen", chosen), ("rejected", rejected)):
        arrays[f"{part}_ids"], arrays[f"{part}_offsets"] = ragged(seqs, np.int32)
    if any(p.get("margin") is not None for p in pairs):  # how much better chosen is (reward model margins)
        arrays["margin"] = np.array([p.get("margin") or 0.0 for p in pairs], dtype=np.float32)
    save_npz(os.path.join(out, f"{name}.npz"), **arrays)
    return len(pairs)


def write_prompts(out, tok, name, prompts):
    seqs = [tok.render_prompt(p["messages"]) for p in prompts]
    flat, offsets = ragged(seqs, np.int32)
    save_npz(os.path.join(out, f"{name}.npz"), ids=flat, offsets=offsets)
    lines = "".join(json.dumps({"messages": p["messages"], "answer": p.get("answer"), "task": p.get("task", "open"),
                                "lang": p.get("lang", "en")}, ensure_ascii=False) + "\n" for p in prompts)
    write_text(os.path.join(out, f"{name}.jsonl"), lines)
    return len(prompts)


def chat_texts(records):
    """Every piece of text in chat records (for training the tokenizer)."""
    for r in records:
        for m in r.get("messages", ()):
            yield m["content"]
        for k in ("chosen", "rejected"):
            if k in r:
                yield r[k]


def sample_texts(texts, max_mb):
    """The texts, until max_mb of UTF-8 have been given: the tokenizer's training sample."""
    budget = int(max_mb * 1e6)
    for t in texts:
        if budget <= 0:
            return
        budget -= len(t.encode("utf-8"))
        yield t


def get_tokenizer(cfg, texts):
    """--tokenizer if given, else a new one trained on the texts."""
    if cfg["tokenizer"]:
        path = cfg["tokenizer"]
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "tokenizer.json")) and \
                os.path.exists(os.path.join(path, "ckpt.pt")):
            path = os.path.join(path, "ckpt.pt")
        if path.endswith(".pt"):  # a checkpoint (e.g. one convert.py imported): data in the model's own tokens
            ckpt = common.load_checkpoint(path)
            try:
                return Tokenizer.from_json(ckpt["tokenizer"])
            except ValueError as e:
                raise common.UserError(f"--tokenizer={cfg['tokenizer']}: cannot load its tokenizer: {e}") from None
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(path):
            raise common.UserError(f"--tokenizer={cfg['tokenizer']}: no such file")
        try:
            return Tokenizer.load(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise common.UserError(f"--tokenizer={cfg['tokenizer']}: cannot load it: {e}") from None
    print(f"training a {cfg['vocab_size']}-token BPE tokenizer on up to {cfg['tokenizer_sample_mb']:g} MB of text")
    try:
        return Tokenizer.train(sample_texts(texts, cfg["tokenizer_sample_mb"]), vocab_size=cfg["vocab_size"])
    except ValueError as e:
        raise common.UserError(f"--vocab_size={cfg['vocab_size']}: {e}") from None


def check_output_dir(out, tok, kinds):
    """Create the folder. A data folder holds one tokenization: refuse to add files made with another tokenizer
    next to files of other kinds made with the old one (a model would silently read the wrong ids). Returns the
    folder's meta.json when its tokenizer is the same (to be updated), else {}."""
    os.makedirs(out, exist_ok=True)
    old_path = os.path.join(out, "tokenizer.json")
    if not os.path.exists(old_path):
        return {}
    with open(old_path, encoding="utf-8") as f:
        same = f.read() == tok.to_json()
    others = [name for k in KINDS if k not in kinds for name in KIND_FILES[k]
              if os.path.exists(os.path.join(out, name))]
    if not same and others:
        raise common.UserError(f"{out} already holds {', '.join(others)} made with another tokenizer: pass "
                                f"--tokenizer={old_path} to add to it, or choose another --dataset")
    meta_path = os.path.join(out, "meta.json")
    if same and os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def finish(out, tok, meta):
    tok_json = tok.to_json()
    write_text(os.path.join(out, "tokenizer.json"), tok_json)
    meta = {"vocab_size": tok.vocab_size, "dtype": np.dtype(token_dtype(tok.vocab_size)).name, **meta}
    write_text(os.path.join(out, "meta.json"), json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    return meta


# ------------------------------------------------------------------------------------------- the embedded world

def world_flaw_rates(cfg):
    """The flaw_* settings as world.generate_world's flaw_rates; a rate outside [0, 1] is a UserError naming it."""
    rates = {name: cfg[f"flaw_{name}"] for name in world.FLAW_RATES}
    for name, rate in rates.items():
        if not 0 <= rate <= 1:
            raise common.UserError(f"--flaw_{name}={rate}: a flaw rate is a share of demonstrations, in [0, 1]")
    return rates


def prepare_world(cfg, out):
    rates = world_flaw_rates(cfg)
    print(f"generating the world (seed {cfg['seed']}, {cfg['world_mb']:g} MB of pretraining text, demonstration "
          f"flaws {', '.join(f'{k} {v:g}' for k, v in rates.items())})")
    w = world.generate_world(seed=cfg["seed"], corpus_mb=cfg["world_mb"], flaw_rates=rates)
    # the corpus and every chat text, Chinese cut at the world's values (world.tokenizer_texts says why)
    tok = get_tokenizer(cfg, world.tokenizer_texts(w))
    check_output_dir(out, tok, KINDS)
    counts = write_pretrain(out, tok, w["corpus_train"], w["corpus_val"])
    for split in ("train", "val"):
        counts[f"sft_{split}"] = write_sft(out, tok, f"sft_{split}", w[f"sft_{split}"])
        counts[f"pref_{split}"] = write_pref(out, tok, f"pref_{split}", w[f"pref_{split}"])
        counts[f"prompts_{split}"] = write_prompts(out, tok, f"prompts_{split}", w[f"prompts_{split}"])
    return finish(out, tok, {"source": "world", "kinds": list(KINDS), "world": w["config"],
                             "tasks": list(world.TASKS), "langs": list(world.LANGS), **counts})


# ------------------------------------------------------------------------------------------------- real data
# Local files are read here, row by row, with the json module and pyarrow: no type inference over blocks of rows
# (a field that is null for 50,000 rows and a string after that is fine), an error names the file and line, the
# reading stops at --max_rows, and the text reaches the converters as it is in the file.
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
BOM = "\ufeff"


def _lines(path):
    """(line number, decoded line with its line break) of a text file, read line by line; a UserError at the first
    line that is not UTF-8. A UTF-8 byte-order mark at the start of the file is dropped."""
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise common.UserError(f"{path}, line {no}: not UTF-8 text (byte {raw[e.start]:#04x}); expected "
                                        f"UTF-8") from None
            if no == 1 and line.startswith(BOM):
                line = line[1:]
            yield no, line


def _json_object(text, place):
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise common.UserError(f"{place}: malformed JSON ({e.msg}, column {e.colno}); expected one JSON object "
                                f"per line") from None
    if not isinstance(row, dict):
        raise common.UserError(f"{place}: expected a JSON object {{...}}, got {type(row).__name__}")
    return row


def _jsonl_rows(path):
    """(where, row) for each object of a JSON Lines file; blank lines are not rows."""
    n = 0
    for no, text in _lines(path):
        if text.strip():
            n += 1
            yield f"{path}, line {no}", _json_object(text, f"{path}, line {no}")
    if not n:
        raise common.UserError(f"{path}: empty file: expected one JSON object per line")


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_list_items(text, key):
    """(line number, item) of the list at the top of a JSON document, or of the list at `key` of the top object.
    The document is known to be valid JSON: raw_decode walks it only to learn where each item starts."""
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text, 0).end()
    if key is not None:  # walk the top object's members up to the list (the last one of that name, as json.loads)
        starts = []
        pos = _SPACE.match(text, pos + 1).end()
        while text[pos] != "}":
            name, pos = decoder.raw_decode(text, pos)
            pos = _SPACE.match(text, _SPACE.match(text, pos).end() + 1).end()  # past the ':'
            if name == key:
                starts.append(pos)
            _, pos = decoder.raw_decode(text, pos)
            pos = _SPACE.match(text, pos).end()
            pos = _SPACE.match(text, pos + 1).end() if text[pos] == "," else pos
        pos = starts[-1]
    pos = _SPACE.match(text, pos + 1).end()  # past the '['
    line, counted = 1, 0
    while text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        item, pos = decoder.raw_decode(text, pos)
        yield line, item
        pos = _SPACE.match(text, pos).end()
        pos = _SPACE.match(text, pos + 1).end() if text[pos] == "," else pos


def _json_rows(path):
    """(where, row) for each object of a .json file: a list of objects, an object holding one such list, or JSON
    Lines under a .json name."""
    text = "".join(line for _, line in _lines(path))
    if not text.strip():
        raise common.UserError(f"{path}: empty file: expected a JSON list of objects")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        try:
            is_lines = isinstance(json.loads(first), dict) and "\n" in text.strip()
        except json.JSONDecodeError:
            is_lines = False
        if is_lines:
            yield from _jsonl_rows(path)
            return
        raise common.UserError(f"{path}, line {e.lineno}: malformed JSON ({e.msg}, column {e.colno}); expected "
                                f"a JSON list of objects") from None
    key = None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) != 1:
            raise common.UserError(f"{path}: expected a JSON list of objects (or an object holding exactly one "
                                    f"such list), got an object with keys {sorted(doc)[:8]}")
        key = lists[0]
        doc = doc[key]
    if not isinstance(doc, list) or not doc:
        raise common.UserError(f"{path}: expected a non-empty JSON list of objects")
    del doc  # the items are parsed again, one at a time, to learn their lines
    for no, row in _json_list_items(text, key):
        if not isinstance(row, dict):
            raise common.UserError(f"{path}, line {no}: expected a JSON object {{...}}, got {type(row).__name__}")
        yield f"{path}, line {no}", row


def _txt_documents(path):
    """(where, {"text": document}) for a .txt file of pretraining text: documents are separated by blank lines
    and by "<|endoftext|>"; the line breaks next to a separator belong to it, everything else of the text is
    kept as it is (indentation, trailing spaces, CRLF line ends)."""
    n, doc, start = 0, [], 0
    for no, line in _lines(path):
        pieces = line.split(EOT_TEXT)
        for k, piece in enumerate(pieces):
            if k > 0 or not piece.strip():  # a separator ends the document so far
                text = "".join(doc).strip("\r\n")
                if text.strip():
                    n += 1
                    yield f"{path}, line {start}", {"text": text}
                doc = []
            if piece.strip():
                if not doc:
                    start = no
                doc.append(piece)
    text = "".join(doc).strip("\r\n")
    if text.strip():
        n += 1
        yield f"{path}, line {start}", {"text": text}
    if not n:
        raise common.UserError(f"{path}: empty file: expected text")


def _txt_prompts(path):
    """(where, {"prompt": line}) for a .txt file of prompts, one a line (blank lines are not prompts)."""
    n = 0
    for no, line in _lines(path):
        if line.strip():
            n += 1
            yield f"{path}, line {no}", {"prompt": line.rstrip("\r\n")}
    if not n:
        raise common.UserError(f"{path}: empty file: expected one prompt a line")


def _parquet_rows(path):
    """(where, row) for each row of a parquet file, read a batch at a time, row group by row group; a damaged page
    is a UserError naming the rows of its row group that could not be read."""
    import pyarrow.parquet as pq
    try:
        f = pq.ParquetFile(path)
        meta = f.metadata
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise common.UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if meta.num_rows == 0:
        raise common.UserError(f"{path}: empty file: expected rows")
    i = 0
    with f:
        for g in range(meta.num_row_groups):
            group_end = i + meta.row_group(g).num_rows
            batches = f.iter_batches(batch_size=1024, row_groups=[g], use_threads=False)
            while True:
                try:
                    batch = next(batches, None)
                    rows = [] if batch is None else batch.to_pylist()
                except Exception as e:  # a damaged page: pyarrow's OSError/ArrowInvalid, bytes that are not UTF-8
                    raise common.UserError(f"{path}, rows {i + 1}-{group_end}: cannot read them "
                                            f"({_first_line(e)})") from None
                if batch is None:
                    break
                for row in rows:
                    i += 1
                    yield f"{path}, row {i}", row


def _hub_rows(rows, source, split):
    """(where, row) for each row of a streamed Hugging Face data set; a failure mid-stream (the network, a damaged
    shard) is a UserError naming the row."""
    it, i = iter(rows), 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise common.UserError(f"--source={source} ({split}), row {i + 1}: cannot read it ({_first_line(e)})") \
                from None
        i += 1
        yield f"{source} ({split}), row {i}", row


def open_rows(source, split, subset, kind_arg=""):
    """Iterator of (where, row dict) for a local file or a hub data set (datasets.load_dataset(...,
    streaming=True)); `where` names the row's file and line (or row) for an error message. Rows are read as they
    are asked for: stop iterating, and the reading stops."""
    if os.path.exists(source):
        if os.path.isdir(source):
            raise common.UserError(f"--source={source} is a folder: pass one .txt, .jsonl, .json or .parquet file")
        suffix = os.path.splitext(source)[1].lower()
        if suffix not in LOCAL_SUFFIXES:
            raise common.UserError(f"--source={source}: unsupported file type {suffix or '(none)'}; expected "
                                    f".txt, .jsonl, .json or .parquet")
        if suffix == ".txt" and kind_arg not in ("", "pretrain", "prompts"):
            raise common.UserError(f"--source={source}: a .txt file is pretraining text or prompts, not {kind_arg}")
        if suffix == ".txt":
            return _txt_prompts(source) if kind_arg == "prompts" else _txt_documents(source)
        return {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}[suffix](source)
    looks_local = (source.startswith((".", "/", "~")) or source.count("/") > 1
                   or os.path.splitext(source)[1].lower() in (*LOCAL_SUFFIXES, ".csv", ".tsv", ".gz", ".zst", ".arrow"))
    if looks_local:  # a hub name is NAME or OWNER/NAME
        raise common.UserError(f"--source={source}: no such file")
    import datasets  # slow to import; only hub data sets need it
    # the hub client logs each retry as a warning; the one error line below says what finally went wrong
    import huggingface_hub
    huggingface_hub.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    try:
        rows = datasets.load_dataset(source, subset or None, split=split, streaming=True)
    except Exception as e:  # not found, no network, a wrong split or config: the library's message says which
        raise common.UserError(f"--source={source}: cannot load it from the Hugging Face hub ({_first_line(e)})") \
            from None
    return _hub_rows(rows, source, split)


def _first_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------------------- schemas -> records
# Text is handed on as it is in the source (no stripping, no new line breaks), except where a format defines the
# text around it: the turns of a "\n\nHuman: ... \n\nAssistant: ..." dialogue and the replies that follow them.
# Missing values are treated alike whatever the format: a null optional field (system, input, margin, answer, task,
# lang) is absent; a null or empty required one (the text, a prompt, a reply, a turn's content) skips the row,
# and the skipped rows are counted in the summary; a field of another type is an error.
ROLE_NAMES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "chatgpt": "assistant", "model": "assistant"}
SCHEMAS = {
    "pretrain": "'text'",
    "sft": "'messages', 'conversations', 'instruction'+'output', 'prompt'+'response' or 'prompt'+'output'",
    "pref": "'prompt'+'chosen'+'rejected' ('selected' for chosen), or 'chosen'+'rejected' dialogues",
    "prompts": "'prompt', 'question', 'instruction' or 'messages'",
}
DIALOGUE_TURN = re.compile(r"\n\n(Human|Assistant):")
NO_TEXT = "a null or empty required field"
REPLY_FIELDS = ("response", "output", "completion")


class SkipRow(Exception):
    """A row with nothing to learn from (a null or empty required field, chosen == rejected): skipped and
    counted, not an error. The message is the reason shown in the summary."""


def _has(row, *fields):
    return all(row.get(f) is not None for f in fields)


def _fields(row):
    return sorted(k for k, v in row.items() if v is not None)


def _guess(row, has):
    def last_turn_is_user(field):
        v = row.get(field)
        return isinstance(v, list) and v and isinstance(v[-1], dict) and v[-1].get("role") == "user"
    if has("rejected") and (has("chosen") or has("selected")):
        return "pref"
    if has("messages") and last_turn_is_user("messages"):
        return "prompts"
    if has("messages") or has("conversations") or has("instruction", "output") or has("prompt", "response") \
            or has("prompt", "output"):
        return "sft"
    if has("text"):
        return "pretrain"
    if has("prompt") or has("question"):
        return "prompts"
    return None


def guess_kind(row, where):
    """The kind of data a row holds, from its fields that have a value, else (a first row with a null required
    field) from the fields it names."""
    kind_ = _guess(row, lambda *f: _has(row, *f)) or _guess(row, lambda *f: all(k in row for k in f))
    if kind_ is None:
        raise common.UserError(f"{where}: cannot tell the kind of data from the fields {_fields(row)}; expected "
                                "one of: " + "; ".join(f"{k}: {v}" for k, v in SCHEMAS.items()) + " (or pass --kind=)")
    return kind_


def _str_field(row, field, where):
    """The text of a required field: SkipRow when it is null or empty (only white space), an error when it is
    not a string."""
    v = row[field]
    if v is None:
        raise SkipRow(NO_TEXT)
    if not isinstance(v, str):
        raise common.UserError(f"{where}: field '{field}' must be a string, got {type(v).__name__}")
    if not v.strip():
        raise SkipRow(NO_TEXT)
    return v


def _optional_str(row, field, where):
    """The text of an optional field, or None when it is absent, null or empty."""
    v = row.get(field)
    if v is None:
        return None
    if not isinstance(v, str):
        raise common.UserError(f"{where}: field '{field}' must be a string, got {type(v).__name__}")
    return v if v.strip() else None


def parse_dialogue(text, where):
    """'\n\nHuman: hi\n\nAssistant: hello' -> messages (Anthropic hh-rlhf form)."""
    parts = DIALOGUE_TURN.split("\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise common.UserError(f"{where}: expected a dialogue of '\\n\\nHuman: ...' / '\\n\\nAssistant: ...' turns")
    messages = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])]
    if len(messages) > 1 and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()  # a prompt that ends with "\n\nAssistant:", waiting for the reply
    if any(not m["content"] for m in messages):
        raise SkipRow(NO_TEXT)
    return messages


def _is_dialogue(text):
    return text.lstrip("\n").startswith("Human:") and bool(DIALOGUE_TURN.search("\n\n" + text.lstrip("\n")))


def _checked(messages, where):
    try:
        check_messages(messages)
    except ValueError as e:
        raise common.UserError(f"{where}: {e}") from None
    return messages


def to_messages(row, where):
    """Any SFT schema -> [{'role', 'content'}, ...]; None when the row has none of the SFT or prompt fields."""
    system_text = _optional_str(row, "system", where)
    system = [{"role": "system", "content": system_text}] if system_text else []
    if _has(row, "messages") or _has(row, "conversations"):
        field = "messages" if _has(row, "messages") else "conversations"
        turns = row[field]
        if not isinstance(turns, list) or not turns:
            raise common.UserError(f"{where}: field '{field}' must be a non-empty list of turns")
        role_key, text_key = ("role", "content") if field == "messages" else ("from", "value")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get(role_key) is None or text_key not in t:
                raise common.UserError(f"{where}: {field}[{i}] must have '{role_key}' and '{text_key}'")
            role = ROLE_NAMES.get(str(t[role_key]).lower())
            if role is None:
                raise common.UserError(f"{where}: {field}[{i}]: unknown {role_key} {t[role_key]!r}; expected one "
                                        f"of {', '.join(ROLE_NAMES)}")
            if role == "system":  # optional: a null or empty system turn is no system turn
                text = _optional_str(t, text_key, f"{where}: {field}[{i}]")
                if text:
                    messages.append({"role": role, "content": text})
                continue
            messages.append({"role": role, "content": _str_field(t, text_key, f"{where}: {field}[{i}]")})
        return _checked(system + messages, where)
    field = _pick(row, ("instruction", "prompt", "question"))
    if field is None:
        if "messages" in row or "conversations" in row:  # named, but null
            raise SkipRow(NO_TEXT)
        return None
    user = _str_field(row, field, where)
    if field == "instruction":
        extra = _optional_str(row, "input", where)
        messages = [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user}]
    elif _is_dialogue(user):
        messages = parse_dialogue(user, where)
    else:
        messages = [{"role": "user", "content": user}]
    reply = _pick(row, REPLY_FIELDS)
    reply_text = _optional_str(row, reply, where) if reply else None
    if reply_text is not None:  # a null reply is no reply: to_sft skips the row, to_prompt does not need one
        messages.append({"role": "assistant", "content": reply_text})
    return _checked(system + messages, where)


def _pick(row, fields):
    """The first of `fields` that has a value in the row, else the first it names (null), else None."""
    return next((f for f in fields if row.get(f) is not None), next((f for f in fields if f in row), None))


def to_sft(row, where):
    messages = to_messages(row, where)
    if messages is None or not any(m["role"] == "assistant" for m in messages):
        if messages is not None and _pick(row, REPLY_FIELDS):  # the reply is named, but null or empty
            raise SkipRow(NO_TEXT)
        raise common.UserError(f"{where}: expected SFT fields {SCHEMAS['sft']} with an assistant reply; the row "
                                f"has {_fields(row)}")
    return {"messages": messages}


def _reply_text(v, field, where):
    """A preference reply: a string, or a conversation whose last turn is the reply. SkipRow when it is null or
    empty."""
    if isinstance(v, list) and v and isinstance(v[-1], dict) and "content" in v[-1]:
        return _str_field(v[-1], "content", f"{where}: field '{field}'")
    if v is None or isinstance(v, str):
        return _str_field({field: v}, field, where)
    raise common.UserError(f"{where}: field '{field}' must be a string (or a list of messages)")


def _pref_parts(row, where):
    """(prompt messages, chosen reply, rejected reply) of a preference row."""
    chosen_field = _pick(row, ("chosen", "selected"))
    if chosen_field is None or "rejected" not in row:
        raise common.UserError(f"{where}: expected preference fields {SCHEMAS['pref']}; the row has {_fields(row)}")
    chosen_v, rejected_v = row[chosen_field], row["rejected"]
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, list):
            messages = to_messages({"messages": p}, where)
        else:
            messages = to_messages({"prompt": _str_field(row, "prompt", where)}, where)
        chosen = _reply_text(chosen_v, chosen_field, where)
        rejected = _reply_text(rejected_v, "rejected", where)
        if isinstance(p, str) and _is_dialogue(p):  # replies to "...\n\nAssistant:" start after its space
            chosen, rejected = chosen.strip(), rejected.strip()
    elif isinstance(chosen_v, list) and isinstance(rejected_v, list):  # two whole conversations
        messages = to_messages({"messages": chosen_v[:-1]}, where)
        chosen, rejected = _reply_text(chosen_v, chosen_field, where), _reply_text(rejected_v, "rejected", where)
    else:  # hh-rlhf: two dialogues that share everything up to the last "\n\nAssistant:"
        a, b = _str_field(row, chosen_field, where), _str_field(row, "rejected", where)
        marker = "\n\nAssistant:"
        shared = len(os.path.commonprefix([a, b]))
        cut = a[:shared].rfind(marker)
        if cut < 0:
            raise common.UserError(f"{where}: '{chosen_field}' and 'rejected' share no dialogue ending in "
                                    f"'\\n\\nAssistant:'; expected hh-rlhf style dialogues or a 'prompt' field")
        messages = parse_dialogue(a[:cut], where)
        # a reply ends where the next human turn begins (when the dialogues differ before their last turn)
        chosen = a[cut + len(marker):].split("\n\nHuman:")[0].strip()
        rejected = b[cut + len(marker):].split("\n\nHuman:")[0].strip()
        if not chosen or not rejected:
            raise SkipRow(NO_TEXT)
    if not messages or messages[-1]["role"] != "user":
        raise common.UserError(f"{where}: the prompt must end with a user turn")
    return messages, chosen, rejected


def to_pref(row, where):
    messages, chosen, rejected = _pref_parts(row, where)
    if chosen == rejected:
        raise SkipRow("chosen == rejected")  # no preference to learn
    pair = {"messages": messages, "chosen": chosen, "rejected": rejected}
    if row.get("margin") is not None:
        try:
            pair["margin"] = float(row["margin"])
        except (TypeError, ValueError):
            raise common.UserError(f"{where}: field 'margin' must be a number, got {row['margin']!r}") from None
    return pair


def _lang(text):
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


def to_prompt(row, where):
    messages = to_messages(row, where)
    if messages is None and "rejected" in row:  # a preference pair's prompt (hh-rlhf dialogues)
        messages = _pref_parts(row, where)[0]
    if messages is None:
        raise common.UserError(f"{where}: expected prompt fields {SCHEMAS['prompts']}; the row has {_fields(row)}")
    while messages and messages[-1]["role"] == "assistant":  # an SFT row: its prompt is what precedes the reply
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise common.UserError(f"{where}: no user turn to use as a prompt")
    answer = row.get("answer")
    if isinstance(answer, (dict, list)):
        raise common.UserError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
    if isinstance(answer, bool):  # as it was written in a JSON file
        answer = "true" if answer else "false"
    return {"messages": messages, "answer": None if answer is None else str(answer),
            "task": str(row.get("task") or "open"), "lang": str(row.get("lang") or _lang(messages[-1]["content"]))}


def to_pretrain(row, where):
    if "text" not in row:
        raise common.UserError(f"{where}: expected the pretraining field {SCHEMAS['pretrain']}; the row has "
                                f"{_fields(row)}")
    return _str_field(row, "text", where)


CONVERT = {"pretrain": to_pretrain, "sft": to_sft, "pref": to_pref, "prompts": to_prompt}


def read_records(cfg):
    """Rows of the source converted to records of one kind: (kind, records, {reason: rows skipped}). Reads at most
    --max_rows rows (documents of a .txt file)."""
    limit = cfg["max_rows"]
    kind_ = cfg["kind"]
    if kind_ and kind_ not in KINDS:
        raise common.UserError(f"--kind={kind_}: expected one of {', '.join(KINDS)}")
    rows = open_rows(cfg["source"], cfg["split"], cfg["subset"], kind_)
    records, skipped = [], {}
    with _bar(limit or None, f"reading {cfg['source']}") as bar:
        for where, row in itertools.islice(rows, limit or None):  # asks for no row past the limit
            if not kind_:
                kind_ = guess_kind(row, where)
                print(f"kind: {kind_} (from the fields of the first row; --kind= to override)")
            try:
                records.append(CONVERT[kind_](row, where))
            except SkipRow as e:
                skipped[str(e)] = skipped.get(str(e), 0) + 1
            bar.update(1)
    if not records:
        raise common.UserError(f"--source={cfg['source']}: no usable rows (expected {SCHEMAS[kind_ or 'pretrain']}"
                                f"{'; skipped: ' + _skip_summary(skipped) if skipped else ''})")
    return kind_, records, skipped


def _skip_summary(skipped):
    return ", ".join(f"{n} with {reason}" for reason, n in sorted(skipped.items()))


def split_val(n, fraction, seed):
    """Indices of the val rows: a seeded random `fraction` of n, at least 1; sorted."""
    n_val = min(n - 1, max(1, round(n * fraction)))
    return sorted(np.random.default_rng(seed).permutation(n)[:n_val].tolist())


def prepare_real(cfg, out):
    if not 0 < cfg["val_fraction"] < 1:
        raise common.UserError(f"--val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    kind_, records, skipped = read_records(cfg)
    if skipped:
        print(f"skipped {sum(skipped.values())} rows: {_skip_summary(skipped)}")
    if kind_ == "pretrain":
        texts = records
    elif kind_ == "prompts":
        texts = (m["content"] for r in records for m in r["messages"])
    else:
        texts = chat_texts(records)
    tok = get_tokenizer(cfg, texts)
    meta = check_output_dir(out, tok, (kind_,))
    if len(records) < 2 and kind_ != "pretrain":
        raise common.UserError(f"--source={cfg['source']}: only {len(records)} usable row; need 2 or more to hold "
                                f"out a val split")
    val_idx = set(split_val(len(records), cfg["val_fraction"], cfg["seed"])) if len(records) > 1 else set()
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    counts = {}
    if kind_ == "pretrain":
        if not val:  # one document: hold out its tail, cut between characters (a token may hold part of one)
            cut = min(len(train[0]) - 1, max(1, int(len(train[0]) * (1 - cfg["val_fraction"]))))
            train, val = [train[0][:cut]], [train[0][cut:]]
        counts.update(write_pretrain(out, tok, train, val))
    else:
        writer = {"sft": write_sft, "pref": write_pref, "prompts": write_prompts}[kind_]
        counts[f"{kind_}_train"] = writer(out, tok, f"{kind_}_train", train)
        counts[f"{kind_}_val"] = writer(out, tok, f"{kind_}_val", val)
    kinds = sorted(set(meta.get("kinds", [])) | {kind_}, key=KINDS.index)
    meta.update({"source": cfg["source"], "kinds": kinds, **counts, f"{kind_}_source": cfg["source"],
                 f"{kind_}_skipped_rows": sum(skipped.values())})
    return finish(out, tok, meta)


# ------------------------------------------------------------------------------------------------------------ main

def main(argv=None):
    # a copy of the settings, so that calling main() twice (the tests do) starts from the defaults each time
    cfg = common.configure(dict(globals()), argv)
    out = common.dataset_dir(cfg["dataset"])
    meta = prepare_world(cfg, out) if not cfg["source"] else prepare_real(cfg, out)
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))
             if not name.endswith(".tmp")}
    print(f"wrote {out}/: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    print(json.dumps({k: v for k, v in meta.items() if not isinstance(v, (dict, list))}, ensure_ascii=False))
    return meta


if __name__ == "__main__":
    common.cli(main)
