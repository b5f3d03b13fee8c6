"""bench.py's memory accounting: the counted model state must be what AdamW training of each mode really holds."""
import torch

import bench
from model import GPT, ModelConfig


def test_model_state_count_matches_adamw_training():
    m = GPT(ModelConfig(**bench.QUANT_MODEL))
    n = m.num_params()  # the tied embedding counted once
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())  # the rotary tables
    steps = 4 * len(list(m.parameters()))  # AdamW's step counter per parameter tensor, a float32 scalar
    peak, state = bench.train_steps_peak("full", "cpu", quick=True)
    assert state == n * 4 * 4 + buffers + steps  # fp32 weight, gradient and AdamW's two moments
    assert peak > 0
    _, state_q = bench.train_steps_peak("qlora", "cpu", quick=True)
    assert state_q < state / 8  # NF4 base, fp32 embedding, small adapters


def test_quant_section_reports_nf4_bits(monkeypatch):
    monkeypatch.setattr(bench, "measure_peak", lambda mode, device, quick: (1.0 if mode == "qlora" else 2.0, 1.0))
    rows, f = bench.bench_quant(type("Args", (), {"device": torch.device("cpu"), "quick": True})())
    assert abs(f["nf4_bits_per_weight"] - 4.127) < 0.01
    assert f["qlora_vs_full_peak"] == 0.5


def test_smollm2_rows_compare_qlora_with_full_at_equal_settings():
    """Each ratio divides the figures it names: QLoRA / full with grad_checkpoint on in both, and each mode's
    grad_checkpoint / plain memory and time (a ratio mixing the two settings would flatter QLoRA)."""
    peaks = {("full", False): 4000, ("full", True): 2000, ("lora", False): 2800, ("lora", True): 900,
             ("qlora", False): 2400, ("qlora", True): 500}
    seconds = {False: 30.0, True: 39.0}

    def measure(mode, path, ckpt):
        mb = peaks[mode, ckpt] * 2 ** 20
        return seconds[ckpt], mb + 100 * 2 ** 20, mb
    rows, f = [], {}
    bench.smol_sft_rows("unused", rows, f, measure=measure)
    assert f["smol_qlora_vs_full_train_peak"] == 2400 / 4000
    assert f["smol_qlora_ckpt_vs_full_ckpt_train_peak"] == 500 / 2000
    assert f["smol_qlora_ckpt_vs_full_train_peak"] == 500 / 4000
    assert f["smol_lora_ckpt_vs_plain_train_peak"] == 900 / 2800
    assert f["smol_full_ckpt_vs_plain_step_s"] == 39.0 / 30.0
    assert f["smol_qlora_ckpt_vs_full_ckpt_peak"] == 600 / 2100
    assert len(rows) == 6 + 2 + 3


def test_rollout_workload_is_grpo_default():
    """bench.py times rollouts at ppo.py --algo=grpo's defaults (it does not import a stage script): batch size,
    group size, reply length and rollout steps read from ppo.py's config constants."""
    import ast
    import os
    import rl
    tree = ast.parse(open(os.path.join(os.path.dirname(bench.__file__), "ppo.py"), encoding="utf-8").read())
    consts = {}
    for node in tree.body:  # the module's literal assignments: its config constants and defaults tables
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    cfg = {k: v for k, v in consts.items() if not k.isupper()}
    cfg.update(algo="grpo")
    assert consts["batch_size"] == bench.ROLLOUT_BATCH
    assert consts["max_new_tokens"] == bench.ROLLOUT_TOKENS
    assert consts["DEFAULT_MAX_ITERS"]["grpo"] == bench.ROLLOUT_STEPS
    assert rl.check_settings(cfg, 0.0, 1.0)[0] == bench.ROLLOUT_GROUP
