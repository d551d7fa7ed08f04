"""Pure parsing of an OpenAI-compatible completion response (SSE stream or one JSON body) and the
latency math. No I/O here: the client feeds lines with their arrival times.

Definitions (vLLM's benchmark_serving):
- TTFT: request sent → first chunk carrying generated text.
- ITL: gaps between successive text-carrying chunks (the first token excluded).
- TPOT: (e2e − TTFT) / (output_tokens − 1), output_tokens from the usage block (else the number of
  text chunks); undefined for fewer than two tokens.
- e2e: request sent → the last event of the stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

KV_APPLIED_FIELD = "kv_press_applied"


class AttemptError(Exception):
    """One failed attempt. `kind` is stored in attempts.error_kind; `retryable` drives tenacity."""

    def __init__(self, kind: str, message: str, *, retryable: bool, http_status: Optional[int] = None,
                 body: Optional[str] = None):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.http_status = http_status
        self.body = body


RETRYABLE_4XX = frozenset({408, 429})  # timeouts and rate limits are transient, other 4xx are not


def http_error(status: int, body: str) -> AttemptError:
    retry = status >= 500 or status in RETRYABLE_4XX
    kind = "http_5xx" if status >= 500 else "http_4xx"
    first = body.strip().splitlines()[0][:300] if body.strip() else ""
    return AttemptError(kind, f"HTTP {status}: {first}", retryable=retry, http_status=status, body=body[:65536])


@dataclass
class Completion:
    text: str
    finish_reason: Optional[str]
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]
    total_tokens: Optional[int]
    ttft_s: Optional[float]
    tpot_s: Optional[float]
    e2e_s: float
    itl: list[float]
    n_chunks: int
    kv_applied: Any
    streamed: bool
    cached_tokens: Optional[int] = None   # prompt tokens the engine served from its cache (when it says)
    cached_source: Optional[str] = None   # where that number came from (see cached_tokens_of)

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.n_chunks


def tpot(e2e_s: float, ttft_s: Optional[float], output_tokens: int) -> Optional[float]:
    if ttft_s is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


class SSEDecoder:
    """Server-sent events → data payloads. Handles multi-line data, comments, CRLF, missing final
    blank line (flush)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Optional[str]:
        """One line without its terminator; returns a dispatched payload or None."""
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            if self._data:
                out = "\n".join(self._data)
                self._data = []
                return out
            return None
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        # event:, id:, retry: and unknown fields are ignored
        return None

    def flush(self) -> Optional[str]:
        return self.feed("")


def _int(v: Any) -> Optional[int]:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def cached_tokens_of(obj: dict[str, Any]) -> tuple[Optional[int], Optional[str]]:
    """Prompt tokens an engine reports as served from its prefix cache, and the field it used:
    vLLM / SGLang / llama-server OpenAI usage `usage.prompt_tokens_details.cached_tokens`, llama-server
    `timings.cache_n` and native `tokens_cached`, SGLang native `meta_info.cached_tokens`. (None, None)
    when the response reports none of them (llama-cpp-python's server)."""
    u = obj.get("usage")
    if isinstance(u, dict):
        d = u.get("prompt_tokens_details")
        if isinstance(d, dict) and _int(d.get("cached_tokens")) is not None:
            return _int(d["cached_tokens"]), "usage.prompt_tokens_details.cached_tokens"
    t = obj.get("timings")
    if isinstance(t, dict) and _int(t.get("cache_n")) is not None:
        return _int(t["cache_n"]), "timings.cache_n"
    if _int(obj.get("tokens_cached")) is not None:
        return _int(obj["tokens_cached"]), "tokens_cached"
    m = obj.get("meta_info")
    if isinstance(m, dict) and _int(m.get("cached_tokens")) is not None:
        return _int(m["cached_tokens"]), "meta_info.cached_tokens"
    return None, None


