"""
Real models in and out: GGUF files and Hugging Face directories become our checkpoints, and ours become either.

    python convert.py --src=MODEL.gguf --dst=checkpoints/smollm2/ckpt.pt     # GGUF -> ours
    python convert.py --src=HF_MODEL_DIR --dst=checkpoints/qwen/ckpt.pt      # Hugging Face directory -> ours
    python convert.py --src=checkpoints/sft/ckpt.pt --dst=export/hf          # ours -> Hugging Face directory
    python convert.py --src=checkpoints/sft/ckpt.pt --dst=model.gguf --dtype=q8_0   # ours -> GGUF (llama.cpp, Ollama)

The formats follow from the paths: a `.gguf` file, a directory (Hugging Face: config.json, *.safetensors,
tokenizer.json), our `.pt`. Architectures: Llama without RoPE scaling (SmolLM, TinyLlama; Llama 3.x scales its RoPE
and is refused) and Qwen2 (q/k/v biases); whatever our model cannot compute the same way is refused with a one-line
error naming the field.

An imported model keeps its own tokenizer (as a `tokenizers` JSON) and must speak ChatML, our one chat template:
its template is rendered on probe conversations and compared with ours, and a default system message it adds is
kept in the tokenizer so that every stage renders exactly what the model was trained on. A model with a chat
template becomes a checkpoint of stage `sft`, one without of stage `pretrain`; both load in every stage.

GGUF reading and writing, and the block-quantization formats (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), are those of
the `gguf` library, llama.cpp's own. llama.cpp stores a Llama's q and k projections with the rows of each head
reordered (its RoPE pairs neighbouring dimensions, ours and transformers' pair i with i + head_dim/2): the import
undoes that and the export redoes it.
"""
import glob
import json
import os

import numpy as np
import torch

import common
import engine
import trainer
from model import GPT, ModelConfig, from_hf_llama_config, from_hf_llama_state_dict, to_hf_llama_config, \
    to_hf_llama_state_dict
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------------
# config (python convert.py --key=value)
src = ""        # a .gguf file, a Hugging Face model directory, or one of our .pt checkpoints
dst = ""        # our .pt (import), or a directory / a .gguf file (export)
dtype = "f32"   # GGUF export: f32 | f16 | q8_0 (norms and biases stay f32)
# ----------------------------------------------------------------------------------------------------------------

UserError = common.UserError
GGUF_DEQUANTIZED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's names for the split regex of a byte-level BPE vocabulary (tokenizer.ggml.pre), as `tokenizers`
# pre-tokenizers. SmolLM2 ("smollm") splits every digit, then applies GPT-2's regex: our own tokenizer's rule.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_TOKEN_NORMAL, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 3, 4


def chatml_template(default_system=None):
    """The Jinja chat template (transformers, llama.cpp, Ollama) that renders what Tokenizer.render_chat and
    render_prompt do, the default system message included."""
    first = ""
    if default_system is not None:
        first = ("{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\\n' + "
                 + json.dumps(default_system) + " + '<|im_end|>\\n' }}{% endif %}")
    return ("{% for message in messages %}" + first +
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def render_template(template, messages, add_generation_prompt, special):
    """A chat template (Jinja) rendered as transformers' apply_chat_template renders it (sandboxed, blocks trimmed)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)


PROBES = ([{"role": "user", "content": "Hi there."}],
          [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
           {"role": "assistant", "content": "4"}, {"role": "user", "content": "And\n3+3?"}],
          [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])


def chatml_default_system(template, special, where):
    """The default system message of a ChatML chat template (None when it adds none). UserError when the template
    renders any probe conversation otherwise than ChatML: another family's model would be fed the wrong format."""
    def chatml(messages, gen):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if gen else "")
    try:
        first = render_template(template, PROBES[0], False, special)
    except Exception as e:  # a template error of any kind: the file's template is not one we can check
        raise UserError(f"{where}: its chat template cannot be rendered ({type(e).__name__}: {e})") from None
    default = None
    rest = chatml(PROBES[0], False)
    if first.startswith("<|im_start|>system\n") and first.endswith("<|im_end|>\n" + rest):
        default = first[len("<|im_start|>system\n"):-len("<|im_end|>\n" + rest)]
    for messages in PROBES:
        with_system = messages if messages[0]["role"] == "system" or default is None else \
            [{"role": "system", "content": default}] + messages
        for gen in (False, True):
            got = render_template(template, messages, gen, special)
            if got != chatml(with_system, gen):
                raise UserError(f"{where}: the chat template is not ChatML (<|im_start|>role\\n...<|im_end|>\\n); "
                                f"it renders {got[:80]!r}; models of other template families are not supported yet")
    return default


