"""model.py: cached decoding, padding, causality, Llama equivalence, MoE routing, sampling, loss masking."""
import pytest
import torch
import torch.nn.functional as F

import model
from model import GPT, ModelConfig, left_pad



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: a second thread only adds synchronisation cost on a shared CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    base = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, intermediate_size=48)
    base.update(kw)
    return ModelConfig(**base)


CONFIGS = {
    "mha": tiny(),
    "gqa": tiny(n_kv_head=2),
    "mqa_untied": tiny(n_kv_head=1, tie_embeddings=False),
    "moe": tiny(n_kv_head=2, n_experts=4, n_experts_per_tok=2, n_shared_experts=1),
}


def make(cfg, seed=0):
    torch.manual_seed(seed)
    m = GPT(cfg).eval()
    # the default init (std 0.02) gives near-zero logits that would hide small numerical errors: make them O(1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return m


# ---------------------------------------------------------------------------------------------------------------
# config

def test_config_round_trips_through_dict_and_rejects_unknown_keys():
    cfg = tiny(n_experts=4, rope_theta=500000.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception, match="n_layers"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
    with pytest.raises(Exception, match="n_kv_head"):
        tiny(n_kv_head=3)


def test_llama_hidden_size_rule():
    assert ModelConfig(n_embd=256).ffn_hidden == 704  # int(2*4*256/3) = 682 -> next multiple of 32
    assert ModelConfig(n_embd=256, intermediate_size=500).ffn_hidden == 500


# ---------------------------------------------------------------------------------------------------------------
# KV cache, padding, causality

@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_full_forward_at_every_position(name):
    # guards against wrong rotary positions after prefill, cache slots written at the wrong offset, and a missing
    # causal mask when a multi-token chunk is appended to a non-empty cache
    m = make(CONFIGS[name])
    idx = torch.randint(0, 97, (2, 20))
    full, _ = m(idx)
    cache = m.make_cache(2, 20)
    pieces = [m(idx[:, :6], cache=cache)[0], m(idx[:, 6:9], cache=cache)[0]]  # prefill, then a 3-token chunk
    pieces += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 20)]     # then one token per step
    cached = torch.cat(pieces, dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "moe"])
def test_left_padded_batch_matches_each_row_alone(name):
    # guards against padding leaking into attention and against positions counted from the padded start
    m = make(CONFIGS[name])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 6)]
    cont = torch.randint(0, 97, (3, 5), generator=g)  # teacher-forced continuation, fed one token per step
    idx, attention_mask = left_pad(prompts, pad_id=0)
    B, T = idx.shape
    cache = m.make_cache(B, T + 5)
    mask = torch.cat([attention_mask, torch.ones(B, 5, dtype=torch.long)], dim=1)
    logits = [m(idx, attention_mask=attention_mask, cache=cache)[0]]
    for t in range(5):
        logits.append(m(cont[:, t:t + 1], attention_mask=mask[:, :T + t + 1], cache=cache)[0])
    logits = torch.cat(logits, dim=1)
    for i, p in enumerate(prompts):
        alone, _ = m(torch.tensor([p + cont[i].tolist()]))
        torch.testing.assert_close(logits[i, T - len(p):], alone[0], atol=1e-5, rtol=1e-5)
    # and the same through generate(): batched greedy rows equal each prompt generated alone
    out = m.generate(idx, 6, temperature=0, attention_mask=attention_mask)
    for i, p in enumerate(prompts):
        alone = m.generate(torch.tensor([p]), 6, temperature=0)
        assert out[i, T:].tolist() == alone[0, len(p):].tolist()


