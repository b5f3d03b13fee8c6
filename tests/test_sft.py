import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import engine
import lora
import prepare
import trainer
from conftest import ENV, ROOT, TINY_STAGE, ok, one_line_error, read_log, run_script
from model import GPT, ModelConfig


def sft_args(data, init, out, *extra):
    return [f"--dataset={data}", f"--init_from={init}", f"--out_dir={out}", *TINY_STAGE, "--batch_size=8",
            "--eval_prompts=8", "--eval_max_new_tokens=8", *extra]


# ------------------------------------------------------------------------------------------------ the loss mask

def test_sft_mask_excludes_prompt_tokens_padding_and_is_not_shifted(world_data):
    """The batch's loss must be exactly the mean of -log p(token | everything before it) over the assistant's tokens
    and their end-of-turn: counting a prompt token, a padding token, or the target one position off (the bug of
    scoring mask[t] instead of mask[t+1]) each gives another number."""
    tok = prepare.load_tokenizer(world_data)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_kv_head=1,
                            n_embd=32)).eval()
    convs = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 3 + 4?"},
              {"role": "assistant", "content": "3 + 4 = 7"}, {"role": "user", "content": "And 5 + 5?"},
              {"role": "assistant", "content": "5 + 5 = 10"}],
             [{"role": "user", "content": "王安娜住在哪里？"}, {"role": "assistant", "content": "王安娜住在上海。"}]]
    rendered = [tok.render_chat(c) for c in convs]
    x, y, loss_mask = trainer.next_token_batch([np.array(i) for i, _ in rendered],
                                               [np.array(m, dtype=np.uint8) for _, m in rendered], tok.pad_id)
    assert x.shape[0] == 2 and (x[1] == tok.pad_id).any()  # the short row is padded
    _, loss = model(x, y, loss_mask=loss_mask)

    # by hand: each conversation alone (no padding), its assistant tokens picked from the text, not from the mask
    nll = []
    for conv, (ids, _) in zip(convs, rendered):
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)
        pos = 0
        for m in conv:  # ChatML: <|im_start|> role \n content <|im_end|> \n
            head = [tok.start_id] + tok.encode(m["role"] + "\n")
            body = tok.encode(m["content"])
            if m["role"] == "assistant":  # content and the end-of-turn
                for t in range(pos + len(head), pos + len(head) + len(body) + 1):
                    nll.append(-logp[t - 1, ids[t]])
            pos += len(head) + len(body) + 1 + len(tok.encode("\n"))
        assert pos == len(ids)
    want = torch.stack(nll).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)

    # the mistakes this guards against give other values
    shifted = model(x, y, loss_mask=torch.nn.functional.pad(loss_mask[:, 1:], (0, 1)))[1]
    everything = model(x, y, loss_mask=(y != tok.pad_id).long())[1]
    with_padding = model(x, y, loss_mask=torch.ones_like(loss_mask))[1]
    for wrong in (shifted, everything, with_padding):
        assert abs(wrong.item() - want.item()) > 1e-3


def test_the_counted_targets_are_exactly_the_answers_and_their_end_of_turn(world_data):
    tok = prepare.load_tokenizer(world_data)
    conv = [{"role": "user", "content": "Where does Anna Wang live?"},
            {"role": "assistant", "content": "Anna Wang lives in Shanghai."}]
    ids, mask = tok.render_chat(conv)
    x, y, loss_mask = trainer.next_token_batch([ids], [mask], tok.pad_id)
    counted = y[0][loss_mask[0].bool()].tolist()
    assert counted == tok.encode("Anna Wang lives in Shanghai.") + [tok.end_id]
    assert tok.start_id not in counted, "a role header is never a target"


def test_fit_sequence_cuts_the_prompt_from_the_left_and_keeps_the_answer():
    ids = np.arange(20)
    mask = np.array([0] * 8 + [1] * 4 + [0] * 3 + [1] * 5)  # two answers; the last starts at 15
    out, m, cut = trainer.fit_sequence(ids, mask, 12)
    assert cut == "prompt" and out.tolist() == list(range(8, 20)) and m.tolist() == mask[8:].tolist()
    out, m, cut = trainer.fit_sequence(ids, mask, 6)  # header (14) + answer (15..19) just fit
    assert cut == "prompt" and out.tolist() == list(range(14, 20))
    out, m, cut = trainer.fit_sequence(ids, mask, 4)  # the answer alone is too long: keep its start
    assert cut == "answer" and out.tolist() == [14, 15, 16, 17] and m.tolist() == [0, 1, 1, 1]
    out, m, cut = trainer.fit_sequence(ids, mask, 20)
    assert cut is None and out is ids


