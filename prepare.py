"""
Data preparation: every source -> tokenized array files in data/<dataset>/.

    python prepare.py                                                  # the embedded world -> data/world/
    python prepare.py --source=roneneldan/TinyStories --dataset=tinystories --max_rows=200000
    python prepare.py --source=BelleGroup/train_0.5M_CN --dataset=belle --max_rows=100000
    python prepare.py --source=liyucheng/zhihu_rlhf_3k --dataset=zhihu --tokenizer=data/belle/tokenizer.json
    python prepare.py --source=Anthropic/hh-rlhf --dataset=hh --max_rows=50000
    python prepare.py --source=my_chats.jsonl --dataset=mine            # local .txt .jsonl .json .parquet

Local files and Hugging Face data sets go through the same path, datasets.load_dataset(..., streaming=True) with a
row limit; local .txt/.jsonl/.json files are first checked line by line, so that a bad line is reported as
`FILE, line N: ...` rather than as whatever the datasets library wraps it in.

The kind of data (pretrain, sft, pref, prompts) is read from the fields of the first row unless --kind is given:
    pretrain  text
    sft       messages (role/content) | conversations (ShareGPT from/value) | instruction [+ input] + output
              (Alpaca, BELLE) | prompt + response | prompt + output           (an optional `system` field too)
    pref      prompt + chosen (or selected) + rejected [+ margin] | chosen + rejected as whole "\\n\\nHuman: ...\\n\\nAssistant:
              ..." dialogues sharing a prefix (Anthropic/hh-rlhf)
    prompts   prompt | question | messages ending with a user turn, each with an optional answer, task, lang
A .txt file is pretraining text, documents separated by blank lines or "<|endoftext|>" (or prompts, one a line).

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
import json
import os
import re
import zipfile

import numpy as np
from tqdm import tqdm

import trainer
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
    trainer.write_atomic(path, write)


def write_text(path, text):
    trainer.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


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
        raise trainer.UserError(f"{npz_path} not found: prepare the data first (python prepare.py ...)")
    with np.load(npz_path, allow_pickle=False) as z:
        if key not in z.files or offsets_key not in z.files:
            raise trainer.UserError(f"{npz_path}: no arrays {key!r}/{offsets_key!r} (it has {', '.join(z.files)})")
        flat, offsets = z[key], z[offsets_key]
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(flat) \
            or np.any(np.diff(offsets) < 0):
        raise trainer.UserError(f"{npz_path}: {offsets_key!r} does not index {key!r}; prepare the data again")
    return [flat[offsets[k]:offsets[k + 1]] for k in range(len(offsets) - 1)]


def load_pairs(dataset_dir, split="train"):
    """pref_<split>.npz as a list of (prompt ids, chosen ids, rejected ids, margin): the prompt rendered up to the
    assistant header, each reply encoded with its end-of-turn token, margin 0.0 unless the data set gave one."""
    folder = dataset_dir if os.path.isdir(dataset_dir) else trainer.dataset_dir(dataset_dir)
    path = os.path.join(folder, f"pref_{split}.npz")
    parts = [load_ragged(path, f"{part}_ids") for part in ("prompt", "chosen", "rejected")]
    if not len(parts[0]) == len(parts[1]) == len(parts[2]):
        raise trainer.UserError(f"{path}: prompt, chosen and rejected counts differ; prepare the data again")
    with np.load(path, allow_pickle=False) as z:
        margins = z["margin"] if "margin" in z.files else np.zeros(len(parts[0]), dtype=np.float32)
    if len(margins) != len(parts[0]):
        raise trainer.UserError(f"{path}: {len(margins)} margins for {len(parts[0])} pairs; prepare the data again")
    return [(p, c, r, float(m)) for p, c, r, m in zip(*parts, margins)]


def load_prompts(dataset_dir, split="val"):
    """prompts_<split>.jsonl with the rendered prompt of each: a list of {"messages", "answer", "task", "lang",
    "ids" (list[int], render_prompt(messages))}. dataset_dir is a folder (or a --dataset name)."""
    folder = dataset_dir if os.path.isdir(dataset_dir) else trainer.dataset_dir(dataset_dir)
    path = os.path.join(folder, f"prompts_{split}.jsonl")
    if not os.path.exists(path):
        raise trainer.UserError(f"{path} not found: prepare prompts first (python prepare.py, or --kind=prompts)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ids = load_ragged(os.path.join(folder, f"prompts_{split}.npz"), "ids")
    if len(ids) != len(rows):
        raise trainer.UserError(f"{path}: {len(rows)} prompts but {len(ids)} in the .npz; prepare the data again")
    return [{**row, "ids": seq.tolist()} for row, seq in zip(rows, ids)]


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
        trainer.write_atomic(os.path.join(out, f"{name}.bin"), write)
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
            ckpt = trainer.load_checkpoint(path)
            try:
                return Tokenizer.from_json(ckpt["tokenizer"])
            except ValueError as e:
                raise trainer.UserError(f"--tokenizer={cfg['tokenizer']}: cannot load its tokenizer: {e}") from None
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(path):
            raise trainer.UserError(f"--tokenizer={cfg['tokenizer']}: no such file")
        try:
            return Tokenizer.load(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise trainer.UserError(f"--tokenizer={cfg['tokenizer']}: cannot load it: {e}") from None
    print(f"training a {cfg['vocab_size']}-token BPE tokenizer on up to {cfg['tokenizer_sample_mb']:g} MB of text")
    try:
        return Tokenizer.train(sample_texts(texts, cfg["tokenizer_sample_mb"]), vocab_size=cfg["vocab_size"])
    except ValueError as e:
        raise trainer.UserError(f"--vocab_size={cfg['vocab_size']}: {e}") from None


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
        raise trainer.UserError(f"{out} already holds {', '.join(others)} made with another tokenizer: pass "
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

def prepare_world(cfg, out):
    print(f"generating the world (seed {cfg['seed']}, {cfg['world_mb']:g} MB of pretraining text)")
    w = world.generate_world(seed=cfg["seed"], corpus_mb=cfg["world_mb"])
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
SUFFIX_BUILDER = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _lines(path, limit=0):
    """(line number, decoded line) of a text file, read line by line; a UserError at the first line that is not
    UTF-8. Stops after `limit` non-blank lines (0 = all)."""
    seen = 0
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            if limit and seen >= limit:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise trainer.UserError(f"{path}, line {no}: not UTF-8 text (byte {raw[e.start]:#04x}); expected "
                                        f"UTF-8") from None
            seen += bool(line.strip())
            yield no, line


def _check_json_lines(path, limit):
    """Line number of each row of a JSON Lines file (blank lines skipped, as the datasets library does)."""
    lines = []
    for no, text in _lines(path, limit):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise trainer.UserError(f"{path}, line {no}: malformed JSON ({e.msg}, column {e.colno}); expected "
                                    f"one JSON object per line") from None
        if not isinstance(row, dict):
            raise trainer.UserError(f"{path}, line {no}: expected a JSON object {{...}}, got {type(row).__name__}")
        lines.append(no)
    return lines


def check_local_file(path, suffix, limit, kind_arg):
    """Read a local file once before the datasets library does: a bad line becomes `FILE, line N: ...`.
    Returns (load_dataset keyword arguments, where(i) -> 'FILE, line N' for row i)."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            n = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise trainer.UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        if n == 0:
            raise trainer.UserError(f"{path}: empty file: expected rows")
        return {}, lambda i: f"{path}, row {i + 1}"
    if suffix == ".txt":
        if sum(bool(line.strip()) for _, line in _lines(path)) == 0:  # reads every line: checks the UTF-8 too
            raise trainer.UserError(f"{path}: empty file: expected text")
        if kind_arg == "prompts":  # one prompt a line (the library yields blank lines too, as empty rows)
            return {}, lambda i: f"{path}, line {i + 1}"
        return {"sample_by": "paragraph"}, lambda i: f"{path}, paragraph {i + 1}"
    if suffix == ".jsonl":
        lines = _check_json_lines(path, limit)
        if not lines:
            raise trainer.UserError(f"{path}: empty file: expected one JSON object per line")
        return {}, lambda i: f"{path}, line {lines[i] if i < len(lines) else '?'}"
    # .json: a list of objects, an object holding one such list, or JSON Lines under a .json name
    text = "".join(line for _, line in _lines(path))
    if not text.strip():
        raise trainer.UserError(f"{path}: empty file: expected a JSON list of objects")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        try:
            is_lines = isinstance(json.loads(first), dict) and "\n" in text.strip()
        except json.JSONDecodeError:
            is_lines = False
        if is_lines:
            lines = _check_json_lines(path, limit)
            return {}, lambda i: f"{path}, line {lines[i] if i < len(lines) else '?'}"
        raise trainer.UserError(f"{path}, line {e.lineno}: malformed JSON ({e.msg}, column {e.colno}); expected "
                                f"a JSON list of objects") from None
    kwargs = {}
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) != 1:
            raise trainer.UserError(f"{path}: expected a JSON list of objects (or an object holding exactly one "
                                    f"such list), got an object with keys {sorted(doc)[:8]}")
        kwargs["field"] = lists[0]
        doc = doc[lists[0]]
    if not isinstance(doc, list) or not doc:
        raise trainer.UserError(f"{path}: expected a non-empty JSON list of objects")
    for i, row in enumerate(doc):
        if not isinstance(row, dict):
            raise trainer.UserError(f"{path}, item {i + 1}: expected a JSON object {{...}}, got {type(row).__name__}")
    return kwargs, lambda i: f"{path}, item {i + 1}"