def test_full_forward_with_padding_mask_matches_unpadded_rows():
    m = make(CONFIGS["gqa"])
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    idx, attention_mask = left_pad(prompts, pad_id=0)
    logits, _ = m(idx, attention_mask=attention_mask)
    assert torch.isfinite(logits).all()  # fully padded query rows must not produce NaN
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i, -len(p):], m(torch.tensor([p]))[0][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mha", "moe"])
def test_changing_a_later_token_never_changes_earlier_logits(name):
    m = make(CONFIGS[name])
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    a, b = m(idx)[0], m(changed)[0]
    # not bitwise: MoE groups tokens per expert, so another token changes a matmul's shape and its rounding
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().amax(dim=-1).min() > 1e-4


def test_left_pad():
    idx, mask = left_pad([[4, 5], [1, 2, 3]], pad_id=9)
    assert idx.tolist() == [[9, 4, 5], [1, 2, 3]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------------
# equivalence with transformers' LlamaForCausalLM

@pytest.mark.parametrize("n_kv_head,tie", [(4, True), (2, False), (2, True), (4, False)])
def test_logits_match_transformers_llama(n_kv_head, tie):
    transformers = pytest.importorskip("transformers")
    cfg = tiny(n_kv_head=n_kv_head, tie_embeddings=tie, rope_theta=1000.0, norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.to_hf_llama_config(cfg))).eval()
    with torch.no_grad():  # O(1) logits, and norm weights that are not all ones (so a skipped norm weight shows)
        for p in hf.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    ours = GPT(cfg).eval()
    ours.load_state_dict(model.from_hf_llama_state_dict(hf.state_dict()), strict=True)
    assert ours.config == model.from_hf_llama_config(hf.config)

    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits
    assert ref.std() > 0.5
    torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=0)

    # left padding with explicit positions, as in batched generation
    idx, attention_mask = left_pad([[3, 1, 4, 1, 5], list(range(10, 22))], pad_id=0)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(idx, attention_mask=attention_mask, position_ids=positions).logits
    got = ours(idx, attention_mask=attention_mask)[0]
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)

    # export path: our weights load strictly into transformers and give the same logits
    hf2 = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.to_hf_llama_config(cfg))).eval()
    hf2.load_state_dict(model.to_hf_llama_state_dict(ours.state_dict(), cfg), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hf2(idx).logits, hf(idx).logits, atol=0, rtol=0)


def test_logits_match_transformers_qwen2_with_qkv_bias():
    # Qwen2 is a Llama with biases on q, k and v; a dropped or misordered bias changes every logit
    transformers = pytest.importorskip("transformers")
    cfg = tiny(n_kv_head=2, tie_embeddings=False, rope_theta=1000.0, norm_eps=1e-6, attn_bias=True)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**model.to_hf_llama_config(cfg))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    ours = GPT(cfg).eval()
    ours.load_state_dict(model.from_hf_llama_state_dict(hf.state_dict()), strict=True)
    assert ours.config == model.from_hf_llama_config(hf.config)
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits
        torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=0)
        ours.layers[0].attn.qkv_proj.bias.zero_()
        assert (ours(idx)[0] - ref).abs().max() > 1e-2
    assert GPT(tiny()).layers[0].attn.qkv_proj.bias is None, "off by default: Llama has no q/k/v bias"


@pytest.mark.parametrize("change, field", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}), "rope_scaling"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5}),
     "rope_parameters"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(head_dim=32), "head_dim"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(model_type="gemma"), "model_type"),
])
def test_imported_config_that_cannot_be_honoured_is_refused_naming_the_field(change, field):
    # a GELU or llama3-scaled-RoPE config used to load silently as a SiLU / plain-RoPE model: wrong logits
    from common import UserError
    d = dict(model.to_hf_llama_config(tiny()), **change)
    with pytest.raises(UserError, match=rf"^{field}[=' ]|'{field}'|{field}="):
        model.from_hf_llama_config(d)
    # the same dict without the change loads; a transformers-4 config.json (rope_theta and a null rope_scaling
    # at the top level) too
    assert model.from_hf_llama_config(model.to_hf_llama_config(tiny())) == tiny()
    old = {k: v for k, v in model.to_hf_llama_config(tiny(rope_theta=5e5)).items() if k != "rope_parameters"}
    assert model.from_hf_llama_config(dict(old, rope_theta=5e5, rope_scaling=None)) == tiny(rope_theta=5e5)