class StreamAccumulator:
    """Feed SSE payloads with perf_counter timestamps; `finish` validates and computes metrics."""

    __slots__ = ("t0", "parts", "first_t", "last_t", "last_event_t", "itl", "n_chunks", "finish_reason",
                 "usage", "kv_applied", "done", "cached", "last_payload")

    def __init__(self, t0: float):
        self.t0 = t0
        self.parts: list[str] = []
        self.first_t: Optional[float] = None
        self.last_t: Optional[float] = None
        self.last_event_t: Optional[float] = None
        self.itl: list[float] = []
        self.n_chunks = 0
        self.finish_reason: Optional[str] = None
        self.usage: Optional[dict[str, Any]] = None
        self.kv_applied: Any = None
        self.done = False
        self.cached: tuple[Optional[int], Optional[str]] = (None, None)
        self.last_payload: Optional[str] = None

    def partial(self) -> str:
        """What arrived before a stream broke (stored with the failed attempt)."""
        return (f"[{self.n_chunks} text chunk(s) received; text so far: {''.join(self.parts)[-2000:]!r}; "
                f"last event: {(self.last_payload or '')[:2000]}]")

    def feed(self, payload: str, t: float) -> None:
        self.last_event_t = t
        if payload[:1] != "{" and payload.strip() == "[DONE]":
            self.done = True
            return
        self.last_payload = payload
        try:
            obj = json.loads(payload)
        except ValueError:
            raise AttemptError("malformed", f"malformed SSE data: {payload[:200]!r}", retryable=True,
                               body=payload[:65536]) from None
        if not isinstance(obj, dict):
            raise AttemptError("malformed", f"SSE data is not a JSON object: {payload[:200]!r}", retryable=True,
                               body=payload[:65536])
        err = obj.get("error")
        if err:
            code = err.get("code") if isinstance(err, dict) else None
            code = code if isinstance(code, int) else None
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise AttemptError("stream_error", f"error in stream: {str(msg)[:300]}",
                               retryable=code is None or code >= 500 or code in RETRYABLE_4XX,
                               http_status=code, body=payload[:65536])
        choices = obj.get("choices")
        if isinstance(choices, list):
            for ch in choices:
                if not isinstance(ch, dict):
                    continue
                text = ch.get("text")
                if text is None and isinstance(ch.get("delta"), dict):
                    text = ch["delta"].get("content")
                if text:
                    if self.first_t is None:
                        self.first_t = t
                    else:
                        self.itl.append(t - self.last_t)  # type: ignore[operator]
                    self.last_t = t
                    self.parts.append(text)
                    self.n_chunks += 1
                fr = ch.get("finish_reason")
                if fr:
                    self.finish_reason = fr
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        kv = obj.get(KV_APPLIED_FIELD)
        if kv is not None:
            self.kv_applied = kv
        c = cached_tokens_of(obj)
        if c[0] is not None:
            self.cached = c

    def finish(self) -> Completion:
        if not self.done and self.finish_reason is None:
            raise AttemptError("incomplete", "stream ended before a finish_reason or [DONE]", retryable=True,
                               body=self.partial())
        if self.finish_reason is None and self.n_chunks:
            # [DONE] with text but no finish_reason: the server cut the generation short (llama-cpp-python's
            # server does this when another request arrives, interrupt_requests=True): not a completion
            raise AttemptError("interrupted", "the server ended the stream with [DONE] but no finish_reason "
                               "(generation interrupted)", retryable=True, body=self.partial())
        end = self.last_event_t if self.last_event_t is not None else self.t0
        e2e = end - self.t0
        ttft = (self.first_t - self.t0) if self.first_t is not None else None
        u = self.usage or {}
        ct = _int(u.get("completion_tokens"))
        out_tokens = ct if ct is not None else self.n_chunks
        return Completion(
            text="".join(self.parts), finish_reason=self.finish_reason,
            prompt_tokens=_int(u.get("prompt_tokens")), completion_tokens=ct, total_tokens=_int(u.get("total_tokens")),
            ttft_s=ttft, tpot_s=tpot(e2e, ttft, out_tokens), e2e_s=e2e, itl=self.itl, n_chunks=self.n_chunks,
            kv_applied=self.kv_applied, streamed=True, cached_tokens=self.cached[0], cached_source=self.cached[1],
        )


def parse_completion_body(raw: bytes | str, t0: float, t_end: float) -> Completion:
    """A non-streaming /v1/completions JSON body."""
    try:
        obj = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        raise AttemptError("malformed", f"response is not JSON: {text[:200]!r}", retryable=True,
                           body=text[:65536]) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list) or not obj["choices"]:
        raise AttemptError("malformed", "response has no choices", retryable=True, body=str(obj)[:65536])
    ch = obj["choices"][0] if isinstance(obj["choices"][0], dict) else {}
    text = ch.get("text")
    if text is None and isinstance(ch.get("message"), dict):
        text = ch["message"].get("content")
    u = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
    cached, source = cached_tokens_of(obj)
    return Completion(
        text=text or "", finish_reason=ch.get("finish_reason"), prompt_tokens=_int(u.get("prompt_tokens")),
        completion_tokens=_int(u.get("completion_tokens")), total_tokens=_int(u.get("total_tokens")),
        ttft_s=None, tpot_s=None, e2e_s=t_end - t0, itl=[], n_chunks=1 if text else 0,
        kv_applied=obj.get(KV_APPLIED_FIELD), streamed=False, cached_tokens=cached, cached_source=source,
    )
