"""`external` runtime: a server someone else runs (config `engine.base_url`). No lifecycle: start only
records the URL, wait_ready polls health for a short while, stop does nothing to the server."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kv_transition.engines.spec import ResolvedSpec
from kv_transition.runtime.base import EngineStartError, Instance, Runtime, now_iso
from kv_transition.runtime.health import probe, wait_healthy


class ExternalRuntime(Runtime):
    name = "external"

    def __init__(self, base_url: Optional[str] = None, health_timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/") if base_url else None
        self.health_timeout_s = health_timeout_s

    def start(self, spec: ResolvedSpec, labels: dict[str, str], log_path: Optional[Path]) -> Instance:
        url = self.base_url or spec.base_url
        return Instance(runtime=self.name, base_url=url, spec=spec, ident=url, started_at=now_iso())

    def wait_ready(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        url = inst.base_url + inst.spec.health_path
        try:
            wait_healthy(url, timeout_s=self.health_timeout_s if timeout_s is None else timeout_s,
                         interval_s=min(1.0, inst.spec.health_interval_s or 1.0), what="external engine")
        except EngineStartError as e:
            raise EngineStartError(f"engine.base_url {inst.base_url}: not reachable or not healthy "
                                   f"({str(e).splitlines()[0]}); is the server running?") from None
        inst.ready_at = now_iso()

    def is_running(self, inst: Instance) -> bool:
        return probe(inst.base_url + inst.spec.health_path)[0]

    def stop(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        if inst.stopped_at is None:
            inst.stopped_at = now_iso()
