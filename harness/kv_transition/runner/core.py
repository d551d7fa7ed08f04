"""The async request loop: a fixed pool of `concurrency` workers over the work list, tenacity retries
(exponential backoff with jitter) on connection errors, timeouts, malformed streams and 5xx, none on
4xx. Every attempt becomes an `attempts` row; a success a `responses` row; the request's status is
updated — all through the DbWriter, so the loop never waits on SQLite."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from kv_transition.db import utcnow
from kv_transition.runner.client import complete, make_client
from kv_transition.runner.stream import AttemptError, Completion, tpot
from kv_transition.runner.writer import DbWriter


@dataclass
class FollowupRequest:
    """The second request of a two-request example, built from the first response's text."""
    body: dict[str, Any]
    prompt: str
    prompt_tokens: Optional[int] = None  # the harness tokenizer's count of `prompt`
    truncated: bool = False


@dataclass
class WorkItem:
    request_id: int
    example_id: str
    repeat: int
    body: dict[str, Any]
    attempts_before: int = 0  # attempts recorded by earlier runs (attempt_no continues from here)
    prompt_tokens: Optional[int] = None  # the harness tokenizer's count of the prompt (manifest final_tokens)
    # a two-request example (LongBench v2 chain of thought): first response text → the follow-up request
    # (None: nothing more to send, e.g. an empty first response); its response goes to `followups`
    followup: Optional[Callable[[str], Optional[FollowupRequest]]] = None
    first_text: Optional[str] = None  # the first response, recorded by an earlier run: send only the follow-up
    followup_attempts_before: int = 0  # step-2 attempts recorded by earlier runs


@dataclass
class _ItemState:
    n: int                 # the item's last attempt_no (continues across steps and runs)
    step: int = 1
    resent: bool = False   # of the last successful attempt
    busted: bool = False


#: attempt errors where the server's side of the story is in its log
BROKEN_STREAM = frozenset({"connection", "interrupted", "incomplete", "stall", "http_5xx", "stream_error"})

#: a response whose reported cached prompt tokens exceed this fraction of the prompt is cache-served
CACHE_SERVED_FRACTION = 0.5


def cache_flag(prompt_tokens: Optional[int], cached: Optional[int], resent: bool, busted: bool) -> Optional[str]:
    """Why this response's latency must not count as a prefill measurement, or None:
    `cached` — the engine says it served more than half of the prompt from its cache;
    `unprotected` — a retry or repeat of a prompt sent without a cache-busting knob (the engine has none)
    and the engine reports no cached-token count that could clear it."""
    if cached is not None and prompt_tokens and cached > CACHE_SERVED_FRACTION * prompt_tokens:
        return "cached"
    if resent and not busted and cached is None:
        return "unprotected"
    return None


def _with_bust(body: dict[str, Any], bust: dict[str, Any], nonce: str) -> dict[str, Any]:
    out = dict(body)
    for k, v in bust.items():
        out[k] = nonce if v == "{nonce}" else v
    return out


@dataclass
class RunnerOptions:
    concurrency: int = 8
    timeout_s: float = 600.0          # whole request, first byte to last
    stall_timeout_s: Optional[float] = None  # silence between two reads; None = timeout_s
    max_retries: int = 3              # retries after the first attempt
    backoff_s: float = 1.0            # first backoff (exponential, plus up to this much jitter)
    backoff_max_s: float = 30.0
    stream: bool = True
    connect_timeout_s: float = 10.0


@dataclass
class Counters:
    total: int = 0
    ok: int = 0
    failed: int = 0
    in_flight: int = 0
    attempts: int = 0
    retries: int = 0
    completion_tokens: int = 0
    max_in_flight: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def tokens_per_s(self) -> float:
        el = time.perf_counter() - self.started
        return self.completion_tokens / el if el > 0 else 0.0


@dataclass
class RunStats:
    n_todo: int
    n_ok: int
    n_failed: int
    n_not_done: int          # never finished (aborted / interrupted)
    n_attempts: int
    n_retries: int
    completion_tokens: int
    elapsed_s: float
    max_in_flight: int
    aborted: Optional[str] = None


def _retryable(e: BaseException) -> bool:
    return isinstance(e, AttemptError) and e.retryable


class Aborted(Exception):
    pass