# ---------------------------------------------------------------------------------------------------------------
# Mixture of Experts

def moe_layer(seed=0, **kw):
    cfg = tiny(n_experts=4, n_experts_per_tok=2, **kw)
    m = make(cfg, seed)
    return m, m.layers[0].mlp


def record_expert_inputs(moe):
    seen = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: seen.setdefault(e, []).append(inp[0].detach()))
    return seen


def test_moe_each_token_reaches_exactly_k_experts_with_renormalised_gates():
    m, moe = moe_layer(n_shared_experts=1)
    seen = record_expert_inputs(moe)
    x = torch.randn(3, 7, 32)  # rows are distinct, so each row an expert receives identifies its token
    with torch.no_grad():
        out, _ = moe(x)
    tokens = x.reshape(-1, 32)
    hits = torch.zeros(len(tokens), 4, dtype=torch.long)
    for e, inputs in seen.items():
        for row in torch.cat(inputs):
            match = (tokens == row).all(dim=1).nonzero().flatten()
            assert len(match) == 1
            hits[match[0], e] += 1
    assert (hits.sum(dim=1) == 2).all() and hits.max() == 1  # k distinct experts per token
    # and the output is the renormalised-gate mixture of the chosen experts, computed token by token
    with torch.no_grad():
        probs = F.softmax(moe.router(tokens), dim=-1)
        ref = torch.zeros_like(tokens)
        for n in range(len(tokens)):
            chosen = hits[n].nonzero().flatten()
            for e in chosen:
                ref[n] += probs[n, e] / probs[n, chosen].sum() * moe.experts[e](tokens[n])
            ref[n] += moe.shared(tokens[n])  # the shared expert sees every token, ungated
    torch.testing.assert_close(out.reshape(-1, 32), ref, atol=1e-5, rtol=1e-5)


def test_moe_balancing_loss_is_exactly_coef_for_uniform_routing_and_larger_when_skewed():
    m, moe = moe_layer(moe_aux_coef=0.01)
    m.train()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        for block in m.layers:
            block.mlp.router.weight.zero_()  # every expert equally likely for every token
        _, aux_loss = m(idx)
        torch.testing.assert_close(aux_loss, torch.tensor(0.01))
        # push every token towards expert 0: far from balanced, the raw loss approaches n_experts / k = 2
        moe.router.weight[0] = 5.0
        _, moe_aux = moe(torch.rand(32, 32) + 0.5)
        assert moe_aux > 1.9
        m.eval()
        _, aux_loss = m(idx)
        assert aux_loss == 0  # validation loss stays pure cross entropy (perplexity)


def test_moe_balancing_loss_survives_a_later_forward_of_the_same_modules():
    # DPO with LoRA runs its reference forward (adapters off, eval mode) through the very modules the policy
    # just used; a balancing loss kept on the model would be reset to 0 by it before the policy's loss read it
    m, _ = moe_layer(seed=5)
    m.train()
    idx = torch.randint(0, 97, (2, 16))
    _, aux_loss = m(idx)
    before = aux_loss.item()
    m.eval()
    with torch.no_grad():
        _, ref_aux = m(idx)
    assert ref_aux == 0 and before > 0 and aux_loss.item() == before
    assert aux_loss.requires_grad  # and it still trains the routers


def test_moe_training_loss_includes_aux_and_every_routed_expert_gets_a_gradient():
    m, moe = moe_layer(seed=3)
    m.train()
    seen = record_expert_inputs(moe)
    idx = torch.randint(0, 97, (2, 16))
    _, aux_loss = m(idx)
    logits = m(idx)[0]
    loss = m(idx, targets=idx)[1]
    ce = F.cross_entropy(logits.reshape(-1, 97), idx.reshape(-1))
    torch.testing.assert_close(loss, ce + aux_loss)
    assert aux_loss > 0
    loss.backward()
    routed = {e for e, inputs in seen.items() if sum(len(i) for i in inputs) > 0}
    assert len(routed) >= 2
    for e, expert in enumerate(moe.experts):
        for p in expert.parameters():
            if e in routed:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"expert {e} was routed to but got no gradient"
            else:
                assert p.grad is None or p.grad.abs().sum() == 0
    assert moe.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# generation

