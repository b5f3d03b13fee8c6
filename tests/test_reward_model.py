import json
import random

import numpy as np
import pytest
import torch

import common
import prepare
import reward_model
import rl
from conftest import TINY_STAGE, ok, one_line_error, read_log, run_script
from model import ScoreModel, ModelConfig


def tiny_score_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    m = ScoreModel(ModelConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    torch.nn.init.normal_(m.head.weight, std=0.5)  # the head starts at zero: give it something to say
    return m.eval()


def test_scores_do_not_depend_on_right_padding_even_when_padding_is_the_end_of_turn_id(world_data):
    tok = prepare.load_tokenizer(world_data)
    rm = tiny_score_model(tok.vocab_size)
    prompt = tok.render_prompt([{"role": "user", "content": "What is 3 + 4?"}])
    reply = tok.encode("3 + 4 = 7") + [tok.end_id]
    alone = rl.reward_scores(rm, [prompt], [reply], tok.pad_id, "cpu")
    longer = rl.reward_scores(rm, [prompt, prompt], [reply, reply + tok.encode(" and more words here")],
                                tok.pad_id, "cpu")
    # pad with the end-of-turn id itself: a "last end-of-turn token" rule would read the wrong position
    same_id = rl.reward_scores(rm, [prompt, prompt], [reply, reply + [5] * 9], tok.end_id, "cpu")
    torch.testing.assert_close(longer[0], alone[0])
    torch.testing.assert_close(same_id[0], alone[0])
    # and it is the value at the last real token
    values, _, _ = rm(torch.tensor([prompt + reply]))
    torch.testing.assert_close(alone[0], values[0, -1])


def toy_pairs(path, n, seed=0):
    """A separable preference set: the chosen reply always says 'yes', the rejected one 'no'."""
    rng = random.Random(seed)
    words = ["cat", "dog", "red", "blue", "Anna", "Tom", "Beijing", "London"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = f"Is {rng.choice(words)} {rng.choice(words)}?"
            tail = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"prompt": q, "chosen": f"yes {tail}", "rejected": f"no {tail}",
                                "margin": 0.5 if i % 2 else 0.0}) + "\n")


def test_tiny_reward_model_ranks_a_separable_toy_set_far_above_chance(world_data, sft_ckpt, tmp_path):
    toy = tmp_path / "toy.jsonl"
    toy_pairs(toy, 400)
    data = tmp_path / "toy"
    r = run_script("prepare.py", f"--source={toy}", f"--dataset={data}", f"--tokenizer={world_data}",
                   "--val_fraction=0.1")
    assert r.returncode == 0, r.stderr
    with np.load(data / "pref_train.npz") as z:
        assert set(np.unique(z["margin"]).tolist()) == {0.0, 0.5}  # the per-pair margins travel with the data
    out = tmp_path / "rm"
    metrics = ok(run_script("reward_model.py", f"--dataset={data}", f"--init_from={sft_ckpt}", f"--out_dir={out}",
                            *TINY_STAGE, "--batch_size=16", "--max_iters=40", "--eval_interval=20",
                            "--learning_rate=3e-3", "--lm_coef=0.1"))
    assert metrics["pair_accuracy"] > 0.95 and metrics["reward_margin"] > 0.5, metrics
    # the checkpoint: stage reward, the trunk in `model`, the head beside it; it loads as a scorer
    ckpt = common.load_checkpoint(str(out), stages=("reward",))
    assert ckpt["metrics"]["pair_accuracy"] == metrics["pair_accuracy"] and "score_head" in ckpt
    rm, tok = rl.load_reward_model(str(out), "cpu")
    prompt = tok.render_prompt([{"role": "user", "content": "Is cat red?"}])
    s = rl.reward_scores(rm, [prompt, prompt], [tok.encode("yes dog") + [tok.end_id],
                                                  tok.encode("no dog") + [tok.end_id]], tok.pad_id, "cpu")
    assert s[0] > s[1]


def test_lm_logps_of_the_score_model_are_the_trunks_next_token_log_probs():
    """The reward model's LM term reads ScoreModel.forward's lm_logps: at each counted position the trunk's log-prob
    of the target, from the same pass as the scores, equal to the full logits' (only those positions go through
    the head), and 0 elsewhere."""
    m = tiny_score_model(50).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 50, (3, 9))
    targets = torch.full_like(idx, -1)
    targets[:2, :-1] = idx[:2, 1:]   # the chosen rows' next tokens; the last row and position count nothing
    targets[0, :3] = -1
    values, lm_logps, _ = m(idx, lm_targets=targets)
    torch.testing.assert_close(values, m(idx)[0])
    full = torch.log_softmax(m.gpt(idx)[0], -1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(lm_logps, full * (targets != -1))
    assert m(idx)[1] is None


def test_pairwise_loss_by_hand():
    """Bradley-Terry with a per-pair margin, plus the centring term."""
    r_c, r_r, margin = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.4]), torch.tensor([0.0, 0.5])
    bt = (np.log1p(np.exp(-0.5)) + np.log1p(np.exp(0.7))) / 2  # -log sigmoid(0.5) and -log sigmoid(-0.7)
    assert reward_model.pairwise_loss(r_c, r_r, margin).item() == pytest.approx(bt, rel=1e-6)
    centred = bt + 0.01 * (1.5 ** 2 + 0.6 ** 2) / 2
    assert reward_model.pairwise_loss(r_c, r_r, margin, 0.01).item() == pytest.approx(centred, rel=1e-6)
    # a margin asks for more: the same scores with a margin lose more
    assert reward_model.pairwise_loss(r_c, r_r, torch.ones(2)) > reward_model.pairwise_loss(r_c, r_r, margin)


def test_policy_checkpoints_are_refused_as_reward_models(sft_ckpt, world_data, tmp_path):
    with pytest.raises(common.UserError, match="is a policy, not a reward model"):
        rl.load_reward_model(sft_ckpt, "cpu")
    r = run_script("reward_model.py", f"--dataset={world_data}", f"--init_from={tmp_path / 'none'}",
                   f"--out_dir={tmp_path / 'o'}", *TINY_STAGE)
    one_line_error(r, "no such checkpoint")


def test_reward_model_accumulation_weights_pairs_and_lm_tokens_exactly(world_data, sft_ckpt, tmp_path):
    # the pairwise and centring terms are means over pairs, the LM term a mean over chosen-reply tokens: 4 x 2
    # must be the update of 8 x 1 of the same pairs (the LM term averaged per micro-batch would differ)
    shared = [f"--dataset={world_data}", f"--init_from={sft_ckpt}", *TINY_STAGE, "--max_iters=1", "--eval_iters=1",
              "--eval_interval=1", "--warmup_iters=0", "--grad_clip=0", "--lm_coef=0.5", "--center_coef=0.1"]
    ok(run_script("reward_model.py", *shared, f"--out_dir={tmp_path / 'a'}", "--batch_size=8"))
    ok(run_script("reward_model.py", *shared, f"--out_dir={tmp_path / 'b'}", "--batch_size=4", "--grad_accum=2"))
    a, b = (read_log(tmp_path / d)[1] for d in ("a", "b"))
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