def make_tokenizer(tk, template, eot_token, pad_token, where):
    """Our Tokenizer around an imported `tokenizers` vocabulary, with the facts of the model's template. Returns
    (Tokenizer, stage): `sft` for a chat model (it has a template), `pretrain` for a base model."""
    for t in ("<|im_start|>", "<|im_end|>"):
        if tk.token_to_id(t) is None:
            raise UserError(f"{where}: the vocabulary has no {t} token; only ChatML models can be imported")
    default = None
    if template:
        special = {"bos_token": "", "eos_token": "<|im_end|>"}
        default = chatml_default_system(template, special, where)
    chat = {"eot_token": eot_token, "pad_token": pad_token}
    if default is not None:
        chat["default_system"] = default
    try:
        tok = Tokenizer(tk, chat)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    return tok, ("sft" if template else "pretrain")


# ----------------------------------------------------------------------------------------------------------------
# GGUF -> ours

def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's reordering of a Llama q or k projection, (n_heads * head_dim, in) -> the same shape, rows
    of each head back from interleaved pairs (0, 1), (2, 3), ... to halves (i, i + head_dim/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w, n_heads):
    """What llama.cpp's converter does to q and k (the inverse of unpermute_rope_rows)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_field(reader, key, where, default=KeyError):
    if key not in reader.fields:
        if default is KeyError:
            raise UserError(f"{where}: missing metadata key {key!r}")
        return default
    return reader.fields[key].contents()


def gguf_tokenizer(reader, where):
    """The byte-level BPE vocabulary of a GGUF file as a `tokenizers` Tokenizer (tokens, merges, the split regex
    named by tokenizer.ggml.pre, control tokens special, user-defined tokens added)."""
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    kind = gguf_field(reader, "tokenizer.ggml.model", where)
    if kind != "gpt2":
        raise UserError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2', byte-level BPE)")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens", where)
    types = gguf_field(reader, "tokenizer.ggml.token_type", where, [GGUF_TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges", where)]
    tk = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    pre = gguf_field(reader, "tokenizer.ggml.pre", where, "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        tk.pre_tokenizer = byte_level
    elif pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "qwen2"):
        split = QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise UserError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported "
                        f"(known: gpt2, smollm, llama-bpe, qwen2)")
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == GGUF_TOKEN_CONTROL])
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == GGUF_TOKEN_USER_DEFINED]
    if user:
        tk.add_tokens(user)
    return tk, tokens


def import_gguf(path):
    """A GGUF file -> (checkpoint dict of our contract, one-line summary)."""
    import gguf
    where = path
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on a file that is not GGUF
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})") from None
    arch = gguf_field(reader, "general.architecture", where)
    if arch not in ("llama", "qwen2"):
        raise UserError(f"{where}: general.architecture={arch!r} is not supported (only llama and qwen2)")

    def meta(key, default=KeyError):
        return gguf_field(reader, f"{arch}.{key}", where, default)
    scaling, factor = meta("rope.scaling.type", "none"), float(meta("rope.scaling.factor", 1.0))
    if scaling not in ("none", "linear") or (scaling == "linear" and factor != 1.0):
        raise UserError(f"{where}: {arch}.rope.scaling.type={scaling!r} (factor {factor:g}): scaled RoPE is not "
                        f"implemented")
    n_embd, n_head = int(meta("embedding_length")), int(meta("attention.head_count"))
    n_kv_head = int(meta("attention.head_count_kv", n_head))
    if int(meta("rope.dimension_count", n_embd // n_head)) != n_embd // n_head:
        raise UserError(f"{where}: {arch}.rope.dimension_count={meta('rope.dimension_count')}: RoPE on part of a "
                        f"head is not implemented")
    if meta("attention.key_length", n_embd // n_head) != n_embd // n_head:
        raise UserError(f"{where}: {arch}.attention.key_length={meta('attention.key_length')}: head_dim must be "
                        f"embedding_length / head_count")

    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in GGUF_DEQUANTIZED:
            raise UserError(f"{where}: tensor {t.name} is {kind}; supported: {', '.join(GGUF_DEQUANTIZED)}")
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32, shape in row-major (out, in) order
        tensors[t.name] = torch.from_numpy(np.array(w, dtype=np.float32).reshape(
            tuple(int(d) for d in reversed(t.shape))))
    n_layer = int(meta("block_count"))
    vocab_size = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else None
    if vocab_size is None:
        raise UserError(f"{where}: missing tensor 'token_embd.weight'")
    cfg = ModelConfig(vocab_size=vocab_size, block_size=int(meta("context_length")), n_layer=n_layer,
                      n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                      intermediate_size=int(meta("feed_forward_length")),
                      rope_theta=float(meta("rope.freq_base", 10000.0)),
                      norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
                      tie_embeddings="output.weight" not in tensors, attn_bias="blk.0.attn_q.bias" in tensors)

    def get(name):
        if name not in tensors:
            raise UserError(f"{where}: missing tensor {name!r}")
        return tensors[name]
    # llama.cpp permutes the q/k rows of "llama" models only; qwen2 files keep transformers' order
    fix_q = (lambda w: unpermute_rope_rows(w, n_head)) if arch == "llama" else (lambda w: w)
    fix_k = (lambda w: unpermute_rope_rows(w, n_kv_head)) if arch == "llama" else (lambda w: w)
    sd = {"embed_tokens.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight"),
          "lm_head.weight": tensors.get("output.weight", get("token_embd.weight"))}
    for i in range(n_layer):
        b, ours = f"blk.{i}.", f"layers.{i}."
        sd[ours + "attn_norm.weight"] = get(b + "attn_norm.weight")
        sd[ours + "attn.qkv_proj.weight"] = torch.cat([fix_q(get(b + "attn_q.weight")), fix_k(get(b + "attn_k.weight")),
                                                       get(b + "attn_v.weight")])
        if cfg.attn_bias:
            sd[ours + "attn.qkv_proj.bias"] = torch.cat([fix_q(get(b + "attn_q.bias")), fix_k(get(b + "attn_k.bias")),
                                                         get(b + "attn_v.bias")])
        sd[ours + "attn.o_proj.weight"] = get(b + "attn_output.weight")
        sd[ours + "mlp_norm.weight"] = get(b + "ffn_norm.weight")
        sd[ours + "mlp.gate_up_proj.weight"] = torch.cat([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
        sd[ours + "mlp.down_proj.weight"] = get(b + "ffn_down.weight")

    tk, tokens = gguf_tokenizer(reader, where)
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id", where, None)
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id", where, None)
    eot_token = "<|endoftext|>" if tk.token_to_id("<|endoftext|>") is not None else tokens[int(eos)]
    pad_token = tokens[int(pad)] if pad is not None else eot_token
    tok, stage = make_tokenizer(tk, gguf_field(reader, "tokenizer.chat_template", where, None), eot_token,
                                pad_token, where)
    name = gguf_field(reader, "general.name", where, os.path.basename(path))
    return checkpoint(cfg, sd, tok, stage, path, "gguf"), f"{name} ({arch}, GGUF)"


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face directory -> ours

def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (a Hugging Face model directory needs it)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def import_hf_dir(path):
    """A Hugging Face model directory (config.json, *.safetensors, tokenizer.json, tokenizer_config.json) ->
    (checkpoint dict, summary)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer as HFTokenizer
    config = read_json(os.path.join(path, "config.json"))
    try:
        cfg = from_hf_llama_config(config)
    except UserError as e:
        raise UserError(f"{os.path.join(path, 'config.json')}: {e}") from None
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights (pytorch_model.bin is a pickle and is not read)")
    hf_sd = {}
    for f in files:
        hf_sd.update({k: v.float() for k, v in load_file(f).items()})
    sd = from_hf_llama_state_dict(hf_sd)
    if cfg.attn_bias != ("layers.0.attn.qkv_proj.bias" in sd):
        raise UserError(f"{path}: model_type={config.get('model_type')!r} but the weights "
                        f"{'lack' if cfg.attn_bias else 'have'} q/k/v biases")
    tk_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tk_path):
        raise UserError(f"{tk_path}: no such file (a Hugging Face model directory needs it)")
    tk = HFTokenizer.from_file(tk_path)
    tk_config = read_json(os.path.join(path, "tokenizer_config.json")) \
        if os.path.exists(os.path.join(path, "tokenizer_config.json")) else {}
    template = tk_config.get("chat_template")
    if os.path.exists(os.path.join(path, "chat_template.jinja")):  # newer transformers save it apart
        with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def token(key):
        t = tk_config.get(key)
        return t.get("content") if isinstance(t, dict) else t
    eot_token = "<|endoftext|>" if tk.token_to_id("<|endoftext|>") is not None else token("eos_token")
    pad_token = token("pad_token") or eot_token
    if eot_token is None:
        raise UserError(f"{path}: tokenizer_config.json names no eos_token and the vocabulary has no <|endoftext|>")
    tok, stage = make_tokenizer(tk, template, eot_token, pad_token, path)
    arch = (config.get("architectures") or [config.get("model_type", "llama")])[0]
    return checkpoint(cfg, sd, tok, stage, path, "hf"), f"{os.path.basename(os.path.normpath(path))} ({arch})"