def open_rows(source, split, subset, limit, kind_arg=""):
    """(iterable of row dicts, where(i) -> a place to name in an error) for a local file or a hub data set,
    both through datasets.load_dataset(..., streaming=True)."""
    import datasets  # slow to import; only real data needs it
    if os.path.exists(source):
        if os.path.isdir(source):
            raise trainer.UserError(f"--source={source} is a folder: pass one .txt, .jsonl, .json or .parquet file")
        suffix = os.path.splitext(source)[1].lower()
        if suffix not in SUFFIX_BUILDER:
            raise trainer.UserError(f"--source={source}: unsupported file type {suffix or '(none)'}; expected "
                                    f".txt, .jsonl, .json or .parquet")
        kwargs, where = check_local_file(source, suffix, limit, kind_arg)
        if suffix == ".txt" and kind_arg not in ("", "pretrain", "prompts"):
            raise trainer.UserError(f"--source={source}: a .txt file is pretraining text or prompts, not {kind_arg}")
        try:
            rows = datasets.load_dataset(SUFFIX_BUILDER[suffix], data_files=source, split="train", streaming=True,
                                         **kwargs)
        except Exception as e:
            raise trainer.UserError(f"{source}: cannot read it ({_first_line(e)})") from None
        return rows, where
    looks_local = (source.startswith((".", "/", "~")) or source.count("/") > 1
                   or os.path.splitext(source)[1].lower() in (*SUFFIX_BUILDER, ".csv", ".tsv", ".gz", ".zst", ".arrow"))
    if looks_local:  # a hub name is NAME or OWNER/NAME
        raise trainer.UserError(f"--source={source}: no such file")
    # the hub client logs each retry as a warning; the one error line below says what finally went wrong
    import huggingface_hub
    huggingface_hub.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    try:
        rows = datasets.load_dataset(source, subset or None, split=split, streaming=True)
    except Exception as e:  # not found, no network, a wrong split or config: the library's message says which
        raise trainer.UserError(f"--source={source}: cannot load it from the Hugging Face hub ({_first_line(e)})") \
            from None
    return rows, lambda i: f"{source} ({split}), row {i + 1}"


