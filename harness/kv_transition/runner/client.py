"""One attempt of one request against an OpenAI-compatible /v1/completions endpoint."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

import httpx

from kv_transition.runner.stream import AttemptError, Completion, StreamAccumulator, http_error, parse_completion_body

COMPLETIONS_PATH = "/v1/completions"


def make_client(base_url: str, concurrency: int, *, connect_timeout_s: float = 10.0,
                stall_timeout_s: Optional[float] = None, transport: Optional[httpx.AsyncBaseTransport] = None
                ) -> httpx.AsyncClient:
    """A pooled client: one keep-alive connection per concurrent slot; `stall_timeout_s` bounds the
    silence between two reads (a stalled stream), the total is bounded per request by the runner."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(connect=connect_timeout_s, read=stall_timeout_s, write=connect_timeout_s, pool=None)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout, transport=transport,
                             headers={"Accept": "text/event-stream, application/json"})


def _classify(e: BaseException) -> AttemptError:
    if isinstance(e, AttemptError):
        return e
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return AttemptError("connect", f"connection failed: {e!r}", retryable=True)
    if isinstance(e, httpx.ReadTimeout):
        return AttemptError("stall", f"no data for the stall timeout: {e!r}", retryable=True)
    if isinstance(e, httpx.TimeoutException):
        return AttemptError("timeout", f"timeout: {e!r}", retryable=True)
    if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError)):
        return AttemptError("connection", f"connection broken: {e!r}", retryable=True)
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return AttemptError("timeout", "request exceeded the per-request timeout", retryable=True)
    if isinstance(e, httpx.HTTPError):
        return AttemptError("http", f"{e!r}", retryable=True)
    return AttemptError("other", f"{type(e).__name__}: {e}", retryable=False)


async def complete(client: httpx.AsyncClient, body: dict[str, Any], *, stream: bool, timeout_s: float,
                   path: str = COMPLETIONS_PATH) -> Completion:
    """Send one request; return the parsed completion or raise AttemptError (classified)."""
    t0 = time.perf_counter()
    acc: Optional[StreamAccumulator] = None
    try:
        async with asyncio.timeout(timeout_s):
            if not stream:
                resp = await client.post(path, json=body)
                t_end = time.perf_counter()
                if resp.status_code >= 400:
                    raise http_error(resp.status_code, resp.text)
                return parse_completion_body(resp.content, t0, t_end)
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    raw = await resp.aread()
                    raise http_error(resp.status_code, raw.decode("utf-8", "replace"))
                acc = StreamAccumulator(t0)
                perf = time.perf_counter
                data: list[str] = []
                # SSEDecoder's framing, inlined (this loop runs per line of every response): `data:`
                # lines accumulate, a blank line dispatches the event; comments and other fields are
                # ignored. aiter_lines already splits on \n, \r\n and \r. The body is read to its end
                # even after [DONE] (e2e is stamped at [DONE]): a response closed with unread bytes
                # cannot go back to the keep-alive pool.
                async for line in resp.aiter_lines():
                    if line:
                        if line.startswith("data:"):
                            v = line[5:]
                            data.append(v[1:] if v.startswith(" ") else v)
                        continue
                    if data:
                        payload = data[0] if len(data) == 1 else "\n".join(data)
                        data = []
                        if not acc.done:
                            acc.feed(payload, perf())
                if data and not acc.done:  # no blank line after the last event
                    acc.feed("\n".join(data), perf())
                return acc.finish()
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # noqa: BLE001 - classified, never swallowed silently
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        err = _classify(e)
        if acc is not None and err.body is None:  # a broken stream: keep what the server sent before it broke
            err.body = acc.partial()
        raise err from e
