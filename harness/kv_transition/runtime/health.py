"""Health polling shared by the runtimes: GET base_url+health_path until 200, watching the engine."""

from __future__ import annotations

import socket
import ssl
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence
from urllib.parse import urlsplit

import httpx

from kv_transition.runtime.base import EngineStartError

if TYPE_CHECKING:
    from kv_transition.engines.spec import ResolvedSpec

#: returns None while the engine is alive, or its exit code once it has exited
AliveFn = Callable[[], Optional[int]]


_SSL_CTX: Optional[ssl.SSLContext] = None


def _ssl_context() -> ssl.SSLContext:
    """One TLS context per process. A bare httpx.get builds a new one (loading the CA bundle) per call:
    ~28 ms of CPU per probe, i.e. ~1 s of CPU per cell for a 2 s start at a 0.05 s poll interval, and the
    external runtime's watchdog probes every 0.5 s."""
    global _SSL_CTX
    if _SSL_CTX is None:
        _SSL_CTX = httpx.create_ssl_context()
    return _SSL_CTX


def probe(url: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """One health GET: (ok, short reason)."""
    status, reason = probe_status(url, timeout_s)
    return status == 200, reason


def probe_status(url: str, timeout_s: float = 2.0) -> tuple[Optional[int], str]:
    """One GET: (HTTP status or None when nothing answered, short reason)."""
    try:
        r = httpx.get(url, timeout=timeout_s, verify=_ssl_context())
    except httpx.HTTPError as e:
        return None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return r.status_code, f"HTTP {r.status_code}"


#: a server that answers one of these has no such route: try the next readiness URL
NO_ROUTE = frozenset({404, 405, 501})


def wait_healthy(
    url: str,
    *,
    timeout_s: float,
    interval_s: float = 1.0,
    alive: Optional[AliveFn] = None,
    log_tail: Callable[[], str] = lambda: "",
    what: str = "engine",
    fallback_urls: Sequence[str] = (),
    used: Optional[list[str]] = None,
) -> float:
    """Poll `url` until it answers 200; return the seconds waited.

    When `url` answers 404/405/501 (the server has no such route), the next of `fallback_urls` is polled
    instead (e.g. /health → /v1/models); `used` (if given) receives the URL that answered 200.
    Raises EngineStartError early (with exit code and log tail) as soon as `alive()` reports an exit,
    and on timeout (with the last probe's reason and the log tail).
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    interval_s = max(0.05, interval_s or 0.25)
    reason = "not probed yet"
    urls = [url, *fallback_urls]
    tried: list[str] = []
    while True:
        if alive is not None:
            code = alive()
            if code is not None:
                raise EngineStartError(f"{what} exited with code {code} before it became healthy ({urls[0]})",
                                       returncode=code, log_tail=log_tail())
        status, reason = probe_status(urls[0], timeout_s=min(2.0, max(0.2, deadline - time.monotonic())))
        if status == 200:
            if used is not None:
                used.append(urls[0])
            return time.monotonic() - t0
        if status in NO_ROUTE and len(urls) > 1:
            tried.append(f"{urls.pop(0)} → {reason}")
            continue
        now = time.monotonic()
        if now >= deadline:
            also = f"; {'; '.join(tried)}" if tried else ""
            raise EngineStartError(f"{what} not healthy after {timeout_s:g}s at {urls[0]} (last probe: {reason}{also})",
                                   log_tail=log_tail())
        time.sleep(min(interval_s, max(0.0, deadline - now)))


def port_free(host: str, port: int) -> bool:
    """True when host:port can be bound now (SO_REUSEADDR: a port in TIME_WAIT counts as free)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def port_in_use(base_url: str) -> bool:
    """True when something already accepts connections on base_url's host:port."""
    u = urlsplit(base_url)
    host = u.hostname or "127.0.0.1"
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _norm_version(v: str) -> str:
    v = str(v).strip()
    return v[1:] if v[:1] in ("v", "V") and v[1:2].isdigit() else v


def verify_version(spec: "ResolvedSpec", timeout_s: float = 10.0) -> Optional[str]:
    """GET the engine's version endpoint (engine.yaml `version:`) and compare it with the spec's tag.

    Returns the reported version (None when the engine declares no endpoint). A different version is an
    EngineStartError: the cell would otherwise be recorded under a tag it did not run (e.g. a pip-installed
    vLLM 0.33 serving cells labelled 0.26.0)."""
    if not spec.version_path:
        return None
    url = spec.base_url + spec.version_path
    try:
        r = httpx.get(url, timeout=timeout_s, verify=_ssl_context())
        r.raise_for_status()
        reported = r.json()[spec.version_key]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise EngineStartError(f"{url}: could not read the engine version ({type(e).__name__}: {e})") from None
    if spec.tag and _norm_version(reported) != _norm_version(spec.tag):
        raise EngineStartError(f"{spec.engine}: the engine reports version {reported!r} but the cell says "
                               f"{spec.tag!r} (engine tag; set engine.tag to the version you installed)")
    return str(reported)