def _first_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------------------- schemas -> records
ROLE_NAMES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "chatgpt": "assistant", "model": "assistant"}
SCHEMAS = {
    "pretrain": "'text'",
    "sft": "'messages', 'conversations', 'instruction'+'output', 'prompt'+'response' or 'prompt'+'output'",
    "pref": "'prompt'+'chosen'+'rejected' ('selected' for chosen), or 'chosen'+'rejected' dialogues",
    "prompts": "'prompt', 'question', 'instruction' or 'messages'",
}
DIALOGUE_TURN = re.compile(r"\n\n(Human|Assistant):")


def _has(row, *fields):
    return all(row.get(f) is not None for f in fields)


def _fields(row):
    return sorted(k for k, v in row.items() if v is not None)


def guess_kind(row, where):
    if _has(row, "rejected") and (_has(row, "chosen") or _has(row, "selected")):
        return "pref"
    if _has(row, "messages") and isinstance(row["messages"], list) and row["messages"] \
            and isinstance(row["messages"][-1], dict) and row["messages"][-1].get("role") == "user":
        return "prompts"
    if _has(row, "messages") or _has(row, "conversations") or _has(row, "instruction", "output") \
            or _has(row, "prompt", "response") or _has(row, "prompt", "output"):
        return "sft"
    if _has(row, "text"):
        return "pretrain"
    if _has(row, "prompt") or _has(row, "question"):
        return "prompts"
    raise trainer.UserError(f"{where}: cannot tell the kind of data from the fields {_fields(row)}; expected one "
                            "of: " + "; ".join(f"{k}: {v}" for k, v in SCHEMAS.items()) + " (or pass --kind=)")


