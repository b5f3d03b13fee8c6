import math

import numpy as np
import pytest
import torch

import common
import dpo
import prepare
import trainer
from conftest import TINY_STAGE, ok, one_line_error, read_log, run_script
from model import GPT, ModelConfig


def logsig(x):
    return -math.log1p(math.exp(-x))


def loss_of(loss_type, pc=-10.0, pr=-12.0, rc=-11.0, rr=-11.0, nc=2.0, nr=2.0, beta=0.1, **kw):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    losses, r_c, r_r = dpo.preference_loss(loss_type, t(pc), t(pr), t(rc), t(rr), t(nc), t(nr), beta, **kw)
    return losses.item(), r_c.item(), r_r.item()


# ------------------------------------------------------------------------------------------------ each loss by hand

def test_sigmoid_loss_by_hand():
    # beta 0.1, policy -10 / -12, reference -11 / -11: h = (1) - (-1) = 2, loss = -log sigmoid(0.2)
    loss, r_c, r_r = loss_of("sigmoid")
    assert loss == pytest.approx(0.598139, abs=1e-6)
    assert (r_c, r_r) == (pytest.approx(0.1), pytest.approx(-0.1))
    # conservative DPO: 0.9 of that plus 0.1 of -log sigmoid(-0.2)
    assert loss_of("sigmoid", label_smoothing=0.1)[0] == pytest.approx(0.9 * 0.598139 + 0.1 * 0.798139, abs=1e-6)


def test_ipo_hinge_simpo_orpo_losses_by_hand():
    # ipo: per-token averaged log-ratios, h = (1)/2 - (-1)/2 = 1; (1 - 1/(2*0.1))^2 = 16
    assert loss_of("ipo")[0] == pytest.approx(16.0)
    assert loss_of("ipo", nc=4.0, nr=1.0)[0] == pytest.approx((0.25 + 1.0 - 5.0) ** 2)
    # hinge: max(0, 1 - beta * h) = 1 - 0.2
    assert loss_of("hinge")[0] == pytest.approx(0.8)
    assert loss_of("hinge", beta=1.0)[0] == 0.0
    # simpo: beta 2, gamma 0.5, averages -5 and -6: -log sigmoid(2 * 1 - 0.5); no reference involved
    assert loss_of("simpo", beta=2.0, gamma=0.5)[0] == pytest.approx(-logsig(1.5))
    assert loss_of("simpo", beta=2.0, rc=-100.0)[0] == loss_of("simpo", beta=2.0)[0]
    # orpo: NLL of chosen (5 per token) + beta * -log sigmoid(log odds_c - log odds_r), odds = p / (1 - p)
    odds = lambda avg: avg - math.log(1 - math.exp(avg))  # noqa: E731
    want = 5.0 - 0.1 * logsig(odds(-5.0) - odds(-6.0))
    assert loss_of("orpo")[0] == pytest.approx(want, rel=1e-9)


def test_ipo_rewards_are_beta_times_the_length_normalised_log_ratios_its_loss_uses():
    # the rewards behind pref_accuracy and reward_margin were beta x the summed log-ratios while the loss compared
    # averaged ones: a long chosen reply could count as preferred by the metric and not by the loss
    loss, r_c, r_r = loss_of("ipo", pc=-10.0, pr=-12.0, rc=-11.0, rr=-11.0, nc=4.0, nr=1.0)
    # log-ratios 1 and -1, over 4 and 1 tokens: 0.25 and -1.0
    assert (r_c, r_r) == (pytest.approx(0.1 * 0.25), pytest.approx(0.1 * -1.0))
    assert loss == pytest.approx(((r_c - r_r) / 0.1 - 1 / (2 * 0.1)) ** 2)
    # summed log-ratios prefer chosen (3 against 1.5) but the averaged ones the loss uses prefer rejected (0.5
    # against 1.5): so must the reported rewards
    _, r_c, r_r = loss_of("ipo", pc=-8.0, pr=-9.5, rc=-11.0, rr=-11.0, nc=6.0, nr=1.0)
    assert r_c == pytest.approx(0.05) and r_r == pytest.approx(0.15) and r_c < r_r


def test_orpo_and_simpo_train_their_papers_losses_without_an_extra_rpo_term():
    # dpo.py added rpo_alpha (default 1) x the chosen NLL to every loss type: ORPO trained 2 NLL + beta L_OR and
    # SimPO, reference-free and NLL-free by design, an NLL term too
    assert dpo.resolve_rpo_alpha("orpo", dpo.rpo_alpha) == 0.0
    assert dpo.resolve_rpo_alpha("simpo", dpo.rpo_alpha) == 0.0
    for loss_type in ("sigmoid", "ipo", "hinge"):
        assert dpo.resolve_rpo_alpha(loss_type, dpo.rpo_alpha) == 1.0
    # set explicitly, it applies to every loss type (0 turns it off for DPO too)
    assert dpo.resolve_rpo_alpha("orpo", 0.5) == 0.5 and dpo.resolve_rpo_alpha("sigmoid", 0.0) == 0.0
    # ORPO (Hong et al. 2024, eq. 6): L_SFT + lambda L_OR, L_SFT the chosen reply's mean token NLL; averages -5 and
    # -6: NLL 5, odds(p) = p / (1 - p) with p = e^avg
    odds_c, odds_r = math.exp(-5.0) / (1 - math.exp(-5.0)), math.exp(-6.0) / (1 - math.exp(-6.0))
    l_or = -math.log(1 / (1 + math.exp(-math.log(odds_c / odds_r))))
    assert loss_of("orpo")[0] == pytest.approx(5.0 + 0.1 * l_or, rel=1e-12)
    # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
    assert loss_of("simpo", beta=2.0, gamma=0.5)[0] == pytest.approx(math.log1p(math.exp(-(2.0 * (-5 + 6) - 0.5))),
                                                                     rel=1e-12)


