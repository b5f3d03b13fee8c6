"""
Serve a checkpoint behind the OpenAI chat-completions protocol, with a web chat page.

    python serve.py --ckpt=checkpoints/sft/ckpt.pt                  # page at http://127.0.0.1:8000/, API at /v1
    python serve.py --ckpt=checkpoints/pretrain/ckpt.pt             # /v1/completions: plain text continuation
    python serve.py --ckpt=... --host=0.0.0.0 --api_key=SECRET      # reachable from elsewhere: ask for a key

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both stream with "stream": true, as
server-sent events that end with `data: [DONE]`), GET /health, and GET / (the page, static/index.html).
Serves every policy checkpoint the project writes, a quantized one (quantize.py) included; a pretraining
checkpoint never saw the chat template, so it answers /v1/completions only.

Requests that arrive together are decoded together: one worker thread takes up to max_batch waiting requests,
left-pads them into one batch and samples them step by step (model.generate_stream), each row with its own
settings and seed and each stopping on its own; requests that arrive meanwhile wait for the next batch. More
than max_queue waiting requests are refused with 503, so memory stays bounded under any load. A client that
disconnects frees its row at the next step.
"""
import asyncio
import collections
import hmac
import json
import math
import os
import socket
import sys
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

import common
import engine
from model import left_pad
from tokenizer import StreamDecoder, check_messages

# -----------------------------------------------------------------------------
ckpt = 'checkpoints/sft/ckpt.pt'
host = '127.0.0.1'         # 0.0.0.0 = every interface: other machines can reach it (set an api_key)
port = 8000
api_key = ''               # non-empty: every /v1 request needs `Authorization: Bearer <api_key>`
max_batch = 8              # requests decoded together
max_queue = 64             # waiting requests beyond this are answered 503
batch_window = 0.01        # seconds a batch waits for more requests to arrive before it starts (when not full)
max_tokens = 256           # reply length when a request does not say (always capped by the context)
temperature = engine.CHAT_SAMPLING["temperature"]  # defaults for requests that leave them out; 0 = greedy
top_k = engine.CHAT_SAMPLING["top_k"]              # not in the protocol: the server's, for every request; 0 = off
top_p = engine.CHAT_SAMPLING["top_p"]
seed = 1337                # seeds the seeds of requests that bring none
device = 'auto'            # auto = cuda, then mps, then cpu
compile = 'auto'           # a torch.compile'd decode step: auto = on CUDA only; each new batch size compiles once,
                           # and finished rows stay in the batch (masked) instead of leaving it
# -----------------------------------------------------------------------------

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_BODY = 4 << 20  # bytes: far beyond any context these models have, and a request cannot make the server hold more


class BadRequest(Exception):
    """A request the protocol refuses: HTTP 400 with the error object naming the field (`param`)."""

    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class Unauthorized(Exception):
    """No or a wrong API key: HTTP 401."""


class Busy(Exception):
    """The waiting queue is full: HTTP 503."""