def _str_field(row, field, where):
    v = row[field]
    if not isinstance(v, str):
        raise trainer.UserError(f"{where}: field '{field}' must be a string, got {type(v).__name__}")
    return v


def parse_dialogue(text, where):
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> messages (Anthropic hh-rlhf form)."""
    parts = DIALOGUE_TURN.split("\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise trainer.UserError(f"{where}: expected a dialogue of '\\n\\nHuman: ...' / '\\n\\nAssistant: ...' turns")
    messages = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])]
    if len(messages) > 1 and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()  # a prompt that ends with "\n\nAssistant:", waiting for the reply
    return messages


def _checked(messages, where):
    try:
        check_messages(messages)
    except ValueError as e:
        raise trainer.UserError(f"{where}: {e}") from None
    return messages


def to_messages(row, where):
    """Any SFT schema -> [{'role', 'content'}, ...]."""
    system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"] \
        else []
    if _has(row, "messages") or _has(row, "conversations"):
        field = "messages" if _has(row, "messages") else "conversations"
        turns = row[field]
        if not isinstance(turns, list) or not turns:
            raise trainer.UserError(f"{where}: field '{field}' must be a non-empty list of turns")
        role_key, text_key = ("role", "content") if field == "messages" else ("from", "value")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get(role_key) is None or t.get(text_key) is None:
                raise trainer.UserError(f"{where}: {field}[{i}] must have '{role_key}' and '{text_key}'")
            role = ROLE_NAMES.get(str(t[role_key]).lower())
            if role is None:
                raise trainer.UserError(f"{where}: {field}[{i}]: unknown {role_key} {t[role_key]!r}; expected one "
                                        f"of {', '.join(ROLE_NAMES)}")
            messages.append({"role": role, "content": t[text_key]})
        return _checked(system + messages, where)
    if _has(row, "instruction"):
        user = _str_field(row, "instruction", where)
        if isinstance(row.get("input"), str) and row["input"].strip():
            user = f"{user}\n\n{row['input']}"
        messages = system + [{"role": "user", "content": user}]
        if _has(row, "output"):
            messages.append({"role": "assistant", "content": _str_field(row, "output", where)})
        return _checked(messages, where)
    for field in ("prompt", "question"):
        if _has(row, field):
            prompt = _str_field(row, field, where)
            messages = parse_dialogue(prompt, where) if prompt.lstrip("\n").startswith("Human:") \
                and DIALOGUE_TURN.search("\n\n" + prompt.lstrip("\n")) else [{"role": "user", "content": prompt}]
            messages = system + messages
            for reply in ("response", "output", "completion"):
                if _has(row, reply):
                    messages.append({"role": "assistant", "content": _str_field(row, reply, where)})
                    break
            return _checked(messages, where)
    return None


def to_sft(row, where):
    messages = to_messages(row, where)
    if messages is None or not any(m["role"] == "assistant" for m in messages):
        raise trainer.UserError(f"{where}: expected SFT fields {SCHEMAS['sft']} with an assistant reply; the row "
                                f"has {_fields(row)}")
    return {"messages": messages}


def _reply_text(v, field, where):
    """A preference reply: a string, or a conversation whose last turn is the reply."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and isinstance(v[-1], dict) and isinstance(v[-1].get("content"), str):
        return v[-1]["content"]
    raise trainer.UserError(f"{where}: field '{field}' must be a string (or a list of messages)")


