"""FastAPI app: OpenAI-compatible endpoints, one generation worker thread (continuous batching), Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from .cli import EngineConfig
from .methods import PressSpec, PressSpecError, resolve_press_spec
from .metrics import Metrics, engine_metrics
from .protocol import ChatRequest, CompletionRequest, error_body, validation_message

log = logging.getLogger("kvpress_engine")


def err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code if code is not None else status), status_code=status)


@dataclass
class Job:
    kind: str  # "completion" | "chat"
    req: Any
    spec: PressSpec
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    enc: Any = None  # set by the worker: the encoded prompt
    max_new: int = 0
    key: Any = None  # engine.prefill_key: jobs with equal keys can share one prefill pass

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)



def _emit_error(job, e: BaseException, what: str | None) -> None:
    """Answer a job's failure: 400 for a bad request or press (the request's fault, with its param), else 500
    (logged with ``what``; ``None``: the caller logged it)."""
    from .engine import RequestError

    if isinstance(e, RequestError):
        job.emit("error", 400, e.message, e.param, e.code)
    elif isinstance(e, PressSpecError):
        job.emit("error", 400, e.message, e.param, None)
    else:
        if what is not None:
            log.error("%s", what, exc_info=e)
        job.emit("error", 500, f"internal error: {type(e).__name__}: {e}", None, None)

class State:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.metrics: Metrics = engine_metrics()
        self.engine = None
        self.ready = False
        self.status = "loading"
        self.fatal: str | None = None
        self.served_name: str | None = cfg.served_model_name
        self.max_model_len: int | None = None
        self.info: dict[str, Any] = {}
        self.jobs: queue.Queue = queue.Queue()
        self._count_lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.created = int(time.time())
        self.on_fatal = None  # set by __main__: stop the server
        self.batch = None

    # queue accounting -------------------------------------------------------------------------------------
    def _gauges(self) -> None:
        self.metrics.set("num_requests_waiting", self.waiting)
        self.metrics.set("num_requests_running", self.running)
        self.metrics.set("queue_depth", self.waiting + self.running)

    def submit(self, job: Job) -> None:
        with self._count_lock:
            self.waiting += 1
            self._gauges()
        self.jobs.put(job)

    # loading ----------------------------------------------------------------------------------------------
    def load(self) -> None:
        from . import loader

        cfg = self.cfg
        try:
            import torch

            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            src = loader.resolve_model_source(cfg.model, cfg.gguf_file)
            if self.served_name is None:
                self.served_name = src.name
            loaded = loader.load(
                src,
                device=cfg.device,
                dtype=cfg.dtype,
                attn_implementation=cfg.attn_implementation,
                cache_dir=cfg.cache_dir,
                use_cache=not cfg.no_cache,
                max_model_len=cfg.max_model_len,
                random_weights=cfg.random_weights,
            )
            from .engine import Encoded, Engine

            limit = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
            if cfg.max_model_len:
                if limit and cfg.max_model_len > limit:
                    raise loader.ModelError(
                        f"--max-model-len {cfg.max_model_len} exceeds the model's max_position_embeddings {limit}"
                    )
                limit = cfg.max_model_len
            if not limit:
                raise loader.ModelError("the model config has no max_position_embeddings; pass --max-model-len")
            engine = Engine(
                loaded.model,
                loaded.tokenizer,
                device=loaded.device,
                max_model_len=limit,
                attn_implementation=loaded.attn_implementation,
                name=self.served_name,
                step_mode=cfg.decode_step,
                static_attn=cfg.static_attn,
                kv_limit_bytes=int(cfg.kv_cache_limit_gib * 2**30) if cfg.kv_cache_limit_gib else None,
            )
            t = time.perf_counter()
            if cfg.warmup:
                ids = loaded.tokenizer.encode("Warm-up: the quick brown fox jumps over the lazy dog.")
                engine.generate(Encoded(ids, None), PressSpec(), 2)
            warm_s = time.perf_counter() - t
            self.engine = engine
            self.max_model_len = limit
            self.info = {
                "model": self.served_name,
                "loaded_from": loaded.loaded_from,
                "from_cache": loaded.from_cache,
                "device": loaded.device,
                "dtype": loaded.dtype,
                "attn_implementation": loaded.attn_implementation,
                "max_model_len": limit,
                "load_s": round(loaded.load_s, 3),
                "warmup_s": round(warm_s, 3),
                "default_kv_press": _spec_dict(cfg.default_press),
                "max_batch": cfg.max_batch,
                "decode_step": engine.step_mode,
                "static_attn": engine.static_attn,
                "kv_cache_limit_gib": cfg.kv_cache_limit_gib,
                "random_weights": cfg.random_weights,
            }
            threading.Thread(target=self._worker, name="kvpress-worker", daemon=True).start()
            self.ready, self.status = True, "ok"
            log.info("ready: %s", json.dumps(self.info))
        except Exception as e:  # noqa: BLE001 - any load failure is fatal for the process
            from .loader import ModelError

            msg = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, ModelError):
                log.exception("model load failed")
            log.error("FATAL: %s", msg)
            self.fatal, self.status = msg, "failed"
            if self.on_fatal is not None:
                self.on_fatal()

    # the generation worker ---------------------------------------------------------------------------------
    def _worker(self) -> None:
        """Continuous batching: between two decoding steps, admit waiting requests (their prefill), then step
        every active sequence once. Requests of the same prompt waiting together (or arriving within
        --fanout-wait-ms of the first) are admitted together with ONE fan-out prefill. Requests whose press
        hooks the decoding steps decode alone (the batch waits for them)."""
        from collections import deque

        eng = self.engine
        batch = eng.new_batch(self.cfg.max_batch)
        self.batch = batch
        self._graphs_seen = (0, 0.0)
        self.metrics.set("max_batch", self.cfg.max_batch)
        pending: deque = deque()  # encoded jobs, in arrival order
        ready: deque = deque()  # prefilled sequences waiting for a row of the batch
        while True:
            while ready and batch.can_join(ready[0]):
                batch.join(ready.popleft())
            if not ready:
                if not batch.active and not pending:
                    self._take(self.jobs.get(), pending)
                if not batch.full():
                    self._drain(pending)
                if pending and not batch.full():
                    head = pending[0]
                    if self.cfg.fanout_max > 1:  # wait a little for the rest of this prompt's requests
                        self._drain(pending, until=head.arrived + self.cfg.fanout_wait_s)
                    group = [j for j in pending if j.key == head.key][: self.cfg.fanout_max]
                    for j in group:
                        pending.remove(j)
                    self._admit_group(group, batch, ready)
            if batch.active:
                self.metrics.set("batch_size", len(batch))
                try:
                    finished = batch.step()
                except Exception as e:  # noqa: BLE001 - a failed step fails every sequence in it
                    log.exception("decoding step failed")
                    for act in list(batch.active):
                        batch._leave(act)
                        _emit_error(act.job, e, None)  # logged once above
                        self._release()
                    continue
                self.metrics.inc("decode_steps_total", 1)
                self.metrics.inc("batch_size_sum", len(batch) + len(finished))
                if not batch.active:
                    self.metrics.set("batch_size", 0)  # idle (before the results go out: a client may read it next)
                for act in finished:
                    self._deliver(act)
                self._live()
            else:
                self.metrics.set("batch_size", 0)

    def _drain(self, pending, until: float | None = None) -> None:
        """Move queued jobs into ``pending`` (encoded): those queued now, and with ``until`` those arriving
        before that monotonic time."""
        while True:
            left = (until - time.monotonic()) if until is not None else 0
            try:
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                return
            self._take(job, pending)

    def _take(self, job: Job, pending) -> None:
        with self._count_lock:
            self.waiting -= 1
            self.running += 1
            self._gauges()
        if self._encode(job):
            pending.append(job)
        else:
            self._release()

    def _encode(self, job: Job) -> bool:
        """Tokenize a job taken off the queue (False: it was answered with an error and is done)."""
        eng, req = self.engine, job.req
        try:
            if job.cancel.is_set():
                job.emit("error", 499, "client went away", None, None)
                return False
            separate = job.spec.scope == "kvpress_pipeline"
            if job.kind == "completion":
                job.enc = eng.encode_completion(req.prompt, job.spec.question_start, separate)
                max_req = req.max_tokens
            else:
                msgs = [m.model_dump() for m in req.messages]
                job.enc = eng.encode_chat(msgs, job.spec.question_start, separate)
                max_req = req.max_completion_tokens or req.max_tokens
            job.max_new = eng.check_length(len(job.enc.ids), max_req, self.cfg.default_max_tokens)
            job.key = eng.prefill_key(job.enc, job.spec)
            return True
        except Exception as e:  # noqa: BLE001 - answered as an OpenAI error
            _emit_error(job, e, "tokenization failed")
        return False

    def _release(self) -> None:
        with self._count_lock:
            self.running -= 1
            self._gauges()
        self._live()

    def _live(self) -> None:
        eng = self.engine
        self.metrics.set("kv_cache_tokens", eng.live_kv_tokens)
        self.metrics.set("kv_cache_bytes", eng.live_kv_bytes)
        self.metrics.set("kv_cache_usage_perc", eng.live_kv_tokens / self.max_model_len)
        b = getattr(self, "batch", None)
        self.metrics.set("kv_cache_allocated_bytes", b.cache.allocated_bytes() if b is not None else 0)
        g = b.graphs if b is not None else None
        if g is not None and g.captures != self._graphs_seen[0]:  # counters: add what is new since last time
            self.metrics.inc("cuda_graph_captures_total", g.captures - self._graphs_seen[0])
            self.metrics.inc("cuda_graph_capture_seconds_total", g.capture_s - self._graphs_seen[1])
            self._graphs_seen = (g.captures, g.capture_s)

    def _deliver(self, act) -> None:
        job = act.job
        try:
            res = self.engine.result(act)
            self._account(res)
            job.emit("done", res)
        except Exception as e:  # noqa: BLE001 - answered as an OpenAI error
            _emit_error(job, e, "generation failed")
        self._release()

    def _admit_group(self, group: list[Job], batch, ready) -> None:
        """Prefill a group of jobs with the same prefill input (one fan-out pass when there are several), then
        each in turn: into the batch (or the ready queue when the batch is full), decoded alone, or done."""
        from .engine import Variant

        eng = self.engine
        for job in group:
            job.emit("started", len(job.enc.ids))

        def on_delta(job: Job):
            return lambda text: job.emit("delta", text)

        try:
            if len(group) == 1:
                j = group[0]
                try:
                    pairs: list = [(eng.prefill(j.enc, j.spec, j.max_new, stop=j.req.stop, ignore_eos=j.req.ignore_eos,
                                                on_delta=on_delta(j), cancelled=j.cancel.is_set), None)]
                except Exception as e:  # noqa: BLE001 - reported below
                    pairs = [(e, None)]
            else:
                pairs = eng.prefill_group(group[0].enc, [
                    Variant(j.spec, j.max_new, j.req.stop, j.req.ignore_eos, on_delta(j), j.cancel.is_set)
                    for j in group], fanout_max=self.cfg.fanout_max)
        except Exception as e:  # noqa: BLE001
            pairs = [(e, None)] * len(group)
        for job, (act, pf) in zip(group, pairs):
            try:
                if isinstance(act, BaseException):
                    raise act
                if pf is not None:
                    eng.resume(act, pf)
                act.job = job
                if not act.done:
                    if act.batch_reason is None:
                        if ready or not batch.can_join(act):  # first come, first joined
                            if not batch.full():  # a free row, but its KV room does not fit yet
                                self.metrics.inc("kv_admission_deferred_total", 1)
                                log.info("request waits for KV memory before joining the batch (%d decoding, "
                                         "%d B in slots)", len(batch), batch.cache.allocated_bytes())
                            ready.append(act)
                        else:
                            batch.join(act)
                        continue
                    eng.decode_alone(act)
                res = eng.result(act)
                self._account(res)
                job.emit("done", res)
            except Exception as e:  # noqa: BLE001 - answered as an OpenAI error
                _emit_error(job, e, "generation failed")
            self._release()

    def _account(self, res) -> None:
        m, a = self.metrics, res.applied
        m.inc("prompt_tokens_total", res.prompt_tokens)
        m.inc("generation_tokens_total", res.completion_tokens)
        m.inc("kv_tokens_offered_total", a["kv_tokens_before"])
        m.inc("kv_tokens_kept_total", a["kv_tokens_after"])
        m.set("kv_tokens_offered_last", a["kv_tokens_before"])
        m.set("kv_tokens_kept_last", a["kv_tokens_after"])
        m.set("kv_bytes_after_compression_last", a["kv_bytes_after"])
        m.inc("kv_bytes_after_compression_total", a["kv_bytes_after"])
        m.inc("prefill_seconds_total", a["prefill_s"])
        m.inc("decode_seconds_total", a["decode_s"])
        m.inc("press_seconds_total", a["press_s"])
        m.set("prefill_seconds_last", a["prefill_s"])
        m.set("decode_seconds_last", a["decode_s"])


def _spec_dict(spec: PressSpec) -> dict[str, Any]:
    return {
        "method": spec.method,
        "compression_ratio": spec.compression_ratio,
        "budget": spec.budget,
        "scope": spec.scope,
        "params": spec.params,
        "press": spec.node.to_dict() if spec.node is not None else None,
    }


def create_app(cfg: EngineConfig) -> tuple[FastAPI, State]:
    state = State(cfg)
    app = FastAPI(title="kv-transition kvpress engine", docs_url=None, redoc_url=None)

    def count(endpoint: str, status: int) -> None:
        state.metrics.inc("requests_total", 1, {"endpoint": endpoint, "status": str(status)})

    @app.exception_handler(404)
    async def not_found(_request: Request, _exc):
        return err(404, "not found", "not_found_error")

    @app.exception_handler(405)
    async def not_allowed(_request: Request, _exc):
        return err(405, "method not allowed", "invalid_request_error")

    @app.get("/health")
    async def health():
        if state.ready:
            return JSONResponse({"status": "ok", **state.info})
        body = {"status": state.status}
        if state.fatal:
            body["error"] = state.fatal
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models():
        if not state.ready:
            return err(503, "the model is still loading", "service_unavailable_error")
        return {
            "object": "list",
            "data": [
                {
                    "id": state.served_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "kv-transition",
                    "root": state.info.get("loaded_from"),
                    "max_model_len": state.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def handle(request: Request, kind: str) -> Response:
        endpoint = "completions" if kind == "completion" else "chat_completions"
        resp = await _handle(request, kind)
        count(endpoint, resp.status_code)
        return resp

    async def _handle(request: Request, kind: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            return err(400, f"the body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return err(400, "the body must be a JSON object")
        try:
            req = (CompletionRequest if kind == "completion" else ChatRequest).model_validate(body)
        except ValidationError as e:
            msg, param = validation_message(e)
            return err(400, msg, param=param)
        try:
            spec = resolve_press_spec(cfg.default_press, req.kv_press)
        except PressSpecError as e:
            return err(400, e.message, param=e.param)
        if not state.ready:
            return err(503, "the model is still loading; poll /health", "service_unavailable_error")
        if req.model is not None and req.model != state.served_name:
            return err(
                404, f"the model `{req.model}` does not exist; this server serves `{state.served_name}`",
                param="model", code="model_not_found",
            )
        job = Job(kind, req, spec, asyncio.get_running_loop())
        state.submit(job)
        try:
            first = await job.events.get()
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if first[0] == "error":
            _, status, message, param, code = first
            return err(status, message, "invalid_request_error" if status < 500 else "internal_error", param, code)
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, kind, rid, created, include_usage), media_type="text/event-stream"
            )
        try:
            while True:
                ev = await job.events.get()
                if ev[0] == "error":
                    _, status, message, param, code = ev
                    kind_ = "internal_error" if status >= 500 else "invalid_request_error"
                    return err(status, message, kind_, param, code)
                if ev[0] == "done":
                    res = ev[1]
                    break
        except asyncio.CancelledError:  # the client went away: stop generating for it
            job.cancel.set()
            raise
        usage = _usage(res)
        if kind == "completion":
            body = {
                "id": rid, "object": "text_completion", "created": created, "model": state.served_name,
                "choices": [{"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}],
            }
        else:
            body = {
                "id": rid, "object": "chat.completion", "created": created, "model": state.served_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": res.text},
                        "logprobs": None,
                        "finish_reason": res.finish_reason,
                    }
                ],
            }
        body["usage"] = usage
        body["kv_press_applied"] = res.applied
        return JSONResponse(body)

    async def _stream(job: Job, kind: str, rid: str, created: int, include_usage: bool):
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"

        def chunk(choices: list, **extra) -> str:
            c = {"id": rid, "object": obj, "created": created, "model": state.served_name, "choices": choices}
            if include_usage:
                c["usage"] = None
            c.update(extra)
            return f"data: {json.dumps(c)}\n\n"

        def choice(delta_text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "completion":
                return {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if delta_text is not None:
                delta["content"] = delta_text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        finished = False
        try:
            if kind == "chat":
                yield chunk([choice("", None, first=True)])
            while True:
                ev = await job.events.get()
                if ev[0] == "delta":
                    yield chunk([choice(ev[1], None)])
                elif ev[0] == "error":
                    _, status, message, param, code = ev
                    yield f"data: {json.dumps(error_body(message, 'internal_error', param, code or status))}\n\n"
                    break
                else:
                    res = ev[1]
                    yield chunk(
                        [choice(None if kind == "chat" else "", res.finish_reason)], kv_press_applied=res.applied
                    )
                    if include_usage:
                        c = {
                            "id": rid, "object": obj, "created": created, "model": state.served_name,
                            "choices": [], "usage": _usage(res), "kv_press_applied": res.applied,
                        }
                        yield f"data: {json.dumps(c)}\n\n"
                    break
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                job.cancel.set()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    return app, state


def _usage(res) -> dict[str, int]:
    return {
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "total_tokens": res.prompt_tokens + res.completion_tokens,
    }