def error_response(status, message, type_, param=None, code=None):
    """The protocol's error object: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


# ----------------------------------------------------------------------------------------------------------------
# one request's row in a batch

class Row:
    """One request from arrival to its last piece of text. The worker thread calls step() per sampled token and
    hands text to the request's event loop through `events` (("text", str), ("end", finish_reason) or
    ("error", message)); the HTTP side sets `cancelled` when the client goes."""

    def __init__(self, ids, max_new, temperature, top_p, seed, stop, tokenizer, loop):
        self.ids, self.max_new, self.temperature, self.top_p, self.seed = ids, max_new, temperature, top_p, seed
        self.stop = stop                # stop strings: the reply ends before the first one
        self.tokenizer = tokenizer
        self.decoder = StreamDecoder(tokenizer)
        self.held = ""                  # decoded text that may be the start of a stop string
        self.n_tokens = 0               # tokens sampled for this row (a stop token included)
        self.done = False
        self.cancelled = False
        self.loop = loop
        self.events = asyncio.Queue()

    def emit(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def step(self, token_id):
        """Take one sampled token; emit the text that is now certain; finish on a special token (end of turn or
        text, or a role header an undertrained model starts on its own), a stop string, or max_new tokens."""
        self.n_tokens += 1
        if token_id in self.tokenizer.special_ids:
            return self.finish("stop")
        self.release(self.decoder.push(token_id))
        if not self.done and self.n_tokens >= self.max_new:
            self.finish("length")

    def release(self, piece, final=False):
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            if cut:
                self.emit("text", text[:cut])
            self.done = True
            self.emit("end", "stop")
            return
        # hold back the longest end of the text that could still grow into a stop string
        keep = 0 if final else max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:]
        if len(text) > keep:
            self.emit("text", text[:len(text) - keep])

    def finish(self, reason):
        self.release(self.decoder.flush(), final=True)
        if not self.done:  # a stop string found in the last piece has already ended the row
            self.done = True
            self.emit("end", reason)


class Scheduler:
    """The worker thread and its queue. Batches are formed first come, first served: a waiting request joins
    the batch being formed while every row still fits the context (longest prompt + longest reply <=
    block_size) and the batch has room; one that does not fit waits for the next batch, keeping its place."""

    def __init__(self, model, tokenizer, device, autocast, max_batch, max_queue, top_k, batch_window, compile=False):
        self.model, self.tokenizer, self.device, self.autocast = model, tokenizer, device, autocast
        self.compile = compile
        self.max_batch, self.max_queue, self.top_k, self.batch_window = max_batch, max_queue, top_k, batch_window
        self.waiting = collections.deque()
        self.cond = threading.Condition()
        self.running = 0            # rows of the current batch still being decoded
        self.generated_tokens = 0   # since start, for /health and the benchmark
        self.batches = 0
        self.stop_tokens = sorted(tokenizer.special_ids)
        threading.Thread(target=self.work, name="decode", daemon=True).start()

    def submit(self, row):
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise Busy(f"the server is busy: {len(self.waiting)} requests are already waiting "
                           f"(max_queue={self.max_queue}); retry later")
            self.waiting.append(row)
            self.cond.notify()

    def take(self):
        with self.cond:
            while not self.waiting:
                self.cond.wait()
            # clients that send together never arrive in the same instant: without a short wait the first
            # request would start a batch of one and the rest would wait for it to finish
            deadline = time.monotonic() + self.batch_window
            while len(self.waiting) < self.max_batch and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            batch, later = [], collections.deque()
            block_size = self.model.config.block_size
            while self.waiting and len(batch) < self.max_batch:
                row = self.waiting.popleft()
                if row.cancelled:
                    continue
                longest = max([len(r.ids) for r in batch] + [len(row.ids)])
                reply = max([r.max_new for r in batch] + [row.max_new])
                if batch and longest + reply > block_size:
                    later.append(row)
                    continue
                batch.append(row)
            self.waiting.extendleft(reversed(later))
            self.running = len(batch)
            self.batches += bool(batch)
            return batch

    def work(self):
        while True:
            batch = self.take()
            if not batch:
                continue
            try:
                self.decode(batch)
            except Exception as e:  # a bug must not take the server down: the batch's clients get the error
                for row in batch:
                    if not row.done:
                        row.done = True
                        row.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.running = 0

    def decode(self, batch):
        idx, attention_mask = left_pad([r.ids for r in batch], self.tokenizer.pad_id)
        finished = torch.zeros(len(batch), dtype=torch.bool, device=self.device)
        gens = [torch.Generator(device=self.device).manual_seed(r.seed) for r in batch]
        steps = self.model.generate_stream(
            idx.to(self.device), max(r.max_new for r in batch), temperature=[r.temperature for r in batch],
            top_k=self.top_k, top_p=[r.top_p for r in batch], stop_tokens=self.stop_tokens,
            attention_mask=attention_mask.to(self.device), pad_id=self.tokenizer.pad_id, generator=gens,
            finished=finished, compile=self.compile)
        with self.autocast:
            for tokens in steps:
                tokens = tokens.tolist()
                for i, row in enumerate(batch):
                    if row.done:
                        continue
                    if row.cancelled:
                        row.done = True
                    else:
                        row.step(tokens[i])
                        self.generated_tokens += 1
                    if row.done:
                        finished[i] = True
                        self.running -= 1
        for row in batch:  # the context ran out before a row's own limit: admission should make this impossible
            if not row.done:
                row.finish("length")


# ----------------------------------------------------------------------------------------------------------------
# request fields

def number(body, key, default, ok, rule):
    v = body.get(key)
    if v is None:
        return default
    # json.loads takes Infinity and NaN: refused here, or they would fail the whole batch in the decode thread
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"'{key}' must be a number, got {json.dumps(v)[:50]}", key)
    if not ok(v):
        raise BadRequest(f"'{key}' must be {rule}, got {v}", key)
    return float(v)


def integer(body, key, default, ok, rule):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{key}' must be an integer, got {json.dumps(v)[:50]}", key)
    if not ok(v):
        raise BadRequest(f"'{key}' must be {rule}, got {v}", key)
    return v


def sampling(body, cfg, prompt_len, block_size, rng, param):
    """The request's sampling fields, checked: (max_new, temperature, top_p, seed, stop, stream, include_usage).
    A reply may use the context left after the prompt; a prompt that leaves no room is refused."""
    if body.get("n", 1) != 1:
        raise BadRequest(f"'n' must be 1 (one choice per request), got {json.dumps(body.get('n'))[:50]}", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    want = integer(body, key, cfg["max_tokens"], lambda v: v >= 1, "at least 1")
    temp = number(body, "temperature", cfg["temperature"], lambda v: v >= 0, ">= 0")
    p = number(body, "top_p", cfg["top_p"], lambda v: 0 < v <= 1, "in (0, 1]")
    s = integer(body, "seed", None, lambda v: 0 <= v < 2**63, "in [0, 2**63)")  # what torch.Generator takes
    if s is None:
        s = int(torch.randint(0, 2**62, (1,), generator=rng))
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {json.dumps(stream)[:50]}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    if prompt_len >= block_size:
        raise BadRequest(f"the {'conversation' if param == 'messages' else 'prompt'} is {prompt_len} tokens and the "
                         f"model's context holds {block_size}: {prompt_len - block_size + 1} tokens too many "
                         f"(at least one must be left for the reply)", param, "context_length_exceeded")
    return (min(want, block_size - prompt_len), temp, None if p >= 1 else p, s, stop, stream,
            bool(options.get("include_usage")))


class TooLarge(Exception):
    """A request body over MAX_BODY: HTTP 413."""


async def read_body(request):
    raw = bytearray()
    async for part in request.stream():  # read in parts, so that an oversized body is refused before it is all in
        raw += part
        if len(raw) > MAX_BODY:
            raise TooLarge(f"the request body is over {MAX_BODY >> 20} MB")
    try:
        body = json.loads(raw)
    except ValueError as e:  # bad JSON and bad UTF-8 alike
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# ----------------------------------------------------------------------------------------------------------------
# the app

def create_app(model, tokenizer, chat, model_name, cfg, device, autocast):
    """The FastAPI app serving `model`. cfg: this file's settings (max_batch, max_queue, api_key, defaults)."""
    app = FastAPI(title="serve.py", docs_url=None, redoc_url=None, openapi_url=None)
    scheduler = Scheduler(model, tokenizer, device, autocast, cfg["max_batch"], cfg["max_queue"],
                          cfg["top_k"] or None, cfg["batch_window"], cfg["compile"])
    rng = torch.Generator().manual_seed(cfg["seed"])
    block_size = model.config.block_size
    created = int(time.time())

    @app.exception_handler(BadRequest)
    async def bad_request(request, e):
        return error_response(400, e.message, "invalid_request_error", e.param, e.code)

    @app.exception_handler(Busy)
    async def busy(request, e):
        return error_response(503, str(e), "server_error", code="server_busy")

    @app.exception_handler(TooLarge)
    async def too_large(request, e):
        return error_response(413, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def bug(request, e):  # still the protocol's error object, so that clients show the message
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown path, wrong method: the same error object
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              "invalid_request_error")

    @app.exception_handler(Unauthorized)
    async def unauthorized(request, e):
        return error_response(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                              "invalid_request_error", code="invalid_api_key")

    async def check_key(request: Request):
        # on the /v1 routes only: the page and /health need no key (the page asks for it; a load balancer
        # probes /health). A route dependency, not an HTTP middleware: that would hide a client's disconnect.
        given = request.headers.get("authorization", "")
        if cfg["api_key"] and not hmac.compare_digest(given.encode(), f"Bearer {cfg['api_key']}".encode()):
            raise Unauthorized()

    key = [Depends(check_key)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "chat": chat, "running": scheduler.running,
                "waiting": len(scheduler.waiting), "batches": scheduler.batches,
                "generated_tokens": scheduler.generated_tokens}

    @app.get("/v1/models", dependencies=key)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "local", "context_length": block_size, "chat": chat}]}

    @app.post("/v1/chat/completions", dependencies=key)
    async def chat_completions(request: Request):
        body = await read_body(request)
        if not chat:
            raise BadRequest(f"{model_name} is a pretraining checkpoint: it has no chat template; "
                             "use /v1/completions for plain text continuation", "messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
        try:
            check_messages(messages)
        except ValueError as e:
            raise BadRequest(str(e), "messages") from None
        ids = tokenizer.render_prompt([{"role": m["role"], "content": m["content"]} for m in messages])
        return await answer(request, body, ids, "messages", chat_format=True)

    @app.post("/v1/completions", dependencies=key)
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", "prompt")
        return await answer(request, body, tokenizer.render_text(prompt), "prompt", chat_format=False)

    async def answer(request, body, ids, param, chat_format):
        max_new, temp, p, s, stop, stream, include_usage = sampling(body, cfg, len(ids), block_size, rng, param)
        row = Row(ids, max_new, temp, p, s, stop, tokenizer, asyncio.get_running_loop())
        scheduler.submit(row)
        rid = ("chatcmpl-" if chat_format else "cmpl-") + uuid.uuid4().hex
        now = int(time.time())
        obj = "chat.completion" if chat_format else "text_completion"

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": row.n_tokens,
                    "total_tokens": len(ids) + row.n_tokens}

        def choice(text, finish):
            if chat_format:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def delta(text, finish, first=False):
            if chat_format:
                d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if not stream:
            pieces = []
            check = time.monotonic() + 0.25
            while True:
                try:
                    event = await asyncio.wait_for(row.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() >= check:  # a client that gave up waiting frees its row
                    check = time.monotonic() + 0.25
                    if await request.is_disconnected():
                        row.cancelled = True
                        return JSONResponse({}, status_code=499)
                if event is None:
                    continue
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "end":
                    return {"id": rid, "object": obj, "created": now, "model": model_name,
                            "choices": [choice("".join(pieces), event[1])], "usage": usage()}
                else:
                    return error_response(500, event[1], "server_error")

        def sse(payload):
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        chunk_obj = "chat.completion.chunk" if chat_format else "text_completion"

        def chunk(choice_, **extra):
            return sse({"id": rid, "object": chunk_obj, "created": now, "model": model_name,
                        "choices": [choice_] if choice_ else [], **extra})

        async def events():
            try:
                if chat_format:
                    yield chunk(delta("", None, first=True))
                while True:
                    event = await row.events.get()
                    if event[0] == "text":
                        yield chunk(delta(event[1], None))
                    elif event[0] == "end":
                        yield chunk(delta("", event[1]))
                        if include_usage:
                            yield chunk(None, usage=usage())
                        break
                    else:
                        yield sse({"error": {"message": event[1], "type": "server_error", "param": None,
                                             "code": None}})
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the response is cancelled) or the reply ended: either way, free the row
                row.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.scheduler = scheduler
    return app