def to_pref(row, where):
    chosen_field = "chosen" if _has(row, "chosen") else "selected"
    if not _has(row, chosen_field, "rejected"):
        raise trainer.UserError(f"{where}: expected preference fields {SCHEMAS['pref']}; the row has {_fields(row)}")
    chosen_v, rejected_v = row[chosen_field], row["rejected"]
    if _has(row, "prompt"):
        p = row["prompt"]
        if isinstance(p, list):
            messages = to_messages({"messages": p}, where)
        else:
            messages = to_messages({"prompt": _str_field(row, "prompt", where)}, where)
        chosen = _reply_text(chosen_v, chosen_field, where).strip()
        rejected = _reply_text(rejected_v, "rejected", where).strip()
    elif isinstance(chosen_v, list) and isinstance(rejected_v, list):  # two whole conversations
        messages = to_messages({"messages": chosen_v[:-1]}, where)
        chosen, rejected = _reply_text(chosen_v, chosen_field, where), _reply_text(rejected_v, "rejected", where)
    else:  # hh-rlhf: two dialogues that share everything up to the last "\n\nAssistant:"
        a, b = _str_field(row, chosen_field, where), _str_field(row, "rejected", where)
        marker = "\n\nAssistant:"
        common = len(os.path.commonprefix([a, b]))
        cut = a[:common].rfind(marker)
        if cut < 0:
            raise trainer.UserError(f"{where}: '{chosen_field}' and 'rejected' share no dialogue ending in "
                                    f"'\\n\\nAssistant:'; expected hh-rlhf style dialogues or a 'prompt' field")
        messages = parse_dialogue(a[:cut], where)
        # a reply ends where the next human turn begins (when the dialogues differ before their last turn)
        chosen = a[cut + len(marker):].split("\n\nHuman:")[0].strip()
        rejected = b[cut + len(marker):].split("\n\nHuman:")[0].strip()
    if not messages or messages[-1]["role"] != "user":
        raise trainer.UserError(f"{where}: the prompt must end with a user turn")
    pair = {"messages": messages, "chosen": chosen, "rejected": rejected}
    if row.get("margin") is not None:
        try:
            pair["margin"] = float(row["margin"])
        except (TypeError, ValueError):
            raise trainer.UserError(f"{where}: field 'margin' must be a number, got {row['margin']!r}") from None
    return pair


def _lang(text):
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


def to_prompt(row, where):
    messages = to_messages(row, where)
    if messages is None and _has(row, "rejected"):  # a preference pair's prompt (hh-rlhf dialogues)
        messages = to_pref(row, where)["messages"]
    if messages is None:
        raise trainer.UserError(f"{where}: expected prompt fields {SCHEMAS['prompts']}; the row has {_fields(row)}")
    while messages and messages[-1]["role"] == "assistant":  # an SFT row: its prompt is what precedes the reply
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise trainer.UserError(f"{where}: no user turn to use as a prompt")
    answer = row.get("answer")
    return {"messages": messages, "answer": None if answer is None else str(answer),
            "task": str(row.get("task") or "open"), "lang": str(row.get("lang") or _lang(messages[-1]["content"]))}


def to_pretrain(row, where):
    if not _has(row, "text"):
        raise trainer.UserError(f"{where}: expected the pretraining field {SCHEMAS['pretrain']}; the row has "
                                f"{_fields(row)}")
    return _str_field(row, "text", where)


CONVERT = {"pretrain": to_pretrain, "sft": to_sft, "pref": to_pref, "prompts": to_prompt}


