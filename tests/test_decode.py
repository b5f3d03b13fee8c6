"""The compiled decode step (GPT.decode_step under torch.compile): the same tokens as eager decoding, one compile
per shape, and eager decoding wherever compiling is unavailable. Compiling even a tiny model takes tens of
seconds on a CPU, so every test here shares one model and one shape (batch 3, cache 64): one compile in all."""
import contextlib
import io

import pytest
import torch

import model
from model import GPT, ModelConfig, left_pad

BLOCK = 64
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # left-padded to 7 columns


@pytest.fixture(scope="module")
def compiled():
    """(model, idx, attention_mask, the stderr of the first compiled generation, which compiled the step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation on a shared CPU
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=97, block_size=BLOCK, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    with torch.no_grad():  # O(1) logits: argmax ties, which float reordering could flip, do not occur
        for p in m.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    idx, mask = left_pad(PROMPTS, 0)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        m.generate(idx, 4, temperature=0, attention_mask=mask, compile=True)
    yield m, idx, mask, err.getvalue()
    torch.set_num_threads(n)


def test_decode_cache_length_rounds_up_to_a_power_of_two_within_the_context():
    assert model.decode_cache_length(27, 256) == 64    # at least 64
    assert model.decode_cache_length(64, 256) == 64
    assert model.decode_cache_length(65, 256) == 128
    assert model.decode_cache_length(200, 256) == 256
    assert model.decode_cache_length(200, 200) == 200  # never past block_size (the RoPE table's length)


def test_compiled_greedy_matches_eager_with_padding_stops_and_a_full_cache(compiled):
    # guards against a decode step that reads a stale or unmasked cache slot (padding, the future), takes the
    # wrong RoPE position for a left-padded row, or loses a row's stop: any of them changes a greedy token
    m, idx, mask, err = compiled
    assert "compiling the decode step (batch 3, cache 64)..." in err  # the warm-up is reported
    n_new = BLOCK - idx.shape[1]  # the cache fills to its last slot
    free = m.generate(idx, n_new, temperature=0, attention_mask=mask)
    stop = int(free[1, idx.shape[1] + 5])  # a token row 1 makes early on: it (at least) stops there
    eager = m.generate(idx, n_new, temperature=0, attention_mask=mask, stop_tokens=[stop], pad_id=0)
    fast = m.generate(idx, n_new, temperature=0, attention_mask=mask, stop_tokens=[stop], pad_id=0, compile=True)
    assert torch.equal(fast, eager)
    assert (eager[1, -3:] == 0).all() and (eager[:, -1] != 0).any()  # a row stopped, another ran to the end
    assert torch.equal(m.generate(idx, n_new, temperature=0, attention_mask=mask, compile=True), free)


def test_the_compiled_step_is_reused_across_generations(compiled):
    # guards against guards that fail on every new cache or prompt (a recompile per reply would cost far more
    # than eager decoding saves)
    m, idx, mask, _ = compiled
    before = dict(torch._dynamo.utils.counters["frames"])
    other = torch.tensor([[20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 30, 31]])  # no padding, other length
    m.generate(other, 30, temperature=0, compile=True)
    m.generate(idx, 11, temperature=0, attention_mask=mask, compile=True)
    assert dict(torch._dynamo.utils.counters["frames"]) == before


def test_compiled_server_rows_keep_their_tokens_when_others_finish(compiled):
    # the server's path: per-row settings and generators, and a row the caller ends mid-way (a client gone).
    # Eager decoding drops that row from the batch; the compiled step keeps the shape and masks it: the other
    # rows' tokens must not change either way
    m, idx, mask, _ = compiled

    def run(compile):
        finished = torch.zeros(3, dtype=torch.bool)
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        out = []
        for step, tokens in enumerate(m.generate_stream(idx, 30, temperature=[0.0, 1.0, 0.0], generator=gens,
                                                        attention_mask=mask, pad_id=0, finished=finished,
                                                        compile=compile)):
            out.append(tokens)
            if step == 3:
                finished[0] = True
        return torch.stack(out, 1)
    eager, fast = run(False), run(True)
    assert (eager[0, 4:] == 0).all()
    assert torch.equal(fast, eager)


def test_decoding_is_eager_where_compiling_is_unavailable(capfd):
    moe = GPT(ModelConfig(vocab_size=97, block_size=BLOCK, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                    n_experts=2))
    assert "Mixture-of-Experts" in model.decode_compile_problem(moe, "cpu")
    assert "mps" in model.decode_compile_problem(GPT(ModelConfig(vocab_size=97, block_size=BLOCK, n_layer=1,
                                                                 n_head=2, n_kv_head=2, n_embd=16)), "mps")
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(moe.generate(idx, 5, temperature=0, compile=True), moe.generate(idx, 5, temperature=0))
    assert "decoding eagerly: a Mixture-of-Experts step" in capfd.readouterr().err


def test_decode_attention_matches_sdpa_with_grouped_heads_and_a_mask():
    # the compiled step's written-out attention against PyTorch's own: a wrong GQA head grouping (query head h
    # must use K/V head h // (n_head / n_kv_head), as enable_gqa does) or scale would differ here
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    mask = torch.rand(3, 1, 1, 10) > 0.4
    mask[..., 0] = True  # every row attends somewhere
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(model.decode_attention(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)
