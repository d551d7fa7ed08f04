#!/usr/bin/env python3
"""TEST DOUBLE — a fake OpenAI-compatible LLM server with fault knobs. Not an engine; stdlib only.

    python tests/fakes/fake_openai_server.py --port 8123 [--host 127.0.0.1] [knobs…]

It runs on a bare debootstrap'd python3 (the `kvt-test-engine` Docker image), as a local process
(the `process` runtime) or in-process (`make_server(opts).serve_forever()` in a thread).

Endpoints
  GET  /health                 200 once listening (503 while `--unhealthy-for` lasts)
  GET  /v1/models              {"data": [{"id": MODEL, ...}]}
  GET  /metrics                Prometheus text: vllm:kv_cache_usage_perc, fake:requests_total, …
  GET  /version                {"version": VERSION} (as vLLM's server answers it)
  POST /v1/completions         {"prompt": str, "max_tokens", "stream", "stream_options"}
  POST /v1/chat/completions    {"messages": [...], ...}
Replies are deterministic: the words of `--reply` (default "The quick brown fox jumps over the lazy
dog .") cut to max_tokens (finish_reason "length" when cut, else "stop"); one SSE chunk per word.
prompt_tokens = whitespace words of the prompt / message contents. Streaming follows OpenAI: `data: {…}`
chunks, a final usage chunk (choices: []) when `stream_options.include_usage` is true, then `data: [DONE]`.
Every completion response carries `"kvt_fake": {"request_index": i, "extras": {body fields this
server does not know, e.g. kv_press}}` so tests can check what the client sent.

Fault knobs (flag / environment variable; env applies when the flag is absent)
  --startup-delay S        FAKE_STARTUP_DELAY       sleep S seconds before listening (slow start)
  --unhealthy-for S        FAKE_UNHEALTHY_FOR       listen at once, but /health answers 503 for S seconds
  --exit-during-startup C  FAKE_EXIT_DURING_STARTUP print a few log lines, wait --startup-delay, exit with
                                                    code C without ever listening
  --crash-after N          FAKE_CRASH_AFTER         serve N completion requests; the (N+1)-th kills the
                                                    process (os._exit(--crash-code), connections drop)
  --crash-code C           FAKE_CRASH_CODE          exit code of that crash (default 17)
  --fail-first N           FAKE_FAIL_FIRST          the first N completion requests get --fail-status
  --fail-every K           FAKE_FAIL_EVERY          every K-th completion request gets --fail-status
  --fail-status S          FAKE_FAIL_STATUS         status of those failures (default 500; 400 for no-retry)
  --malformed-sse-every K  FAKE_MALFORMED_SSE_EVERY every K-th streaming request sends a broken
                                                    `data: {"id": …` line mid-stream (1 = all of them)
  --stall-every K          FAKE_STALL_EVERY         every K-th completion request stalls --stall-s seconds
                                                    after its first token (non-streaming: before replying)
  --stall-s S              FAKE_STALL_S             default 30
  --ttft S                 FAKE_TTFT                delay before the first token (default 0)
  --token-delay S          FAKE_TOKEN_DELAY         delay between tokens (default 0)
  --ignore-sigterm         FAKE_IGNORE_SIGTERM=1    ignore SIGTERM (tests the SIGKILL escalation)
  --spawn-child            FAKE_SPAWN_CHILD=1       start a sleeping child process in the same process
                                                    group (tests that stop kills the whole group)
  --no-health              FAKE_NO_HEALTH=1         /health answers 404 (no such route: llama-cpp-python's server)
  --no-usage               FAKE_NO_USAGE=1          never send usage, streaming or not (llama-cpp-python streams)
  --prefix-cache           FAKE_PREFIX_CACHE=1      a prompt seen before is "served from cache": TTFT 0 and
                                                    `timings.cache_n` = its prompt tokens (llama-server style;
                                                    0 for a new prompt); a body with cache_prompt false is
                                                    never served from it
  --model NAME             FAKE_MODEL               served model id (default "fake-model")
  --version V              FAKE_VERSION             what GET /version reports (default "0.0.0-fake")
  --reply TEXT             FAKE_REPLY               reply words
Request indexes count completion/chat requests only, from 1, across both endpoints.
SIGTERM (and SIGINT) → "shutting down" on stderr and exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KNOWN_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
                "temperature", "top_p", "n", "stop", "seed", "logprobs", "echo", "presence_penalty",
                "frequency_penalty", "user", "add_special_tokens", "skip_special_tokens", "ignore_eos"}


def log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} fake-openai-server: {msg}\n")
    sys.stderr.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    e = os.environ.get
    p = argparse.ArgumentParser(description="TEST DOUBLE: fake OpenAI-compatible server with fault knobs")
    p.add_argument("--host", default=e("FAKE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(e("FAKE_PORT", "8000")))
    p.add_argument("--model", default=e("FAKE_MODEL", "fake-model"))
    p.add_argument("--version", default=e("FAKE_VERSION", "0.0.0-fake"))
    p.add_argument("--reply", default=e("FAKE_REPLY", "The quick brown fox jumps over the lazy dog ."))
    p.add_argument("--startup-delay", type=float, default=float(e("FAKE_STARTUP_DELAY", "0")))
    p.add_argument("--unhealthy-for", type=float, default=float(e("FAKE_UNHEALTHY_FOR", "0")))
    p.add_argument("--exit-during-startup", type=int, default=_opt_int(e("FAKE_EXIT_DURING_STARTUP")))
    p.add_argument("--crash-after", type=int, default=_opt_int(e("FAKE_CRASH_AFTER")))
    p.add_argument("--crash-code", type=int, default=int(e("FAKE_CRASH_CODE", "17")))
    p.add_argument("--fail-first", type=int, default=int(e("FAKE_FAIL_FIRST", "0")))
    p.add_argument("--fail-every", type=int, default=int(e("FAKE_FAIL_EVERY", "0")))
    p.add_argument("--fail-status", type=int, default=int(e("FAKE_FAIL_STATUS", "500")))
    p.add_argument("--malformed-sse-every", type=int, default=int(e("FAKE_MALFORMED_SSE_EVERY", "0")))
    p.add_argument("--stall-every", type=int, default=int(e("FAKE_STALL_EVERY", "0")))
    p.add_argument("--stall-s", type=float, default=float(e("FAKE_STALL_S", "30")))
    p.add_argument("--ttft", type=float, default=float(e("FAKE_TTFT", "0")))
    p.add_argument("--token-delay", type=float, default=float(e("FAKE_TOKEN_DELAY", "0")))
    p.add_argument("--ignore-sigterm", action="store_true", default=e("FAKE_IGNORE_SIGTERM") == "1")
    p.add_argument("--spawn-child", action="store_true", default=e("FAKE_SPAWN_CHILD") == "1")
    p.add_argument("--no-health", action="store_true", default=e("FAKE_NO_HEALTH") == "1")
    p.add_argument("--no-usage", action="store_true", default=e("FAKE_NO_USAGE") == "1")
    p.add_argument("--prefix-cache", action="store_true", default=e("FAKE_PREFIX_CACHE") == "1")
    # logs the attention backend the way vLLM 0.33 does (platforms/cuda.py): pinned, or "chosen" FLASH_ATTN
    p.add_argument("--attention-backend", default=e("FAKE_ATTENTION_BACKEND"))
    return p.parse_args(argv)


def _opt_int(v: str | None) -> int | None:
    return int(v) if v not in (None, "") else None


class State:
    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.lock = threading.Lock()
        self.requests = 0        # completion/chat requests seen
        self.in_flight = 0
        self.completed = 0
        self.tokens_out = 0
        self.started = time.monotonic()
        self.seen_prompts: set[str] = set()

    def next_index(self) -> int:
        with self.lock:
            self.requests += 1
            return self.requests


def _every(k: int, i: int) -> bool:
    return k > 0 and i % k == 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    state: State  # set by make_server

    def log_message(self, fmt: str, *args: object) -> None:
        log(f"{self.address_string()} {fmt % args}")

    # ---- helpers
    def _json(self, code: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _text(self, code: int, text: str, ctype: str = "text/plain; version=0.0.4") -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # ---- GET
    def do_GET(self) -> None:  # noqa: N802
        st = self.state
        path = self.path.split("?", 1)[0]
        if path == "/health" and not st.opts.no_health:
            if time.monotonic() - st.started < st.opts.unhealthy_for:
                return self._text(503, "starting", "text/plain")
            return self._text(200, "", "text/plain")
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": st.opts.model, "object": "model", "created": 0, "owned_by": "kvt-fake", "max_model_len": 1 << 20}]})
        if path == "/version":
            return self._json(200, {"version": st.opts.version})
        if path == "/metrics":
            with st.lock:
                usage = min(1.0, st.in_flight / 16)
                lines = [
                    "# HELP vllm:kv_cache_usage_perc KV-cache usage (fake: in-flight/16).",
                    "# TYPE vllm:kv_cache_usage_perc gauge",
                    f'vllm:kv_cache_usage_perc{{model_name="{st.opts.model}"}} {usage}',
                    "# TYPE fake:kv_cache_usage_perc gauge",
                    f"fake:kv_cache_usage_perc {usage}",
                    "# TYPE fake:requests_total counter",
                    f"fake:requests_total {st.requests}",
                    "# TYPE fake:requests_running gauge",
                    f"fake:requests_running {st.in_flight}",
                    "# TYPE fake:generation_tokens_total counter",
                    f"fake:generation_tokens_total {st.tokens_out}",
                ]
            return self._text(200, "\n".join(lines) + "\n")
        return self._json(404, {"error": {"message": f"no route {path}", "type": "not_found", "code": 404}})

    # ---- POST
    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self._json(404, {"error": {"message": f"no route {path}", "type": "not_found", "code": 404}})
        n = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return self._json(400, {"error": {"message": "body is not a JSON object", "type": "invalid_request_error"}})
        st, o = self.state, self.state.opts
        i = st.next_index()
        if o.crash_after is not None and i > o.crash_after:
            log(f"request {i}: crashing now (--crash-after {o.crash_after}), exit {o.crash_code}")
            os._exit(o.crash_code)
        if i <= o.fail_first or _every(o.fail_every, i):
            log(f"request {i}: injected HTTP {o.fail_status}")
            return self._json(o.fail_status, {"error": {"message": f"injected failure (request {i})",
                                                        "type": "fake_injected_error", "code": o.fail_status}})
        chat = path.endswith("chat/completions")
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list):
                return self._json(400, {"error": {"message": "messages must be a list", "type": "invalid_request_error"}})
            prompt = " ".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return self._json(400, {"error": {"message": "prompt must be a string", "type": "invalid_request_error"}})
        words = o.reply.split()
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = int(max_tokens) if isinstance(max_tokens, (int, float)) else 16
        out = words[:max(0, max_tokens)]
        finish = "length" if len(out) < len(words) else "stop"
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(out),
                 "total_tokens": len(prompt.split()) + len(out)}
        extras = {k: v for k, v in body.items() if k not in KNOWN_FIELDS}
        meta = {"request_index": i, "extras": extras}
        timings = None
        if o.prefix_cache:
            with st.lock:
                hit = prompt in st.seen_prompts and body.get("cache_prompt", True) is not False
                st.seen_prompts.add(prompt)
            timings = {"cache_n": usage["prompt_tokens"] if hit else 0,
                       "prompt_n": 0 if hit else usage["prompt_tokens"]}
            meta["cache_hit"] = hit
        if o.no_usage:
            usage = None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake-{i}"
        obj = "chat.completion" if chat else "text_completion"
        stall = _every(o.stall_every, i)
        with st.lock:
            st.in_flight += 1
        try:
            if body.get("stream"):
                self._stream(i, rid, chat, obj, out, finish, usage, meta, body, stall, timings)
            else:
                if o.ttft and not meta.get("cache_hit"):
                    time.sleep(o.ttft)
                if stall:
                    log(f"request {i}: stalling {o.stall_s}s")
                    time.sleep(o.stall_s)
                if o.token_delay and len(out) > 1:
                    time.sleep(o.token_delay * (len(out) - 1))
                text = " ".join(out)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                          if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
                resp = {"id": rid, "object": obj, "created": int(time.time()), "model": o.model,
                        "choices": [choice], "usage": usage, "kvt_fake": meta}
                if usage is None:
                    del resp["usage"]
                if timings is not None:
                    resp["timings"] = timings
                self._json(200, resp)
            with st.lock:
                st.completed += 1
                st.tokens_out += len(out)
        except (BrokenPipeError, ConnectionResetError):
            log(f"request {i}: client went away")
        finally:
            with st.lock:
                st.in_flight -= 1

    def _stream(self, i: int, rid: str, chat: bool, obj: str, out: list[str], finish: str, usage: dict,
                meta: dict, body: dict, stall: bool, timings: dict | None = None) -> None:
        o = self.state.opts
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def event(choices: list, extra: dict | None = None) -> None:
            d = {"id": rid, "object": chunk_obj, "created": created, "model": o.model, "choices": choices}
            d.update(extra or {})
            self._chunk(b"data: " + json.dumps(d).encode() + b"\n\n")

        if o.ttft and not meta.get("cache_hit"):
            time.sleep(o.ttft)
        if chat:
            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        malformed = _every(o.malformed_sse_every, i)
        for k, w in enumerate(out):
            if k and o.token_delay:
                time.sleep(o.token_delay)
            piece = w if k == 0 else " " + w
            last = k == len(out) - 1
            fr = finish if last else None
            event([{"index": 0, "delta": {"content": piece}, "finish_reason": fr} if chat else
                   {"index": 0, "text": piece, "finish_reason": fr, "logprobs": None}],
                  {"kvt_fake": meta} if k == 0 else None)
            if k == 0 and stall:
                log(f"request {i}: stalling {o.stall_s}s mid-stream")
                time.sleep(o.stall_s)
            if k == 0 and malformed:
                log(f"request {i}: sending a malformed SSE event")
                self._chunk(b'data: {"id": "' + rid.encode() + b'", "choices": [{"ind\n\n')
        if not out:
            event([{"index": 0, "delta": {}, "finish_reason": finish} if chat else
                   {"index": 0, "text": "", "finish_reason": finish, "logprobs": None}], {"kvt_fake": meta})
        so = body.get("stream_options")
        if usage is not None and isinstance(so, dict) and so.get("include_usage"):
            event([], {"usage": usage})
        if timings is not None:
            event([], {"timings": timings})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")  # end of chunked body


def make_server(opts: argparse.Namespace) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"state": State(opts)})
    ThreadingHTTPServer.allow_reuse_address = True
    srv = ThreadingHTTPServer((opts.host, opts.port), handler)
    srv.daemon_threads = True
    return srv


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    log(f"TEST DOUBLE starting (pid {os.getpid()}, model {opts.model!r}, port {opts.port})")
    if opts.attention_backend:
        log(f"INFO [cuda.py:448] Using AttentionBackendEnum.{opts.attention_backend.upper()} backend.")
    else:
        log("INFO [cuda.py:509] Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN', "
            "'FLASHINFER', 'TRITON_ATTN'].")
    if opts.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        log(f"spawned child pid {child.pid}")
    if opts.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def _term(signum: int, frame: object) -> None:
            log(f"signal {signum}: shutting down")
            sys.stderr.flush()
            os._exit(0)
        signal.signal(signal.SIGTERM, _term)
        signal.signal(signal.SIGINT, _term)
    if opts.exit_during_startup is not None:
        for k in range(3):
            log(f"loading fake weights shard {k + 1}/3")
        time.sleep(opts.startup_delay)
        log(f"fatal: injected startup failure, exit {opts.exit_during_startup}")
        return opts.exit_during_startup
    if opts.startup_delay:
        log(f"slow start: {opts.startup_delay}s before listening")
        time.sleep(opts.startup_delay)
    srv = make_server(opts)
    log(f"listening on http://{opts.host}:{srv.server_address[1]}")
    try:
        srv.serve_forever(poll_interval=0.1)
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