def checkpoint(cfg, sd, tok, stage, path, fmt):
    """A checkpoint of our contract; the weights are checked against the config by loading them into a GPT."""
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    model = GPT(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit the config: {str(e).splitlines()[0][:300]}") from None
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_json(), "stage": stage,
            "train_config": {"converted_from": os.path.abspath(path), "format": fmt}, "metrics": {}}


# ----------------------------------------------------------------------------------------------------------------
# ours -> Hugging Face directory / GGUF

def load_ours(path):
    """(ModelConfig, full-precision state dict with LoRA merged and any quantized weight dequantized, Tokenizer,
    stage) of one of our policy checkpoints."""
    ckpt = common.load_checkpoint(path, stages=common.POLICY_STAGES)
    model, tok = engine.model_from_checkpoint(ckpt, "cpu")
    sd = {k: v.float() for k, v in trainer.model_entries(model, tok)["model"].items()}
    if model.config.n_experts:
        raise UserError(f"{path}: a Mixture-of-Experts model has no Llama/Qwen2 equivalent to export to")
    sd.setdefault("lm_head.weight", sd["embed_tokens.weight"])  # a tied model's state dict may list it once
    return model.config, sd, tok, ckpt["stage"]


def export_hf_dir(path, out):
    """Our checkpoint -> a Hugging Face directory that AutoModelForCausalLM and AutoTokenizer load."""
    from safetensors.torch import save_file
    cfg, sd, tok, stage = load_ours(path)
    os.makedirs(out, exist_ok=True)
    hf_config = to_hf_llama_config(cfg)
    stop = [tok.end_id, tok.eot_id] if stage != "pretrain" else [tok.eot_id]
    hf_config.update(bos_token_id=None, eos_token_id=stop[0], pad_token_id=tok.pad_id, torch_dtype="float32")
    hf_sd = to_hf_llama_state_dict(sd, cfg)
    if cfg.tie_embeddings:
        del hf_sd["lm_head.weight"]  # transformers ties it back to the embedding
    names = {"eos": tok.tk.id_to_token(stop[0]), "pad": tok.tk.id_to_token(tok.pad_id)}
    tk_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": names["eos"],
                 "pad_token": names["pad"], "unk_token": None, "add_bos_token": False, "add_eos_token": False,
                 "clean_up_tokenization_spaces": False, "model_max_length": cfg.block_size}
    if stage != "pretrain":  # a base model has no chat template (our import reads one as "this is a chat model")
        tk_config["chat_template"] = chatml_template(tok.default_system)
    generation = {"eos_token_id": stop if len(stop) > 1 else stop[0], "pad_token_id": tok.pad_id, "do_sample": False}

    def write_json(name, obj):
        common.write_atomic(os.path.join(out, name), lambda f: json.dump(obj, f, indent=2, ensure_ascii=False), "w")
    write_json("config.json", hf_config)
    write_json("tokenizer_config.json", tk_config)
    write_json("generation_config.json", generation)
    common.write_atomic(os.path.join(out, "tokenizer.json"), lambda f: f.write(tok.tk.to_str()), "w")
    tensors = {k: v.contiguous() for k, v in hf_sd.items()}
    tmp = os.path.join(out, f"model.safetensors.{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    return f"{path} -> {out}/ (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, " \
           f"generation_config.json)"


def pre_tokenizer_name(tk, where):
    """llama.cpp's tokenizer.ggml.pre for a `tokenizers` pre-tokenizer we can describe to it."""
    pre = json.loads(tk.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, split in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
            if regex == split:
                return name
    raise UserError(f"{where}: the tokenizer's pre-tokenizer {kinds} has no llama.cpp equivalent")


def export_gguf(path, out, out_dtype):
    """Our checkpoint -> a GGUF file (architecture llama, or qwen2 with q/k/v biases) with the tokenizer and the
    ChatML template in its metadata. out_dtype: f32 | f16 | q8_0 for the matrices; norms and biases stay f32."""
    import gguf
    if out_dtype not in ("f32", "f16", "q8_0"):
        raise UserError(f"--dtype={out_dtype!r}: expected f32, f16 or q8_0")
    cfg, sd, tok, stage = load_ours(path)
    arch = "qwen2" if cfg.attn_bias else "llama"
    tmp = f"{out}.{os.getpid()}.tmp"
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(os.path.splitext(os.path.basename(out))[0])
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_dtype])
    # tokenizer: the vocabulary padded to the embedding's rows (llama.cpp wants one token per row)
    tk_json = json.loads(tok.tk.to_str())
    if tk_json["model"]["type"] != "BPE":
        raise UserError(f"{path}: only byte-level BPE tokenizers can be written to GGUF")
    tokens = [tok.tk.id_to_token(i) for i in range(tok.vocab_size)]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    special = {i for i, t in tok.tk.get_added_tokens_decoder().items() if t.special}
    types = [GGUF_TOKEN_CONTROL if i in special else GGUF_TOKEN_USER_DEFINED if i >= tok.vocab_size or
             i in tok.tk.get_added_tokens_decoder() else GGUF_TOKEN_NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tk_json["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tok.tk, path))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    stop = tok.end_id if stage != "pretrain" else tok.eot_id
    w.add_bos_token_id(tok.eot_id)  # never added (add_bos_token false); llama.cpp wants one to exist
    w.add_eos_token_id(stop)
    w.add_eot_token_id(stop)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)
    if stage != "pretrain":
        w.add_chat_template(chatml_template(tok.default_system))

    def add(name, t, matrix=True):
        a = t.detach().float().numpy()
        if matrix and out_dtype == "q8_0" and a.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif matrix and out_dtype != "f32":  # f16, or q8_0 for a row length Q8_0's 32-blocks do not divide
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, a.astype(np.float32))
    fix_q = (lambda t: permute_rope_rows(t, cfg.n_head)) if arch == "llama" else (lambda t: t)
    fix_k = (lambda t: permute_rope_rows(t, cfg.n_kv_head)) if arch == "llama" else (lambda t: t)
    sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    add("token_embd.weight", sd["embed_tokens.weight"])
    add("output_norm.weight", sd["norm.weight"], matrix=False)
    if not cfg.tie_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(cfg.n_layer):
        b, ours = f"blk.{i}.", f"layers.{i}."
        add(b + "attn_norm.weight", sd[ours + "attn_norm.weight"], matrix=False)
        q, k, v = sd[ours + "attn.qkv_proj.weight"].split(sizes)
        add(b + "attn_q.weight", fix_q(q))
        add(b + "attn_k.weight", fix_k(k))
        add(b + "attn_v.weight", v)
        if cfg.attn_bias:
            qb, kb, vb = sd[ours + "attn.qkv_proj.bias"].split(sizes)
            add(b + "attn_q.bias", fix_q(qb), matrix=False)
            add(b + "attn_k.bias", fix_k(kb), matrix=False)
            add(b + "attn_v.bias", vb, matrix=False)
        add(b + "attn_output.weight", sd[ours + "attn.o_proj.weight"])
        add(b + "ffn_norm.weight", sd[ours + "mlp_norm.weight"], matrix=False)
        gate, up = sd[ours + "mlp.gate_up_proj.weight"].chunk(2)
        add(b + "ffn_gate.weight", gate)
        add(b + "ffn_up.weight", up)
        add(b + "ffn_down.weight", sd[ours + "mlp.down_proj.weight"])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return f"{path} -> {out} ({arch}, {out_dtype}, {os.path.getsize(out) / 1e6:.1f} MB)"