def test_greedy_is_deterministic_and_top_k_1_equals_greedy():
    m = make(CONFIGS["gqa"])
    idx = torch.randint(0, 97, (2, 5))
    greedy = m.generate(idx, 12, temperature=0)
    assert greedy.shape == (2, 17) and torch.equal(greedy[:, :5], idx)
    assert torch.equal(m.generate(idx, 12, temperature=0), greedy)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m.generate(idx, 12, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(m.generate(idx, 12, temperature=1.0, top_p=1e-6, generator=g), greedy)


def test_sampling_is_reproducible_with_a_seeded_generator():
    m = make(CONFIGS["mha"])
    idx = torch.randint(0, 97, (2, 5))
    run = lambda seed: m.generate(idx, 16, temperature=1.0, top_k=20, top_p=0.9,  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_a_stop_token_stops_only_its_row():
    m = make(CONFIGS["gqa"])
    idx = torch.randint(0, 97, (2, 5))
    free = m.generate(idx, 10, temperature=0)[:, 5:]
    # a token row 0 first emits at step j >= 1
    j = next(j for j in range(1, 10) if free[0, j] not in free[0, :j])
    stop = free[0, j].item()
    first_in_row1 = (free[1] == stop).nonzero()
    out = m.generate(idx, 10, temperature=0, stop_tokens=[stop], pad_id=-7)[:, 5:]
    assert out[0, :j + 1].tolist() == free[0, :j + 1].tolist()  # the stop token itself is kept
    assert (out[0, j + 1:] == -7).all()
    end = first_in_row1[0, 0].item() + 1 if len(first_in_row1) else 10
    assert end > j + 1 and out[1, :end].tolist() == free[1, :end].tolist()  # the other row goes on
    # once every row has stopped, generation ends early
    single = m.generate(idx[:1], 10, temperature=0, stop_tokens=[stop])
    assert single.shape == (1, 5 + j + 1)


def test_generate_stream_yields_the_same_tokens_as_generate():
    m = make(CONFIGS["moe"])
    idx, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8]], pad_id=0)
    out = m.generate(idx, 7, temperature=0, attention_mask=mask)
    steps = list(m.generate_stream(idx, 7, temperature=0, attention_mask=mask))
    assert all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), out[:, idx.shape[1]:])


def test_sample_with_per_row_settings_equals_each_row_sampled_alone():
    # guards against the batched per-row filtering (top-k by sort, top-p per row) drifting from sample()'s own
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(0)) * 3
    settings = [(0.0, None, None), (1.0, 5, None), (0.7, None, 0.5), (1.3, 20, 0.9), (1.0, 0, 1.0), (0.5, 96, 0.99)]
    for draw in range(5):
        seeds = [10 * draw + i for i in range(6)]
        rows = model.sample(logits, [s[0] for s in settings], [s[1] for s in settings], [s[2] for s in settings],
                            [torch.Generator().manual_seed(s) for s in seeds])
        for i, (t, k, p) in enumerate(settings):
            alone = model.sample(logits[i:i + 1], t, k, p, torch.Generator().manual_seed(seeds[i]))
            assert rows[i].item() == alone.item(), (draw, i)


def test_per_row_generators_make_each_row_sample_as_if_alone():
    # guards against a server request's reply depending on which other requests share its batch: with one shared
    # generator a row's draws depend on every row before it; with its own generator, settings and seed, never
    m = make(CONFIGS["gqa"])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]
    settings = [(0.0, None, None, 11), (1.0, 20, 0.9, 12), (0.8, None, 0.95, 13)]
    idx, mask = left_pad(prompts, pad_id=0)
    gens = [torch.Generator().manual_seed(s) for *_, s in settings]
    steps = list(m.generate_stream(idx, 8, temperature=[t for t, *_ in settings], top_k=[k for _, k, *_ in settings],
                                   top_p=[p for _, _, p, _ in settings], attention_mask=mask, generator=gens))
    batched = torch.stack(steps, dim=1)
    for i, (p, (t, k, tp, seed)) in enumerate(zip(prompts, settings)):
        alone = m.generate(torch.tensor([p]), 8, temperature=t, top_k=k, top_p=tp,
                           generator=torch.Generator().manual_seed(seed))
        assert batched[i].tolist() == alone[0, len(p):].tolist()


