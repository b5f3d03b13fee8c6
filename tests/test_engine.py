"""engine.py: the one way replies are generated (evaluation, PPO/GRPO rollouts, the report, one-shot chat)."""
import random

import pytest
import torch

import engine
from model import GPT, ModelConfig
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to see one big red dog".split()
    return Tokenizer.train([" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)], vocab_size=300)


def test_a_reply_ends_at_its_first_special_token_and_nothing_after_it_counts():
    special = {0, 1, 5}
    assert engine.cut_reply([7, 8, 5, 1, 1], special) == ([7, 8], 5)
    assert engine.cut_reply([7, 8, 9], special) == ([7, 8, 9], None)       # never ended: ran out of room
    assert engine.cut_reply([7, 0, 9], special) == ([7], 0)                # another special: ended badly


def test_batched_left_padded_replies_equal_each_prompt_generated_alone(tok):
    # the reference: one unpadded prompt at a time through model.generate, cut by hand at the first special token
    torch.manual_seed(32)  # a seed whose random model makes all three kinds of cut below
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                            tie_embeddings=False))
    with torch.no_grad():  # make the end of turn win at some positions and not others: both cuts get exercised
        model.lm_head.weight[tok.end_id] = 0.05 * torch.randn(32)
    prompts = [tok.encode("the cat sat on"), tok.encode("a big red dog ran to see the mat and then"), [tok.eot_id],
               tok.encode("one big"), tok.encode("it ran")]
    model.train()
    replies = engine.generate_replies(model, tok, prompts, 12, "cpu")
    assert model.training, "the model's mode is restored"
    model.eval()
    for prompt, reply in zip(prompts, replies):
        out = model.generate(torch.tensor([prompt]), 12, temperature=0.0)[0, len(prompt):].tolist()
        cut = next((j for j, t in enumerate(out) if t in tok.special_ids), len(out))
        assert reply.ids == out[:cut]
        assert reply.stop == (out[cut] if cut < len(out) else None)
        assert reply.text == tok.decode(out[:cut])
    # ended at the end of turn, ran out of room, and ended at another special token (pad): all three cuts
    assert {r.stop for r in replies} == {tok.end_id, None, tok.pad_id}, [r.stop for r in replies]


def test_a_long_prompt_keeps_its_end_and_the_reply_fits_the_context(tok):
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    long = tok.encode("the cat sat on a mat and then it ran to see one big red dog the cat sat")
    assert len(long) > 16
    reply = engine.generate_replies(model, tok, [long], 8, "cpu")[0]
    out = model.generate(torch.tensor([long[-15:]]), 1, temperature=0.0)[0, 15:].tolist()
    assert len(reply.ids) + (reply.stop is not None) == 1 and (reply.ids or [reply.stop]) == out


def test_sampled_replies_are_k_per_prompt_in_order_and_reproducible_from_the_seed(tok):
    torch.manual_seed(2)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    prompts = [tok.encode("the cat sat on"), tok.encode("one big red dog ran to"), tok.encode("it ran")]
    # temperature 0: every sample is the greedy reply, so each prompt's k replies must be its own greedy one
    # (a mix-up of rows after the longest-first ordering would show)
    greedy = engine.generate_replies(model, tok, prompts, 10, "cpu")
    same = engine.sample_replies(model, tok, prompts, 3, 10, "cpu", seed=0, batch_size=4, temperature=0.0)
    assert [[r.ids for r in rs] for rs in same] == [[g.ids] * 3 for g in greedy]
    # at the chat's settings: the same seed gives the same samples, another seed others
    a = engine.sample_replies(model, tok, prompts, 4, 10, "cpu", seed=7, batch_size=5)
    b = engine.sample_replies(model, tok, prompts, 4, 10, "cpu", seed=7, batch_size=5)
    c = engine.sample_replies(model, tok, prompts, 4, 10, "cpu", seed=8, batch_size=5)
    ids = lambda s: [[r.ids for r in rs] for rs in s]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c) and len({tuple(r.ids) for r in a[0]}) > 1
    assert engine.CHAT_SAMPLING == {"temperature": 0.7, "top_k": 50, "top_p": 0.9}  # generate.py's and serve.py's
    import generate
    assert (generate.temperature, generate.top_k, generate.top_p) == (0.7, 50, 0.9)