def model_name_of(path):
    """A checkpoint's name for /v1/models: its folder for `<stage>/ckpt.pt` or a folder, else the file's stem."""
    path = os.path.normpath(path)
    if os.path.isdir(path):
        return os.path.basename(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == "ckpt" else stem


def main(argv=None):
    cfg = common.configure(globals(), argv)
    checks = [("temperature", cfg["temperature"] >= 0, ">= 0"), ("top_p", 0 < cfg["top_p"] <= 1, "in (0, 1]"),
              ("top_k", cfg["top_k"] >= 0, ">= 0"), ("max_tokens", cfg["max_tokens"] >= 1, ">= 1"),
              ("max_batch", cfg["max_batch"] >= 1, ">= 1"), ("max_queue", cfg["max_queue"] >= 1, ">= 1"),
              ("port", 0 < cfg["port"] < 65536, "in 1..65535"),
              ("batch_window", cfg["batch_window"] >= 0, ">= 0")]
    for key, ok, rule in checks:
        if not ok:
            raise common.UserError(f"--{key} must be {rule}, got {cfg[key]}")
    try:  # before the model loads: a port in use is the commonest mistake, and uvicorn would only log it
        socket.create_server((cfg["host"], cfg["port"])).close()
    except OSError as e:
        raise common.UserError(f"--host={cfg['host']} --port={cfg['port']}: cannot listen there "
                                f"({e.strerror or e})") from None
    path = cfg["ckpt"]
    rt = common.setup(device=cfg["device"], seed=cfg["seed"], compile=cfg["compile"])
    cfg["compile"] = rt.compile  # auto resolved for this device
    checkpoint, model, tokenizer = engine.load_policy(path, rt.device)
    chat = checkpoint["stage"] != "pretrain"
    name = model_name_of(path)
    app = create_app(model, tokenizer, chat, name, cfg, rt.device, rt.autocast)
    where = f"http://{cfg['host']}:{cfg['port']}"
    print(f"{path}: stage {checkpoint['stage']}, {model.num_params() / 1e6:.2f}M parameters, context "
          f"{model.config.block_size}, device {rt.device}; serving {name!r} at {where}/ "
          f"({'chat page and /v1/chat/completions' if chat else 'pretraining checkpoint: /v1/completions'})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg["host"], port=cfg["port"], log_level="warning")


if __name__ == "__main__":
    common.cli(main)