class Runner:
    def __init__(self, base_url: str, writer: DbWriter, run_id: int, options: RunnerOptions, *,
                 transport: Optional[httpx.AsyncBaseTransport] = None,
                 on_tick: Optional[Callable[[Counters], None]] = None, tick_s: float = 0.2,
                 cache_bust: Optional[dict[str, Any]] = None, count_tokens: Optional[Callable[[str], Optional[int]]] = None,
                 bust_all: bool = False, server_log: Optional[Callable[[], str]] = None,
                 gate: Optional[Any] = None,
                 on_attempt: Optional[Callable[[int, int, int, str, bool], None]] = None):
        """`cache_bust`: body fields that keep a retry or a repeat > 0 from the engine's prefix cache
        ("{nonce}" = unique per attempt) — with `bust_all`, into every request (a server someone else runs
        may hold any prompt from earlier cells); `count_tokens`: the model's tokenizer, for responses whose
        server reports no completion token count (recorded with token_source 'harness'); `gate`: a
        runner.gate.CellGate — each request waits for its turn in the group's example-major order."""
        self.gate = gate
        self.cache_bust = dict(cache_bust or {})
        self.bust_all = bust_all
        self.server_log = server_log  # the engine log's last lines, kept with a broken stream's attempt
        self.count_tokens = count_tokens
        self.on_attempt = on_attempt  # (run_id, request_id, attempt_no, started_at, began): a remote group's in-flight set
        self.base_url = base_url
        self.writer = writer
        self.run_id = run_id
        self.opts = options
        self.transport = transport
        self.on_tick = on_tick
        self.tick_s = tick_s
        self.counters = Counters()
        self._abort_reason: Optional[str] = None
        self._abort_ev: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._lock = threading.Lock()

    # --- abort from any thread (engine watchdog, signal handler) ---
    def abort(self, reason: str) -> None:
        with self._lock:
            if self._abort_reason is None:
                self._abort_reason = reason
        loop, ev = self._loop, self._abort_ev
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass

    @property
    def aborted(self) -> Optional[str]:
        return self._abort_reason

    async def run(self, items: Sequence[WorkItem]) -> RunStats:
        self._loop = asyncio.get_running_loop()
        self._abort_ev = asyncio.Event()
        if self._abort_reason is not None:
            self._abort_ev.set()
        c = self.counters
        c.total = len(items)
        c.started = time.perf_counter()
        it: Iterator[WorkItem] = iter(items)
        n_workers = max(1, min(self.opts.concurrency, len(items)))
        stall = self.opts.stall_timeout_s or self.opts.timeout_s
        ticker = asyncio.create_task(self._ticker()) if self.on_tick else None
        async with make_client(self.base_url, n_workers, connect_timeout_s=self.opts.connect_timeout_s,
                               stall_timeout_s=stall, transport=self.transport) as client:
            workers = [asyncio.create_task(self._worker(client, it)) for _ in range(n_workers if items else 0)]
            abort_wait = asyncio.create_task(self._abort_ev.wait())
            try:
                pending = set(workers)
                while pending:
                    done, pending = await asyncio.wait(pending | {abort_wait}, return_when=asyncio.FIRST_COMPLETED)
                    pending.discard(abort_wait)
                    for t in done:
                        if t is not abort_wait and t.exception() is not None:
                            raise t.exception()  # type: ignore[misc]
                    if abort_wait in done:
                        for t in pending:
                            t.cancel()
                        await asyncio.gather(*pending, return_exceptions=True)
                        break
            finally:
                for t in workers:
                    t.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                abort_wait.cancel()
                if ticker:
                    ticker.cancel()
                    await asyncio.gather(ticker, return_exceptions=True)
                    self.on_tick(c)  # type: ignore[misc]
        return RunStats(
            n_todo=c.total, n_ok=c.ok, n_failed=c.failed, n_not_done=c.total - c.ok - c.failed,
            n_attempts=c.attempts, n_retries=c.retries, completion_tokens=c.completion_tokens,
            elapsed_s=time.perf_counter() - c.started, max_in_flight=c.max_in_flight, aborted=self._abort_reason,
        )

    async def _ticker(self) -> None:
        while True:
            self.on_tick(self.counters)  # type: ignore[misc]
            await asyncio.sleep(self.tick_s)

    async def _worker(self, client: httpx.AsyncClient, it: Iterator[WorkItem]) -> None:
        for item in it:
            if self._abort_reason is not None:
                return
            if self.gate is None:
                await self._do(client, item)
                continue
            try:
                await self.gate.wait(item, lambda: self._abort_reason is not None)
                if self._abort_reason is not None:
                    return
                await self._do(client, item)
            finally:
                self.gate.done(item)

    async def _do(self, client: httpx.AsyncClient, item: WorkItem) -> None:
        """One work item: its request, then — for a two-request example — its follow-up, built from the
        first response (recorded first, so a run killed in between sends only the follow-up next time).
        The request becomes `ok` when its last request has its response."""
        st = _ItemState(n=item.attempts_before)
        try:
            if item.followup is None or item.first_text is None:
                res = await self._send(client, item, 1, item.body, item.prompt_tokens, st,
                                       item.attempts_before - item.followup_attempts_before)
                self._record_response(item, st.n, res, st.resent, st.busted, "responses", item.prompt_tokens)
                first = res.text
            else:
                first = item.first_text
            if item.followup is not None:
                st.step = 2
                try:
                    fu = item.followup(first)
                except Exception as e:  # noqa: BLE001 - e.g. a follow-up prompt that cannot fit max_context
                    raise AttemptError("followup", f"cannot build the follow-up request: {e}", retryable=False) from None
                if fu is not None:  # None: nothing to ask (an empty first response: pred.py skips the example)
                    res = await self._send(client, item, 2, fu.body, fu.prompt_tokens, st, item.followup_attempts_before)
                    self._record_response(item, st.n, res, st.resent, st.busted, "followups", fu.prompt_tokens,
                                          {"prompt": fu.prompt, "prompt_truncated": int(fu.truncated)})
            self.counters.ok += 1
            self.writer.update("requests", "request_id", {
                "request_id": item.request_id, "status": "ok", "n_attempts": st.n, "last_error": None,
                "updated_at": utcnow()})
        except AttemptError as e:
            self.counters.failed += 1
            where = "follow-up request: " if st.step == 2 else ""
            self.writer.update("requests", "request_id", {
                "request_id": item.request_id, "status": "failed", "n_attempts": st.n,
                "last_error": f"{where}{e.kind}: {e}"[:2000], "updated_at": utcnow()})
        except Aborted:
            self.writer.update("requests", "request_id",
                               {"request_id": item.request_id, "n_attempts": st.n, "updated_at": utcnow()})

    async def _send(self, client: httpx.AsyncClient, item: WorkItem, step: int, body: dict[str, Any],
                    prompt_tokens: Optional[int], st: "_ItemState", before: int) -> Completion:
        """One request of an item, with retries: → its completion, or AttemptError after the last try.
        `before`: attempts of this step recorded by earlier runs (a resend may meet the prefix cache)."""
        o = self.opts
        k = before
        # the first attempt runs outside tenacity (its per-iteration machinery costs ~0.1 ms):
        # most requests succeed first time; a failure is replayed into tenacity as its attempt 1
        first_err: Optional[AttemptError] = None
        if self._abort_reason is not None:
            raise Aborted(self._abort_reason)
        st.n += 1
        k += 1
        try:
            return await self._attempt(client, item, st, step, body, k > 1 or item.repeat > 0)
        except AttemptError as e:
            if not e.retryable or o.max_retries == 0:
                raise
            first_err = e
        retrying = AsyncRetrying(
            stop=stop_after_attempt(o.max_retries + 1),
            wait=wait_exponential_jitter(multiplier=o.backoff_s, max=o.backoff_max_s, jitter=o.backoff_s),
            retry=retry_if_exception(_retryable), reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if first_err is not None:
                    err, first_err = first_err, None
                    raise err
                if self._abort_reason is not None:
                    raise Aborted(self._abort_reason)
                self.counters.retries += 1
                st.n += 1
                k += 1
                return await self._attempt(client, item, st, step, body, True)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    async def _attempt(self, client: httpx.AsyncClient, item: WorkItem, st: "_ItemState", step: int,
                       body: dict[str, Any], resent: bool) -> Completion:
        """`resent`: a retry or a repeat > 0 — the engine may hold this prompt in its prefix cache."""
        c = self.counters
        n = st.n
        started_at = utcnow()
        t = time.perf_counter()
        c.attempts += 1
        c.in_flight += 1
        if self.on_attempt is not None:
            self.on_attempt(self.run_id, item.request_id, n, started_at, True)
        if c.in_flight > c.max_in_flight:
            c.max_in_flight = c.in_flight
        busted = (resent or self.bust_all) and bool(self.cache_bust)
        if busted:
            body = _with_bust(body, self.cache_bust, f"kvt-{self.run_id}-{item.request_id}-{n}")
        try:
            res = await complete(client, body, stream=self.opts.stream, timeout_s=self.opts.timeout_s)
        except AttemptError as e:
            if e.kind in BROKEN_STREAM and self.server_log is not None:
                try:
                    tail = self.server_log()
                except Exception:  # noqa: BLE001 - the log is a courtesy, the attempt is recorded regardless
                    tail = ""
                if tail:
                    e.body = f"{e.body or ''}\n--- engine log (last lines) ---\n{tail}"[-65536:]
            self._record_attempt(item, n, started_at, time.perf_counter() - t, e, step)
            raise
        except asyncio.CancelledError:
            self._record_attempt(item, n, started_at, time.perf_counter() - t,
                                 AttemptError("aborted", f"aborted: {self._abort_reason or 'cancelled'}", retryable=False),
                                 step)
            self.writer.update("requests", "request_id",
                               {"request_id": item.request_id, "n_attempts": n, "updated_at": utcnow()})
            raise
        finally:
            c.in_flight -= 1
            if self.on_attempt is not None:
                self.on_attempt(self.run_id, item.request_id, n, started_at, False)
        self._record_attempt(item, n, started_at, time.perf_counter() - t, None, step)
        st.resent, st.busted = resent, busted
        c.completion_tokens += res.output_tokens
        return res

    def _record_attempt(self, item: WorkItem, n: int, started_at: str, dur: float, err: Optional[AttemptError],
                        step: int = 1) -> None:
        self.writer.insert("attempts", {
            **({"step": step} if step != 1 else {}),  # column of migration 11; 1 is its default
            "request_id": item.request_id, "attempt_no": n, "run_id": self.run_id, "started_at": started_at,
            "duration_s": dur, "ok": 0 if err else 1,
            "error_kind": err.kind if err else None, "error": str(err)[:2000] if err else None,
            "http_status": err.http_status if err else None, "body": err.body if err else None,
            "retryable": int(err.retryable) if err else 0,
        })

    def _record_response(self, item: WorkItem, n: int, r: Completion, resent: bool = False,
                         busted: bool = False, table: str = "responses", harness_prompt_tokens: Optional[int] = None,
                         extra: Optional[dict[str, Any]] = None) -> None:
        """The response row: `responses` for the manifest prompt, `followups` for a follow-up request."""
        now = utcnow()
        prompt_tokens, completion_tokens, tpot_s = r.prompt_tokens, r.completion_tokens, r.tpot_s
        sources = set()
        if prompt_tokens is None and harness_prompt_tokens is not None:
            prompt_tokens = harness_prompt_tokens
            sources.add("harness")
        elif prompt_tokens is not None:
            sources.add("server")
        counted = self.count_tokens(r.text) if completion_tokens is None and self.count_tokens is not None else None
        if counted is not None:
            completion_tokens = counted
            if r.streamed:
                tpot_s = tpot(r.e2e_s, r.ttft_s, counted)
            sources.add("harness")
        elif completion_tokens is not None:
            sources.add("server")
        token_source = None if not sources else sources.pop() if len(sources) == 1 else "mixed"
        total = r.total_tokens
        if total is None and prompt_tokens is not None and completion_tokens is not None:
            total = prompt_tokens + completion_tokens
        self.writer.insert(table, {
            **(extra or {}),
            "request_id": item.request_id, "attempt_no": n, "run_id": self.run_id, "text": r.text,
            "finish_reason": r.finish_reason, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "total_tokens": total, "ttft_s": r.ttft_s,
            "tpot_s": tpot_s, "e2e_s": r.e2e_s, "itl_json": json.dumps(r.itl), "n_chunks": r.n_chunks,
            "kv_applied_json": json.dumps(r.kv_applied, sort_keys=True) if r.kv_applied is not None else None,
            "streamed": int(r.streamed), "created_at": now,
            "cached_tokens": r.cached_tokens, "cached_source": r.cached_source,
            "cache_bust": json.dumps(self.cache_bust, sort_keys=True) if busted else None,
            "cache_flag": cache_flag(prompt_tokens, r.cached_tokens, resent, busted),
            "token_source": token_source,
        }, verb="INSERT OR IGNORE")