# ----------------------------------------------------------------------------------------------------------------

def convert(src_path, dst_path, out_dtype="f32"):
    """Dispatch on the paths' formats; returns a one-line summary. UserError for a pair it cannot convert."""
    if not src_path or not dst_path:
        raise UserError("--src and --dst are both needed, e.g. --src=MODEL.gguf --dst=checkpoints/smollm2/ckpt.pt")
    if not os.path.exists(src_path):
        raise UserError(f"--src={src_path}: no such file or directory")
    if src_path.endswith(".pt"):
        if dst_path.endswith(".gguf"):
            return export_gguf(src_path, dst_path, out_dtype)
        if dst_path.endswith(".pt"):
            raise UserError(f"--dst={dst_path}: {src_path} is already one of our checkpoints")
        return export_hf_dir(src_path, dst_path)
    if os.path.isdir(src_path):
        ckpt, what = import_hf_dir(src_path)
    elif src_path.endswith(".gguf"):
        ckpt, what = import_gguf(src_path)
    else:
        raise UserError(f"--src={src_path}: expected a .gguf file, a Hugging Face model directory or a .pt checkpoint")
    if os.path.isdir(dst_path) or not dst_path.endswith(".pt"):
        dst_path = os.path.join(dst_path, "ckpt.pt")
    common.save_checkpoint(dst_path, ckpt)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    n = sum(v.numel() for k, v in ckpt["model"].items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    return (f"{what} -> {dst_path}: stage {ckpt['stage']}, {n / 1e6:.1f}M parameters, {cfg.n_layer} layers, "
            f"vocabulary {cfg.vocab_size}, context {cfg.block_size}")


def main(argv=None):
    cfg = common.configure(globals(), argv)
    print(convert(cfg["src"], cfg["dst"], cfg["dtype"]))


if __name__ == "__main__":
    common.cli(main)