def test_swapping_chosen_and_rejected_flips_the_margin_and_equal_models_give_log_2():
    _, r_c, r_r = loss_of("sigmoid")
    _, s_c, s_r = loss_of("sigmoid", pc=-12.0, pr=-10.0)
    assert s_c - s_r == pytest.approx(-(r_c - r_r))
    # policy == reference: every log-ratio is 0 and the loss is log 2, whatever the log-probs
    for pc, pr in ((-10.0, -12.0), (-3.0, -30.0)):
        assert loss_of("sigmoid", pc=pc, pr=pr, rc=pc, rr=pr)[0] == pytest.approx(math.log(2))


def test_unknown_loss_type_is_a_user_error():
    with pytest.raises(common.UserError, match="--loss_type"):
        loss_of("kto")


def test_sequence_logps_count_only_reply_tokens_and_ignore_padding(world_data):
    """The summed reply log-prob must be the same whether the pair is alone or batched with a longer one (more
    right padding), and must equal the sum over the reply tokens picked by hand."""
    tok = prepare.load_tokenizer(world_data)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_kv_head=1,
                            n_embd=32)).eval()
    prompt = np.array(tok.render_prompt([{"role": "user", "content": "What is 3 + 4?"}]))
    reply = np.array(tok.encode("3 + 4 = 7") + [tok.end_id])
    long_prompt = np.array(tok.render_prompt([{"role": "user", "content": "Sort: 9 3 7 1 5 2 8 6 4 and more " * 3}]))
    pairs, _ = trainer.fit_pairs([(prompt, reply, reply[:3], 0.0), (long_prompt, reply, reply, 0.0)], 96)

    def seq_logps(rows):
        x, y, mask = trainer.next_token_batch([r[0] for r in rows], [r[1] for r in rows], tok.pad_id)
        return model(x, y, loss_mask=mask, return_logps=True)[0].sum(-1)

    alone, batched = seq_logps(pairs[:1]), seq_logps(pairs)
    torch.testing.assert_close(alone[0], batched[0], rtol=1e-5, atol=1e-5)
    full = np.concatenate([prompt, reply])
    logp = torch.log_softmax(model(torch.from_numpy(full[None]).long())[0][0], -1)
    by_hand = sum(logp[t - 1, full[t]] for t in range(len(prompt), len(full)))
    torch.testing.assert_close(alone[0], by_hand, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ tiny runs

def dpo_args(data, init, out, *extra):
    return [f"--dataset={data}", f"--init_from={init}", f"--out_dir={out}", *TINY_STAGE, "--batch_size=8",
            "--eval_prompts=8", "--eval_max_new_tokens=8", "--eval_iters=3", *extra]


def test_tiny_dpo_moves_the_preference_and_writes_a_checkpoint_the_next_stage_loads(world_data, sft_ckpt,
                                                                                    tmp_path):
    out = tmp_path / "dpo"
    metrics = ok(run_script("dpo.py", *dpo_args(world_data, sft_ckpt, out, "--max_iters=20", "--eval_interval=20",
                                                "--learning_rate=1e-3", "--rpo_alpha=0")))
    start, end = [r for r in read_log(out) if "val_loss" in r]
    # at step 0 the policy is the reference: loss log 2 (no RPO term here), no implicit preference (ties count
    # half), KL 0
    assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert start["pref_accuracy"] == pytest.approx(0.5) and abs(start["kl"]) < 1e-5
    assert end["val_loss"] < start["val_loss"] and end["pref_accuracy"] > 0.6 and end["kl"] > 0
    for key in ("pref_accuracy", "reward_margin", "logp_pref_accuracy", "kl", "exact_match", "exact_match_by_task"):
        assert key in metrics
    ckpt = common.load_checkpoint(str(out), stages=("dpo",))
    assert ckpt["train_config"]["beta"] == 0.1
    r = run_script("generate.py", f"--ckpt={out}", "--prompt=3+4?", "--max_new_tokens=4", "--device=cpu")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("extra", [["--finetune=lora", "--loss_type=ipo"], ["--loss_type=simpo"],
                                   ["--loss_type=orpo", "--ref_nf4=True"], ["--finetune=qlora", "--loss_type=hinge"]])
def test_every_loss_and_mode_runs_and_starts_from_the_reference(world_data, sft_ckpt, tmp_path, extra):
    out = tmp_path / "run"
    ok(run_script("dpo.py", *dpo_args(world_data, sft_ckpt, out, "--max_iters=2", "--eval_interval=2",
                                      "--eval_prompts=0", *extra)))
    start = read_log(out)[0]
    # the run trained with the RPO weight of its loss type: none on top of ORPO and SimPO
    loss_type = next(a.split("=")[1] for a in extra if a.startswith("--loss_type="))
    rpo = common.load_checkpoint(str(out), stages=("dpo",))["train_config"]["rpo_alpha"]
    assert rpo == (0.0 if loss_type in ("orpo", "simpo") else 1.0)
    if "--ref_nf4=True" not in extra:  # the reference is the policy's own start (an NF4 copy differs a little)
        assert abs(start["kl"]) < 1e-5 and start["pref_accuracy"] == pytest.approx(0.5)


def test_a_reward_checkpoint_is_refused_as_a_policy(world_data, reward_ckpt, tmp_path):
    r = run_script("dpo.py", *dpo_args(world_data, reward_ckpt, tmp_path / "x", "--max_iters=1"))
    one_line_error(r, "a reward model checkpoint cannot be used as a policy")
    r = run_script("generate.py", f"--ckpt={reward_ckpt}", "--prompt=hi", "--device=cpu")
    one_line_error(r, "a reward model checkpoint cannot be used as a policy")
    for bad, fragment in (("--loss_type=kto", "--loss_type"), ("--label_smoothing=0.7", "--label_smoothing")):
        one_line_error(run_script("dpo.py", *dpo_args(world_data, reward_ckpt, tmp_path / "x", bad)), fragment)


@pytest.mark.parametrize("loss_type,first_loss", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2),
                                                  ("hinge", 1.0)])