@pytest.mark.parametrize("per_row", [False, True])
def test_a_row_finished_by_the_caller_stops_and_the_others_go_on(per_row):
    # guards against a dropped row (a client gone) corrupting the rows still running when it leaves the batch
    m = make(CONFIGS["moe"])
    idx, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]], pad_id=0)
    gen = [torch.Generator().manual_seed(0) for _ in range(3)] if per_row else None
    free = m.generate(idx, 9, temperature=0, attention_mask=mask, generator=gen)[:, idx.shape[1]:]
    finished = torch.zeros(3, dtype=torch.bool)
    steps = []
    for step, tok in enumerate(m.generate_stream(idx, 9, temperature=0, attention_mask=mask, pad_id=-1,
                                                 generator=gen, finished=finished)):
        steps.append(tok)
        if step == 2:
            finished[1] = True
        if step == 5:
            finished[0] = True
    out = torch.stack(steps, dim=1)
    assert out.shape == (3, 9)
    assert out[1, :3].tolist() == free[1, :3].tolist() and (out[1, 3:] == -1).all()
    assert out[0, :6].tolist() == free[0, :6].tolist() and (out[0, 6:] == -1).all()
    assert out[2].tolist() == free[2].tolist()
    # every row finished by the caller: generation ends at once
    finished = torch.zeros(3, dtype=torch.bool)
    n = 0
    for _ in m.generate_stream(idx, 9, temperature=0, attention_mask=mask, generator=gen, finished=finished):
        n += 1
        finished[:] = True
    assert n == 1


def test_repetition_penalty_follows_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    got = model.apply_repetition_penalty(logits, seen, 2.0)
    assert got.tolist() == [[1.0, -4.0, 1.0, 3.0]]
    # generation with a large penalty never repeats a token while unseen ones remain
    m = make(CONFIGS["mha"])
    idx = torch.tensor([[1, 2, 3]])
    out = m.generate(idx, 20, temperature=0, repetition_penalty=1e9)[0].tolist()
    assert len(set(out)) == len(out)


def sampled_probs(monkeypatch, logits, **kw):
    """The probabilities model.sample draws from (torch.multinomial's input) and the ids it returned."""
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return real(probs, *args, **kwargs)
    monkeypatch.setattr(torch, "multinomial", spy)
    ids = model.sample(logits, generator=torch.Generator().manual_seed(0), **kw)
    return (seen[0] if seen else None), ids


EXTREME_LOGITS = {
    "normal": torch.tensor([[2.0, -1.0, 0.5, 3.0, -7.0]]),
    "huge": torch.tensor([[3.0e38, -3.0e38, 1.0, 2.9e38, 0.0]]),
    "inf": torch.tensor([[float("inf"), 1.0, float("-inf"), float("inf"), -2.0]]),
    "tiny_gaps": torch.tensor([[1.0, 1.0 + 1e-6, 1.0 - 1e-6, 0.0, -1.0]]),
}