def read_records(cfg):
    """Rows of the source converted to records of one kind: (kind, records, skipped)."""
    limit = cfg["max_rows"]
    kind_ = cfg["kind"]
    if kind_ and kind_ not in KINDS:
        raise trainer.UserError(f"--kind={kind_}: expected one of {', '.join(KINDS)}")
    rows, where = open_rows(cfg["source"], cfg["split"], cfg["subset"], limit, kind_)
    is_txt = cfg["source"].lower().endswith(".txt") and os.path.isfile(cfg["source"])
    records, skipped, i = [], 0, -1
    bar = _bar(limit or None, f"reading {cfg['source']}")
    try:
        for i, row in enumerate(rows):
            if limit and i >= limit:
                break
            if is_txt and kind_ == "prompts":
                if not (row.get("text") or "").strip():
                    continue
                row = {"prompt": row["text"].strip()}
            if not kind_:
                kind_ = guess_kind(row, where(i))
                print(f"kind: {kind_} (from the fields of the first row; --kind= to override)")
            rec = CONVERT[kind_](row, where(i))
            if kind_ == "pretrain":  # a text file's "<|endoftext|>" lines separate documents
                docs = [d.strip() for d in rec.split(EOT_TEXT)]
                records += [d for d in docs if d]
                skipped += not any(docs)
            elif kind_ == "pref" and rec["chosen"] == rec["rejected"]:
                skipped += 1  # no preference to learn
            else:
                records.append(rec)
            bar.update(1)
    except trainer.UserError:
        raise
    except Exception as e:  # the datasets library failing mid-stream: a network error, a bad parquet page...
        raise trainer.UserError(f"{where(i + 1)}: cannot read it ({_first_line(e)})") from None
    finally:
        bar.close()
    if not records:
        raise trainer.UserError(f"--source={cfg['source']}: no usable rows (expected {SCHEMAS[kind_ or 'pretrain']})")
    return kind_, records, skipped


def split_val(n, fraction, seed):
    """Indices of the val rows: a seeded random `fraction` of n, at least 1; sorted."""
    n_val = min(n - 1, max(1, round(n * fraction)))
    return sorted(np.random.default_rng(seed).permutation(n)[:n_val].tolist())


def prepare_real(cfg, out):
    if not 0 < cfg["val_fraction"] < 1:
        raise trainer.UserError(f"--val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    kind_, records, skipped = read_records(cfg)
    if kind_ == "pretrain":
        texts = records
    elif kind_ == "prompts":
        texts = (m["content"] for r in records for m in r["messages"])
    else:
        texts = chat_texts(records)
    tok = get_tokenizer(cfg, texts)
    meta = check_output_dir(out, tok, (kind_,))
    if len(records) < 2 and kind_ != "pretrain":
        raise trainer.UserError(f"--source={cfg['source']}: only {len(records)} usable row; need 2 or more to hold "
                                f"out a val split")
    val_idx = set(split_val(len(records), cfg["val_fraction"], cfg["seed"])) if len(records) > 1 else set()
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    counts = {}
    if kind_ == "pretrain":
        if not val:  # one document: hold out its tail
            ids = tok.encode(train[0])
            cut = max(1, int(len(ids) * (1 - cfg["val_fraction"])))
            train, val = [tok.decode(ids[:cut])], [tok.decode(ids[cut:])]
        counts.update(write_pretrain(out, tok, train, val))
    else:
        writer = {"sft": write_sft, "pref": write_pref, "prompts": write_prompts}[kind_]
        counts[f"{kind_}_train"] = writer(out, tok, f"{kind_}_train", train)
        counts[f"{kind_}_val"] = writer(out, tok, f"{kind_}_val", val)
    kinds = sorted(set(meta.get("kinds", [])) | {kind_}, key=KINDS.index)
    meta.update({"source": cfg["source"], "kinds": kinds, **counts, f"{kind_}_source": cfg["source"],
                 f"{kind_}_skipped_rows": skipped})
    if skipped:
        print(f"skipped {skipped} rows (empty text, or chosen == rejected)")
    return finish(out, tok, meta)


# ------------------------------------------------------------------------------------------------------------ main

def main(argv=None):
    # a copy of the settings, so that calling main() twice (the tests do) starts from the defaults each time
    cfg = trainer.configure(dict(globals()), argv)
    out = trainer.dataset_dir(cfg["dataset"])
    meta = prepare_world(cfg, out) if not cfg["source"] else prepare_real(cfg, out)
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))
             if not name.endswith(".tmp")}
    print(f"wrote {out}/: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    print(json.dumps({k: v for k, v in meta.items() if not isinstance(v, (dict, list))}, ensure_ascii=False))
    return meta


if __name__ == "__main__":
    trainer.cli(main)
