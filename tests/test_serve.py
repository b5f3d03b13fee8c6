"""serve.py as a client sees it: a live server on 127.0.0.1 (a free port) with a tiny checkpoint, driven by the
official `openai` client, raw HTTP where the client cannot send what is tested, and the web page in headless
Chromium."""
import base64
import copy
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import common
import engine
import quantize
from model import GPT, ModelConfig
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
WORDS = ("the a small model learns to add numbers and answer questions about cities rivers people who lives in "
         "which city is capital of what how many apples 北京 是 中国 的 首都 你好 世界 河流").split()
TOP_K = 50  # the servers' top_k, which the references below sample with too


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints of one tiny random model with a 1024-token context; the bilingual tokenizer gives Chinese tokens.
    `sft` is the model as initialised, which now and then samples a special token and stops; `pretrain` and
    `sft_endless` are the same model made unable to sample one, so that every reply runs to max_tokens (a client
    can leave mid-stream, a queue can fill). Returns (paths, models, tokenizer), keyed by name."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.randint(0, 999)}." for _ in range(400)]
    tok = Tokenizer.train(texts, vocab_size=400)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                      tie_embeddings=False)  # tied + random init just echoes the last token (a header)
    model = GPT(cfg).eval()
    endless = copy.deepcopy(model)
    with torch.no_grad():
        # a large constant in dimension 0 of every embedding dominates the residual stream (the blocks add ~0.02),
        # so the final hidden state's dimension 0 is about +sqrt(n_embd) whatever the text; the special tokens'
        # output rows weigh it by -10: their logits sit ~57 below every other token's
        endless.embed_tokens.weight[:, 0] += 10.0
        endless.lm_head.weight[sorted(tok.special_ids), 0] = -10.0
        probe = torch.randint(0, tok.vocab_size, (4, 64))
        special = endless(probe)[0].softmax(-1)[..., sorted(tok.special_ids)]
        assert special.max() < 1e-15  # the construction holds: no reply of this model can stop early
    folder = tmp_path_factory.mktemp("serve")
    paths, models = {}, {"sft": model, "pretrain": endless, "sft_endless": endless}
    for name, m in models.items():
        paths[name] = str(folder / name / "ckpt.pt")
        common.save_checkpoint(paths[name], {"model_config": cfg.to_dict(), "model": m.state_dict(),
                                              "tokenizer": tok.to_json(), "stage": name.split("_")[0],
                                              "train_config": {}, "metrics": {}})
    return paths, models, tok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """python serve.py ... on a free port; its output goes to a file (a full pipe would block it)."""

    def __init__(self, tmp_path, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "serve.py", "--device=cpu", f"--port={self.port}",
                                          f"--top_k={TOP_K}", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 60
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start:\n" + self.output()
            time.sleep(0.2)

    def output(self):
        return self.log.read_text()

    def health(self):
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def chat_server(ckpts, tmp_path_factory):
    paths, _, _ = ckpts
    s = Server(tmp_path_factory.mktemp("log"), f"--ckpt={paths['sft']}", f"--api_key={KEY}", "--max_batch=8",
               "--max_queue=64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def text_server(ckpts, tmp_path_factory):
    paths, _, _ = ckpts
    # one request at a time and one waiting: the queue cap is reached with three clients
    s = Server(tmp_path_factory.mktemp("log"), f"--ckpt={paths['pretrain']}", "--max_batch=1", "--max_queue=1")
    yield s
    s.stop()


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(model, tok, ids, max_new, temperature, top_p, seed):
    """The reply the model gives to `ids` generated alone, in this process: (text, n_tokens, finish_reason)."""
    out = model.generate(torch.tensor([ids]), max_new, temperature=temperature, top_k=TOP_K,
                         top_p=None if top_p >= 1 else top_p, stop_tokens=sorted(tok.special_ids),
                         generator=torch.Generator().manual_seed(seed))[0, len(ids):].tolist()
    stopped = out[-1] in tok.special_ids
    return tok.decode(out), len(out), "stop" if stopped else "length"


def user(text):
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------------ replies

def test_models_lists_the_checkpoint_by_its_folder_name(chat_server):
    models = client(chat_server).models.list().data
    assert [m.id for m in models] == ["sft"]


def test_reply_is_what_the_model_generates_alone_with_the_same_seed(chat_server, ckpts):
    # guards against the server changing the prompt (template), the sampling settings or the seed on the way
    _, models, tok = ckpts
    model = models["sft"]
    r = client(chat_server).chat.completions.create(model="anything", messages=user("what is the capital 北京"),
                                                    temperature=0.9, top_p=0.95, max_tokens=24, seed=7)
    ids = tok.render_prompt(user("what is the capital 北京"))
    text, n, finish = reference(model, tok, ids, 24, 0.9, 0.95, 7)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    assert r.model == "sft" and r.object == "chat.completion"


def test_streamed_chunks_concatenate_to_the_non_streaming_reply(chat_server):
    # guards against streaming losing, repeating or splitting text (half a UTF-8 character) between chunks
    c = client(chat_server)
    for seed in (1, 2, 3):
        kw = dict(model="sft", messages=user("你好 how many apples"), temperature=1.0, max_tokens=40, seed=seed)
        whole = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == whole.choices[0].message.content
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finishes == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert "\ufffd" not in text or "\ufffd" in whole.choices[0].message.content


def test_stream_ends_with_done_and_each_event_is_a_chunk(chat_server):
    # the raw wire format, which every client library parses: `data: {json}` events, then `data: [DONE]`
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": user("hi"), "stream": True, "max_tokens": 5, "seed": 1}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert e.startswith("data: ") and json.loads(e[6:])["object"] == "chat.completion.chunk"


def test_stop_string_ends_the_reply_before_it(chat_server, ckpts):
    # guards against a stop string split across tokens or chunks slipping through, and text after it leaking
    _, models, tok = ckpts
    ids = tok.render_prompt(user("the river"))
    # a seed whose reply is long enough to hold a stop string in its middle
    seed = next(s for s in range(100) if len(reference(models["sft"], tok, ids, 40, 1.0, 0.9, s)[0].strip()) > 12)
    c = client(chat_server)
    kw = dict(model="sft", messages=user("the river"), temperature=1.0, max_tokens=40, seed=seed)
    full = c.chat.completions.create(**kw).choices[0].message.content
    stop = full[5:8]
    cut = c.chat.completions.create(stop=[stop, "never appears 12345"], **kw)
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(stop=stop, stream=True, **kw)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == full[:full.index(stop)]


def test_sixteen_concurrent_requests_are_batched_and_all_answered_in_full(chat_server, ckpts):
    # guards against rows of one batch mixing up (each reply must be its own seed's), a lost request, and a
    # server that decodes one request at a time
    _, models, tok = ckpts
    model = models["sft"]
    c = client(chat_server)
    before = chat_server.health()
    replies = [None] * 16

    def ask(i):
        prompt = user(f"question {i}: " + "which city " * (i % 5))  # prompts of different lengths: left padding
        replies[i] = c.chat.completions.create(model="sft", messages=prompt, temperature=0.8, max_tokens=30,
                                               seed=100 + i)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, r in enumerate(replies):
        assert r is not None, f"request {i} got no reply"
        ids = tok.render_prompt(user(f"question {i}: " + "which city " * (i % 5)))
        text, n, finish = reference(model, tok, ids, 30, 0.8, 0.9, 100 + i)  # the server's top_p
        assert (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason) == \
               (text, n, finish), f"request {i}"
    after = chat_server.health()
    assert after["batches"] - before["batches"] < 16  # some requests were decoded together
    assert after["running"] == 0 and after["waiting"] == 0


# ------------------------------------------------------------------------------------------------ errors

BAD = [  # (raw body, the field, a fragment of the message)
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    ({}, "messages", "non-empty list"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "role' must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "'content' must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages", "must be a string"),
    ({"messages": [{"role": "user"}]}, "messages", "missing field 'content'"),
    ({"messages": ["hi"]}, "messages", "expected a dict"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"messages": user("hi"), "max_tokens": -3}, "max_tokens", "at least 1"),
    ({"messages": user("hi"), "max_tokens": "ten"}, "max_tokens", "must be an integer"),
    ({"messages": user("hi"), "temperature": -0.1}, "temperature", ">= 0"),
    ({"messages": user("hi"), "temperature": "hot"}, "temperature", "must be a number"),
    ({"messages": user("hi"), "top_p": 0}, "top_p", "in (0, 1]"),
    ({"messages": user("hi"), "top_p": 1.5}, "top_p", "in (0, 1]"),
    ({"messages": user("hi"), "n": 2}, "n", "must be 1"),
    ({"messages": user("hi"), "stop": 3}, "stop", "'stop' must be"),
    ({"messages": user("hi"), "stream": "yes"}, "stream", "true or false"),
    ({"messages": user("hi"), "seed": 1.5}, "seed", "must be an integer"),
    # accepted by json.loads, but no sampler or generator can use them: one such request once failed its whole batch
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "temperature", "must be a number"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', "top_p", "must be a number"),
    ({"messages": user("hi"), "seed": 2**64}, "seed", "in [0, 2**63)"),
    ({"messages": user("hi"), "seed": -1}, "seed", "in [0, 2**63)"),
]


@pytest.mark.parametrize("body,param,fragment", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_400_with_the_error_object(chat_server, body, param, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(chat_server.url + "/v1/chat/completions", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error" and err["param"] == param


def test_an_oversized_body_is_refused_with_413(chat_server):
    # guards against one request making the server hold any amount of memory
    body = json.dumps({"messages": user("apples " * ((5 << 20) // 7))}).encode()
    r = httpx.post(chat_server.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "over 4 MB" in r.json()["error"]["message"]


def test_a_conversation_longer_than_the_context_says_by_how_much(chat_server, ckpts):
    _, _, tok = ckpts
    messages = user("apples " * 1100)
    n = len(tok.render_prompt(messages))
    with pytest.raises(openai.BadRequestError) as e:
        client(chat_server).chat.completions.create(model="sft", messages=messages)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert f"is {n} tokens" in err["message"] and f"{n - 1024 + 1} tokens too many" in err["message"]
    # a long max_tokens is cut to the context left, not refused
    r = client(chat_server).chat.completions.create(model="sft", messages=user("hi"), max_tokens=100000, seed=3)
    assert r.usage.total_tokens <= 1024


def test_api_key_is_required_on_the_api_but_not_on_the_page(chat_server):
    with pytest.raises(openai.AuthenticationError) as e:
        client(chat_server, key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(chat_server.url + "/v1/chat/completions", json={"messages": user("hi")}, timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(chat_server.url + "/", timeout=10).status_code == 200
    assert httpx.get(chat_server.url + "/health", timeout=10).status_code == 200


def test_bad_command_line_is_one_error_line(chat_server, ckpts):
    paths, _, _ = ckpts
    for args, fragment in [([f"--port={chat_server.port}"], "cannot listen there"),
                           (["--ckpt=/no/such.pt", f"--port={free_port()}"], "no such checkpoint")]:
        r = subprocess.run([sys.executable, "serve.py", f"--ckpt={paths['sft']}", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and fragment in err, err


def test_unknown_path_gets_404_with_the_error_object(chat_server):
    r = httpx.get(chat_server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 404 and "error" in r.json()


# ------------------------------------------------------------------------------------------------ load

def test_a_client_leaving_mid_stream_frees_its_row(text_server):
    # guards against a gone client's row decoding to its end (costing every other request) or hanging the server
    c = client(text_server)
    before = text_server.health()["generated_tokens"]
    stream = c.completions.create(model="pretrain", prompt="rivers", max_tokens=900, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 20
    while text_server.health()["running"]:
        assert time.time() < deadline, "the row is still decoding"
        time.sleep(0.05)
    time.sleep(0.3)
    spent = text_server.health()["generated_tokens"] - before
    assert spent < 900, spent  # the model cannot stop on its own (ckpts): only the disconnect ended the row
    # and the server goes on answering
    assert c.completions.create(model="pretrain", prompt="hi", max_tokens=3).usage.completion_tokens == 3


def test_a_client_giving_up_on_a_whole_reply_frees_its_row(text_server):
    # the same for a request without streaming: the server notices the closed connection while it waits
    before = text_server.health()["generated_tokens"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(text_server.url + "/v1/completions", json={"prompt": "rivers", "max_tokens": 1000}, timeout=0.1)
    deadline = time.time() + 20
    while text_server.health()["running"]:
        assert time.time() < deadline, "the row is still decoding"
        time.sleep(0.05)
    assert text_server.health()["generated_tokens"] - before < 1000


def test_pretraining_checkpoint_continues_text_and_refuses_chat(text_server, ckpts):
    _, models, tok = ckpts
    model = models["pretrain"]
    c = client(text_server)
    r = c.completions.create(model="pretrain", prompt="the capital of", max_tokens=20, temperature=0.7, seed=4)
    text, n, finish = reference(model, tok, tok.render_text("the capital of"), 20, 0.7, 0.9, 4)
    assert (r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason) == (text, n, finish)
    streamed = c.completions.create(model="pretrain", prompt="the capital of", max_tokens=20, temperature=0.7, seed=4,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == text
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="pretrain", messages=user("hi"))
    assert "/v1/completions" in e.value.body["message"]


def test_a_full_queue_answers_503_and_the_server_stays_up(text_server):
    # max_batch=1, max_queue=1: one request decoding, one waiting, the rest refused at once with a clear message
    c = client(text_server)
    kw = dict(model="pretrain", prompt="rivers", max_tokens=900, temperature=0)  # runs to the end (ckpts)
    results = [None] * 5

    def ask(i):
        try:
            results[i] = c.completions.create(**kw).usage.completion_tokens
        except openai.APIStatusError as e:
            results[i] = (e.status_code, e.body["message"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    threads[0].start()  # decoding before the others arrive (else it may still hold the one queue place)
    deadline = time.time() + 60
    while text_server.health()["running"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(120)
    refused = [r for r in results if isinstance(r, tuple)]
    assert refused and all(code == 503 and "busy" in msg for code, msg in refused), results
    assert all(r == 900 for r in results if not isinstance(r, tuple))  # the admitted ones in full
    assert len(refused) <= 3
    assert text_server.health()["status"] == "ok"


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_a_quantized_checkpoint_is_served(ckpts, tmp_path, mode):
    # guards against the server building the model its own way instead of the project's checkpoint loading
    paths, _, tok = ckpts
    ckpt = torch.load(paths["sft"], weights_only=True)
    model, _ = engine.model_from_checkpoint(ckpt, "cpu")
    ckpt["quantization"] = quantize.quantize_model(model, mode)
    ckpt["model"] = model.state_dict()
    path = str(tmp_path / f"{mode}.pt")
    torch.save(ckpt, path)
    server = Server(tmp_path, f"--ckpt={path}")
    try:
        c = client(server)
        assert [m.id for m in c.models.list().data] == [mode]
        r = c.chat.completions.create(model=mode, messages=user("how many apples"), max_tokens=12, seed=9)
        ids = tok.render_prompt(user("how many apples"))
        quantized, _ = engine.model_from_checkpoint(torch.load(path, weights_only=True), "cpu")
        assert r.choices[0].message.content == reference(quantized, tok, ids, 12, 0.7, 0.9, 9)[0]
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ the page

class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    separated by NUL on file descriptors 3 and 4), so no driver or extra package is needed."""

    def __init__(self, binary, width, height):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        cmd = (f"exec {binary} --headless --no-sandbox --disable-gpu --remote-debugging-pipe "
               f"--window-size={width},{height} --no-first-run --user-data-dir={os.environ.get('TMPDIR', '/tmp')}"
               f"/chromium-serve-test-{os.getpid()} about:blank 3<&{to_chrome_r} 4>&{from_chrome_w}")
        self.proc = subprocess.Popen(["bash", "-c", cmd], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id, self.buf = 0, b""

    def send(self, method, session=None, timeout=30, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    assert "error" not in reply, reply
                    return reply["result"]
            left = deadline - time.time()
            assert left > 0 and select.select([self.from_chrome], [], [], left)[0], f"no answer to {method}"
            data = os.read(self.from_chrome, 1 << 20)
            assert data, "chromium exited"
            self.buf += data

    def close(self):
        self.proc.kill()
        self.proc.wait()


def find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Page:
    """The server's page open in a phone-wide headless Chromium window."""

    def __init__(self, server, width=420, height=820):
        self.browser = Chromium(find_chromium(), width, height)
        target = self.browser.send("Target.createTarget", url=server.url + "/")["targetId"]
        self.session = self.browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.browser.send("Emulation.setDeviceMetricsOverride", self.session, width=width, height=height,
                          deviceScaleFactor=1, mobile=True)

    def js(self, expression):
        r = self.browser.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                              awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait_for(self, expression, timeout=30):
        deadline = time.time() + timeout
        # false, not an error, while the page is still loading
        while not self.js(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()"):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def type_and_send(self, text):
        self.js("document.getElementById('input').focus()")
        self.browser.send("Input.insertText", self.session, text=text)
        self.browser.send("Input.dispatchKeyEvent", self.session, type="keyDown", key="Enter", code="Enter",
                          windowsVirtualKeyCode=13)

    def record_requests(self):
        self.js("""window.sent = []; const f = window.fetch; window.fetch = (url, opt) => {
                     if (opt && opt.body) window.sent.push([url, JSON.parse(opt.body)]); return f(url, opt); }; 1""")

    def close(self):
        self.browser.close()


NO_CHROMIUM = "no Chromium installed (Debian: apt-get install chromium)"


@pytest.mark.skipif(find_chromium() is None, reason=NO_CHROMIUM)
def test_page_streams_a_reply_and_keeps_a_second_turn(ckpts, tmp_path):
    paths, _, _ = ckpts
    server = Server(tmp_path, f"--ckpt={paths['sft_endless']}")  # replies long enough to watch them grow
    page = Page(server)
    js, wait_for, type_and_send = page.js, page.wait_for, page.type_and_send
    try:
        wait_for("document.getElementById('model').textContent.startsWith('sft')")
        # every change to the reply's text is recorded: streamed text grows in several steps, not in one
        js("""window.seen = []; new MutationObserver(() => {
                const a = document.querySelectorAll('.assistant');
                if (a.length) window.seen.push(a[a.length - 1].textContent.length);
              }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); 1""")
        page.record_requests()
        js("document.getElementById('system').value = 'You answer briefly. 简短回答。'")
        js("document.getElementById('temperature').value = '1.0'; document.getElementById('max_tokens').value = '120'")
        type_and_send("你好！How many apples? 🍎")
        wait_for("document.querySelectorAll('.assistant').length == 1 && document.body.dataset.busy === ''")
        first = js("document.querySelector('.assistant').textContent")
        growth = js("window.seen.filter(n => n > 0)")
        assert first and len(set(growth)) >= 3, (first, growth)  # several partial texts were shown
        assert js("document.querySelector('.user').textContent") == "你好！How many apples? 🍎"

        js("document.getElementById('max_tokens').value = '40'")  # each request reads the controls anew
        type_and_send("and the capital 北京?")
        wait_for("document.querySelectorAll('.assistant').length == 2 && document.body.dataset.busy === ''")
        assert js("document.querySelectorAll('.user').length") == 2
        # the second request carried the whole conversation: system prompt, first turn, reply, second turn
        url, sent = js("window.sent")[1]
        assert url == "/v1/chat/completions"
        assert sent["messages"] == [{"role": "system", "content": "You answer briefly. 简短回答。"},
                                    {"role": "user", "content": "你好！How many apples? 🍎"},
                                    {"role": "assistant", "content": first},
                                    {"role": "user", "content": "and the capital 北京?"}]
        assert sent["stream"] is True and sent["temperature"] == 1.0 and sent["max_tokens"] == 40
        assert not js("!!document.querySelector('.error')"), js("document.querySelector('.error').textContent")
        # the page, its settings open, fits the narrow window: nothing wider than the viewport
        js("document.getElementById('settings').open = true")
        assert js("document.documentElement.scrollWidth <= window.innerWidth")
        png = base64.b64decode(page.browser.send("Page.captureScreenshot", page.session, format="png")["data"])
        assert png.startswith(b"\x89PNG")
        if os.environ.get("SERVE_SCREENSHOT"):  # python -m pytest ... with SERVE_SCREENSHOT=docs/serve.png
            with open(os.path.join(ROOT, os.environ["SERVE_SCREENSHOT"]), "wb") as f:
                f.write(png)

        js("document.getElementById('clear').click()")
        assert js("document.querySelectorAll('.msg').length") == 0

        # Stop ends a long reply at once, keeps what came, and frees the server's row
        js("document.getElementById('max_tokens').value = '900'")
        before = server.health()["generated_tokens"]
        type_and_send("a long one")
        wait_for("document.querySelector('.assistant').textContent.length > 5")
        js("document.getElementById('stop').click()")
        wait_for("document.body.dataset.busy === '' && !!document.querySelector('.note')")
        assert js("document.querySelector('.note').textContent") == "(stopped)"
        deadline = time.time() + 20
        while server.health()["running"]:
            assert time.time() < deadline, "the stopped reply's row is still decoding"
            time.sleep(0.05)
        assert server.health()["generated_tokens"] - before < 900

        # the server's 400 is shown as the message it carries, and the turn is not kept
        js("document.getElementById('temperature').value = '-1'")
        type_and_send("bad settings")
        wait_for("document.body.dataset.busy === '' && !!document.querySelector('.error')")
        assert "'temperature' must be >= 0" in js("document.querySelector('.error').textContent")
    finally:
        page.close()
        server.stop()


@pytest.mark.skipif(find_chromium() is None, reason=NO_CHROMIUM)
def test_page_continues_text_with_a_pretraining_checkpoint(ckpts, tmp_path):
    # a pretraining checkpoint has no chat template: the page must send plain prompts to /v1/completions
    paths, _, _ = ckpts
    server = Server(tmp_path, f"--ckpt={paths['pretrain']}")
    page = Page(server)
    try:
        page.wait_for("document.getElementById('model').textContent.includes('text continuation')")
        page.record_requests()
        page.js("document.getElementById('max_tokens').value = '16'")
        page.type_and_send("the capital of")
        page.wait_for("document.body.dataset.busy === '' && !!document.querySelector('.note')")
        url, sent = page.js("window.sent")[0]
        assert url == "/v1/completions" and sent["prompt"] == "the capital of" and "messages" not in sent
        assert page.js("document.querySelector('.assistant').textContent")
        assert not page.js("!!document.querySelector('.error')")
    finally:
        page.close()
        server.stop()