def test_dropout_is_off_in_dpo_so_the_first_step_starts_from_the_reference(world_data, dropout_sft_ckpt, tmp_path,
                                                                            loss_type, first_loss):
    # a policy pretrained with --dropout=0.1 kept dropout in its training passes while the reference ran without:
    # the first training loss was 0.7101 (not log 2) and preference accuracy 0.375 against a policy equal to its
    # reference. Ties (equal implicit rewards) count half, as in TRL, so the start is exactly 0.5.
    out = tmp_path / loss_type
    lora = ["--finetune=lora", "--lora_dropout=0.1"] if loss_type == "ipo" else []  # the adapters' dropout too
    ok(run_script("dpo.py", *dpo_args(world_data, dropout_sft_ckpt, out, "--max_iters=1", "--eval_interval=1",
                                      "--eval_prompts=0", "--rpo_alpha=0", f"--loss_type={loss_type}", *lora)))
    step = read_log(out)[1]
    assert step["step"] == 1
    assert step["train_loss"] == pytest.approx(first_loss, rel=1e-6)
    assert step["train_pref_accuracy"] == 0.5 and step["train_reward_margin"] == 0.0


def test_dpo_gradient_accumulation_is_exact_for_its_per_pair_losses(world_data, sft_ckpt, tmp_path):
    # DPO's loss and its RPO term are means over pairs (the RPO term of each chosen reply's per-token NLL): weighting
    # each micro-batch by its pairs makes 4 x 2 the update of 8 x 1 whatever the replies' lengths
    shared = ["--max_iters=1", "--eval_interval=1", "--eval_prompts=0", "--warmup_iters=0", "--grad_clip=0",
              "--rpo_alpha=1.0", "--eval_iters=1"]
    ok(run_script("dpo.py", *dpo_args(world_data, sft_ckpt, tmp_path / "a", *shared, "--batch_size=8")))
    ok(run_script("dpo.py", *dpo_args(world_data, sft_ckpt, tmp_path / "b", *shared, "--batch_size=4",
                                      "--grad_accum=2")))
    a, b = read_log(tmp_path / "a")[1], read_log(tmp_path / "b")[1]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)


def test_dpo_resume_refuses_a_setting_that_changes_the_run(world_data, sft_ckpt, tmp_path):
    out = tmp_path / "run"
    shared = ["--eval_prompts=0", "--eval_interval=1"]
    ok(run_script("dpo.py", *dpo_args(world_data, sft_ckpt, out, "--max_iters=1", *shared)))
    for bad, was, now in (("--beta=0.5", "--beta=0.1", "--beta=0.5"), ("--grad_accum=2", "--grad_accum=1",
                                                                         "--grad_accum=2"),
                          ("--finetune=lora", "--finetune=full", "--finetune=lora")):
        r = run_script("dpo.py", *dpo_args(world_data, sft_ckpt, out, "--max_iters=2", "--resume=True", bad,
                                           *shared))
        one_line_error(r, was, now)
    ok(run_script("dpo.py", *dpo_args(world_data, sft_ckpt, out, "--max_iters=2", "--resume=True", *shared)))