@pytest.mark.parametrize("name", sorted(EXTREME_LOGITS))
@pytest.mark.parametrize("temperature", [1e-5, 1e-3, 1.0, 1e10, 3e38])
@pytest.mark.parametrize("top_k,top_p", [(None, None), (1, None), (10**6, 1e-300), (2, 0.999999), (None, 1.0)])
def test_sample_draws_from_finite_probabilities_at_extreme_settings(monkeypatch, name, temperature, top_k, top_p):
    # --temperature=1e-39 or a repetition penalty of 1e-300 gave inf logits and torch.multinomial failed with
    # "probability tensor contains either inf, nan or element < 0"
    logits = EXTREME_LOGITS[name]
    probs, ids = sampled_probs(monkeypatch, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    top = logits.clamp(max=torch.finfo(torch.float32).max).argmax(-1)
    assert probs[0, top].item() == probs.max().item()  # the most likely token stays the most likely
    assert probs[0, ids].item() > 0


@pytest.mark.parametrize("temperature", [0.0, 1e-39, 1e-45, 9.99e-6])
def test_a_temperature_below_1e5_is_greedy(monkeypatch, temperature):
    torch.manual_seed(0)
    logits = torch.randn(64, 97) * 5
    probs, ids = sampled_probs(monkeypatch, logits, temperature=temperature, top_k=50, top_p=0.9)
    assert probs is None and torch.equal(ids, logits.argmax(-1))  # no draw at all
    # and through the model, the whole generation equals temperature 0
    m = make(CONFIGS["gqa"])
    idx = torch.randint(0, 97, (2, 5))
    assert torch.equal(m.generate(idx, 8, temperature=temperature), m.generate(idx, 8, temperature=0))


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 1e30, 1e300])
def test_extreme_repetition_penalties_keep_logits_finite(penalty):
    logits = torch.tensor([[2.0, -2.0, 0.0, 3.0, -3.0e38, 3.0e38]])
    seen = torch.tensor([[True, True, True, False, True, True]])
    got = model.apply_repetition_penalty(logits, seen, penalty)
    assert torch.isfinite(got).all()
    assert got[0, 3] == 3.0 and got[0, 2] == 0.0  # unseen: as it was; a zero logit has no sign to push
    if penalty > 1:  # seen tokens fall below where they were
        assert got[0, 0] < 2.0 and got[0, 1] < -2.0
    else:
        assert got[0, 0] > 2.0 and got[0, 1] > -2.0
    m = make(CONFIGS["mha"])
    out = m.generate(torch.tensor([[1, 2, 3]]), 12, temperature=0.7, repetition_penalty=penalty, top_p=0.9,
                     generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 15)


@pytest.mark.parametrize("kw,key", [(dict(temperature=-1e-300), "--temperature"),
                                    (dict(temperature=float("inf")), "--temperature"),
                                    (dict(temperature=float("nan")), "--temperature"),
                                    (dict(top_k=-1), "--top_k"), (dict(top_k=2.5), "--top_k"),
                                    (dict(top_p=0.0), "--top_p"), (dict(top_p=1.0 + 1e-9), "--top_p"),
                                    (dict(top_p=float("nan")), "--top_p")])
def test_impossible_sampling_settings_are_one_line_errors_naming_the_key(kw, key):
    import common
    with pytest.raises(common.UserError, match=key):
        model.sample(torch.zeros(1, 5), **kw)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(common.UserError, match="--repetition_penalty"):
            model.apply_repetition_penalty(torch.zeros(1, 5), torch.ones(1, 5, dtype=torch.bool), bad)


def test_dropout_only_in_training_mode():
    m = make(tiny(dropout=0.2))
    idx = torch.randint(0, 97, (2, 12))
    assert torch.equal(m(idx)[0], m(idx)[0])
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])


def test_disable_dropout_makes_training_passes_equal_eval_passes_lora_included():
    # DPO and PPO compare log-probs of a training pass with those of an eval pass (reference, rollout): a model
    # pretrained with dropout must give the same numbers in both, its LoRA adapters' dropout included
    import lora
    from model import disable_dropout
    m = make(tiny(dropout=0.2))
    lora.apply_lora(m, r=4, alpha=8.0, dropout=0.3)
    for _, layer in lora.lora_layers(m):  # B starts at 0, which would hide the adapters' dropout
        torch.nn.init.normal_(layer.lora_B)
    idx = torch.randint(0, 97, (2, 12))
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])
    want = m.eval()(idx)[0]
    disable_dropout(m).train()
    assert torch.equal(m(idx)[0], want) and torch.equal(m(idx)[0], want)
    assert m.config.dropout == 0.2  # the config keeps it for a later stage that trains with dropout


