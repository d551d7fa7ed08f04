"""`external` runtime: a server someone else runs (config `engine.base_url` / `--base-url`). No lifecycle:
start only records the URL, wait_ready polls health (the engine's health path, else its fallbacks, e.g.
/v1/models) for `engine.readiness_timeout_s` (default 30 s), stop does nothing to the server.

Liveness during a cell is a TCP connect to the server's port every `liveness_interval_s` (5 s): no HTTP
request reaches the server, so nothing can interrupt a generation in progress (llama-cpp-python's server
aborts the open stream whenever another request arrives, `/v1/models` included). There is no engine log:
`Instance.log_path` stays None."""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from kv_transition.engines.spec import ResolvedSpec
from kv_transition.errors import ConfigError
from kv_transition.runtime.base import EngineStartError, Instance, Runtime, now_iso
from kv_transition.runtime.health import port_in_use, wait_healthy


def normalize_base_url(url: str) -> str:
    """`http://host:port`, `http://host:port/`, `http://host:port/v1`, `…/v1/` → `http://host:port`
    (the harness adds /v1/completions, /v1/models itself); a path prefix before /v1 (a proxy) is kept."""
    u = urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"engine.base_url: {url!r} is not an http(s) URL")
    if u.query or u.fragment:
        raise ConfigError(f"engine.base_url: {url!r}: no query or fragment, only scheme://host:port[/prefix][/v1]")
    path = u.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urlunsplit((u.scheme, u.netloc, path, "", ""))


class ExternalRuntime(Runtime):
    name = "external"
    liveness_interval_s = 5.0

    def __init__(self, base_url: Optional[str] = None, health_timeout_s: Optional[float] = None):
        self.base_url = normalize_base_url(base_url) if base_url else None
        self.health_timeout_s = health_timeout_s

    def start(self, spec: ResolvedSpec, labels: dict[str, str], log_path: Optional[Path]) -> Instance:
        url = self.base_url or spec.base_url
        return Instance(runtime=self.name, base_url=url, spec=spec, ident=url, started_at=now_iso())

    def wait_ready(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        spec = inst.spec
        timeout = timeout_s if timeout_s is not None else (
            self.health_timeout_s if self.health_timeout_s is not None else spec.readiness_timeout_s)
        used: list[str] = []
        try:
            wait_healthy(inst.base_url + spec.health_path, timeout_s=timeout,
                         interval_s=min(1.0, spec.health_interval_s or 1.0), what="external engine",
                         fallback_urls=[inst.base_url + p for p in spec.health_fallback_paths], used=used)
        except EngineStartError as e:
            raise EngineStartError(f"engine.base_url {inst.base_url}: not reachable or not healthy "
                                   f"({str(e).splitlines()[0]}); is the server running?") from None
        inst.ready_url = used[0] if used else None
        inst.ready_at = now_iso()

    def is_running(self, inst: Instance) -> bool:
        return port_in_use(inst.base_url)

    def stop(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        if inst.stopped_at is None:
            inst.stopped_at = now_iso()