# ------------------------------------------------------------------------------------------------ tiny runs

@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_tiny_sft_lowers_the_loss_and_writes_a_checkpoint_generate_loads(world_data, pretrained, tmp_path, mode):
    out = tmp_path / mode
    metrics = ok(run_script("sft.py", *sft_args(world_data, pretrained, out, f"--finetune={mode}",
                                                "--max_iters=30", "--eval_interval=15", "--learning_rate=1e-2")))
    evals = [r for r in read_log(out) if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 15, 30]
    assert metrics["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    for key in ("exact_match", "exact_match_by_task", "exact_match_by_lang"):
        assert key in metrics
    assert set(metrics["exact_match_by_lang"]) == {"en", "zh"}
    ckpt = common.load_checkpoint(str(out), stages=("sft",))
    assert ckpt["metrics"] == metrics and ckpt["train_config"]["finetune"] == mode
    # a plain GPT state dict (adapters merged, NF4 dequantized): the next stage loads it without lora.py
    model, tok = engine.model_from_checkpoint(ckpt, "cpu")
    assert all("lora" not in k and "packed" not in k for k in ckpt["model"])
    if mode != "full":
        # the adapter alone, applied to the base, gives the merged model
        adapter = torch.load(out / "adapter.pt", weights_only=True)
        assert os.path.getsize(out / "adapter.pt") < os.path.getsize(out / "ckpt.pt") / 2
        base, _ = engine.model_from_checkpoint(common.load_checkpoint(pretrained), "cpu")
        if mode == "qlora":
            import quantize
            quantize.quantize_model(base, "nf4")
        lora.load_adapter(base, adapter)
        idx = torch.randint(0, tok.vocab_size, (2, 16))
        torch.testing.assert_close(base(idx)[0], model(idx)[0], rtol=1e-4, atol=1e-4)
    r = run_script("generate.py", f"--ckpt={out}/ckpt.pt", "--prompt=What is 3 + 4?", "--max_new_tokens=8",
                   "--device=cpu")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "stage sft" in r.stderr


def test_lora_sft_resumes_exactly(world_data, pretrained, tmp_path):
    shared = ["--finetune=lora", "--lora_dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8",
              "--eval_prompts=0"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok(run_script("sft.py", *sft_args(world_data, pretrained, full, "--max_iters=8", *shared)))
    ok(run_script("sft.py", *sft_args(world_data, pretrained, cut, "--max_iters=4", *shared)))
    ok(run_script("sft.py", *sft_args(world_data, pretrained, cut, "--max_iters=8", "--resume=True", *shared)))
    losses = lambda out: {r["step"]: r["train_loss"] for r in read_log(out) if "train_loss" in r}  # noqa: E731
    assert len(losses(full)) == 8 and losses(cut) == losses(full)
    a = torch.load(full / "ckpt.pt", weights_only=True)
    b = torch.load(cut / "ckpt.pt", weights_only=True)
    assert all(torch.equal(a["adapter"][k], b["adapter"][k]) for k in a["adapter"])
    r = run_script("sft.py", *sft_args(world_data, pretrained, cut, "--max_iters=9", "--resume=True", "--finetune=full",
                                       "--eval_prompts=0"))
    one_line_error(r, "--finetune=lora")


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input_is_a_clear_error(world_data, pretrained, reward_ckpt, tmp_path):
    # an SFT file with no assistant turn to learn from
    no_answers = tmp_path / "no_answers"
    no_answers.mkdir()
    for name in ("tokenizer.json", "meta.json", "sft_val.npz", "prompts_val.jsonl", "prompts_val.npz"):
        (no_answers / name).write_bytes(open(os.path.join(world_data, name), "rb").read())
    ids = prepare.load_ragged(os.path.join(world_data, "sft_train.npz"), "ids")[:10]
    flat, offsets = prepare.ragged(ids, np.int32)
    prepare.save_npz(str(no_answers / "sft_train.npz"), ids=flat, loss_mask=np.zeros(len(flat), np.uint8),
                     offsets=offsets)
    # an empty one
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("tokenizer.json", "meta.json"):
        (empty / name).write_bytes(open(os.path.join(world_data, name), "rb").read())
    prepare.save_npz(str(empty / "sft_train.npz"), ids=np.zeros(0, np.int32), loss_mask=np.zeros(0, np.uint8),
                     offsets=np.zeros(1, np.int64))
    cases = [
        ([f"--dataset={no_answers}"], "no assistant turn"),
        ([f"--dataset={empty}"], "no conversations"),
        ([f"--init_from={reward_ckpt}"], "a reward model checkpoint cannot be used as a policy"),
        ([f"--init_from={tmp_path / 'nothing'}"], "no such checkpoint"),
        (["--finetune=half"], "--finetune must be one of full, lora, qlora"),
        (["--block_size=100000"], "exceeds the context"),
    ]
    for extra, fragment in cases:
        r = run_script("sft.py", *sft_args(world_data, pretrained, tmp_path / "out", "--max_iters=1", *extra))
        one_line_error(r, fragment)


# ------------------------------------------------------------------------------------------------ accumulation, DDP

def test_sft_gradient_accumulation_and_torchrun_weight_every_answer_token_alike(world_data, pretrained, tmp_path):
    # the loss, a mean over answer tokens, was averaged per micro-batch and then over micro-batches and processes:
    # a micro-batch with few answer tokens weighed as much as one with many, so 4 x 2 and 2 processes x 4 trained
    # another loss than 8 x 1 of the same conversations (5.4569 against 5.3674 in one example)
    shared = ["--max_iters=1", "--warmup_iters=0", "--grad_clip=0", "--seed=1", "--eval_prompts=0",
              "--eval_interval=1", "--eval_iters=1"]
    runs = {"8x1": ([], ["--batch_size=8"]), "4x2": ([], ["--batch_size=4", "--grad_accum=2"]),
            "2 processes x 4": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                                ["--batch_size=4", "--grad_accum=2"])}
    logs = {}
    for name, (launcher, extra) in runs.items():
        out = tmp_path / name.replace(" ", "_")
        args = sft_args(world_data, pretrained, out, *shared, *extra)
        cmd = (launcher or [sys.executable]) + ["sft.py", *args]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
        ok(r)
        logs[name] = read_log(out)[1]
    # the conversations of the step have unequal answer lengths, so the mistake would show
    _, _, masks = prepare.load_sft(world_data, "train")
    pick = trainer.shuffled_batch(len(masks), 8, 0, 1)
    lengths = [int(np.asarray(masks[i]).sum()) for i in pick]
    assert sum(lengths[:4]) != sum(lengths[4:]), lengths
    want = logs["8x1"]
    for name in ("4x2", "2 processes x 4"):
        assert logs[name]["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6), name
        assert logs[name]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), name
        assert logs[name]["tokens"] == want["tokens"]
    weights = {name: torch.load(tmp_path / name.replace(" ", "_") / "ckpt.pt", weights_only=True)["model"]
               for name in runs}
    for name in ("4x2", "2 processes x 4"):
        for k, w in weights["8x1"].items():
            torch.testing.assert_close(weights[name][k], w, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------------------ resume

def test_sft_resume_continues_at_the_next_item_or_refuses_a_changed_batch(world_data, pretrained, tmp_path):
    # 2 steps at batch 4, then --resume=True --batch_size=8 skipped items 8-15 of the epoch without a word
    shared = ["--eval_interval=2", "--lr_decay_iters=4", "--eval_prompts=4", "--batch_size=4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    want = ok(run_script("sft.py", *sft_args(world_data, pretrained, full, "--max_iters=4", *shared)))
    ok(run_script("sft.py", *sft_args(world_data, pretrained, cut, "--max_iters=2", *shared)))
    r = run_script("sft.py", *sft_args(world_data, pretrained, cut, "--max_iters=4", "--resume=True", *shared,
                                       "--batch_size=8"))
    one_line_error(r, "--batch_size=4", "--batch_size=8")
    r = run_script("sft.py", *sft_args(world_data, pretrained, cut, "--max_iters=4", "--resume=True", *shared,
                                       "--seed=7"))
    one_line_error(r, "--seed=1337", "--seed=7")
    # what may change (how long, how often to evaluate and log, the device) does not stop it
    got = ok(run_script("sft.py", *sft_args(world_data, pretrained, cut, "--max_iters=4", "--resume=True", *shared,
                                            "--log_interval=2")))
    assert got == want  # the final JSON line
    a, b = (common.load_checkpoint(str(d), stages=("sft",)) for d in (full, cut))
    assert a["metrics"] == b["metrics"] and a["data_position"] == b["data_position"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