def test_generate_restores_training_mode_and_rejects_too_long_requests():
    m = make(tiny(dropout=0.1))
    m.train()
    m.generate(torch.tensor([[1, 2]]), 3, temperature=0)
    assert m.training
    with pytest.raises(Exception, match="block_size"):
        m.generate(torch.tensor([[1, 2]]), 63, temperature=0)


# ---------------------------------------------------------------------------------------------------------------
# loss, parameter and FLOP counts

def test_loss_with_loss_mask_equals_manual_masked_cross_entropy():
    m = make(CONFIGS["mha"])
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[1, 0] = -1
    loss_mask = torch.randint(0, 2, (2, 10))
    loss_mask[0, 0] = 1
    logits, loss = m(idx, targets=targets, loss_mask=loss_mask)
    assert logits is None  # the head ran on the counted positions only
    keep = (loss_mask == 1) & (targets != -1)
    manual = F.cross_entropy(m(idx)[0][keep], targets[keep])
    torch.testing.assert_close(loss, manual)
    # nothing to learn gives 0, not NaN
    assert m(idx, targets=targets, loss_mask=torch.zeros_like(loss_mask))[1].item() == 0


def test_logps_of_the_counted_positions_equal_the_full_logits_eager_and_compiled():
    """return_logps runs the head on the counted positions only; the log-probs (under logits / temperature) and
    the mean loss equal those read from the full (B, T, V) logits, eager and under torch.compile (where every
    position goes through the head: static shapes)."""
    m = make(CONFIGS["gqa"]).eval()
    idx = torch.randint(0, 97, (3, 12))
    targets = torch.randint(0, 97, (3, 12))
    loss_mask = (torch.rand(3, 12) < 0.3).long()
    loss_mask[0, 5] = 1
    targets[2, 3] = -1
    keep = (loss_mask == 1) & (targets != -1)
    full = torch.log_softmax(m(idx)[0] / 0.7, -1).gather(2, targets.clamp(min=0)[..., None])[..., 0] * keep
    want_loss = F.cross_entropy(m(idx)[0][keep], targets[keep])

    def both(model):
        return (model(idx, targets, loss_mask=loss_mask, return_logps=True, temperature=0.7)[0],
                model(idx, targets, loss_mask=loss_mask)[1])
    with torch.no_grad():
        # fullgraph: the data-dependent selection of the eager path would break the graph, so this fails unless
        # the compiled path takes every position
        for logps, loss in (both(m), torch.compile(both, fullgraph=True)(m)):
            torch.testing.assert_close(logps, full)
            assert torch.equal(logps == 0, ~keep)
            torch.testing.assert_close(loss, want_loss)


def test_param_count_and_flops_per_token():
    tied, untied = GPT(tiny()), GPT(tiny(tie_embeddings=False))
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert tied.num_params(exclude_embedding=True) == tied.num_params() - 97 * 32
    linear = sum(mod.weight.numel() for mod in tied.modules() if isinstance(mod, torch.nn.Linear))
    attention = 2 * 2 * (2 * 4 * 8 * 50 / 2)  # 2 layers, QK^T + AV, n_head*head_dim = 32, causal half of 50 keys
    assert tied.flops_per_token(50) == pytest.approx(3 * (2 * linear + attention))
    moe = GPT(tiny(n_experts=4, n_experts_per_tok=2))
    dense_mlp = 3 * 32 * 48
    assert moe.flops_per_token(50) - tied.flops_per_token(50) == pytest.approx(6 * 2 * (dense_mlp + 32 * 4))


def test_hf_state_dict_names_round_trip():
    cfg = tiny(n_kv_head=2, tie_embeddings=False)
    sd = GPT(cfg).state_dict()
    back = model.from_hf_llama_state_dict(model.to_hf_llama_state_dict(sd, cfg))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    moe_cfg = tiny(n_experts=2)
    with pytest.raises(Exception, match="Mixture"):
        model.to_hf_llama_state_dict(GPT(moe_cfg).state_dict(), moe_cfg)
