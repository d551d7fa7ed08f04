"""One engine shared by a whole request-mode group (kvpress): started lazily, restarted when it died, lent
to every cell's `run_cell` through a runtime that never stops it."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from kv_transition.engines.spec import ResolvedSpec
from kv_transition.runtime.base import EngineStartError, Instance, Runtime


class SharedEngine:
    """One engine for a whole group: started on first use, restarted (≤ max_restarts) when it died."""

    def __init__(self, rt: Runtime, spec: ResolvedSpec, labels: dict[str, str], log_path: Path,
                 on_load: Callable[[Instance, Optional[str]], None], max_restarts: int = 2):
        self.rt, self.spec, self.labels, self.log_path = rt, spec, labels, log_path
        self.on_load = on_load
        self.max_restarts = max_restarts
        self.inst: Optional[Instance] = None
        self.loads = 0
        self.start_error: Optional[EngineStartError] = None
        self.lock = threading.Lock()

    def ensure(self) -> Instance:
        with self.lock:
            if self.start_error is not None:
                raise EngineStartError(f"the group's engine failed to start earlier: {str(self.start_error).splitlines()[0]}",
                                       returncode=self.start_error.returncode)
            if self.inst is not None and self.rt.is_running(self.inst):
                return self.inst
            if self.inst is not None:  # died after a cell: record, restart
                self.rt.stop(self.inst)
                self.on_load(self.inst, f"engine stopped (exit code {self.inst.exit_code})")
                if self.loads > self.max_restarts:
                    self.start_error = EngineStartError(f"engine died {self.loads} times; not restarting again")
                    raise self.start_error
            inst = None
            try:
                inst = self.rt.start(self.spec, self.labels, self.log_path)
                self.loads += 1
                self.rt.ready(inst)
            except EngineStartError as e:
                if inst is not None:
                    self.rt.stop(inst)
                    self.on_load(inst, str(e).splitlines()[0])
                self.start_error = e
                raise
            self.inst = inst
            return inst

    def close(self) -> None:
        with self.lock:
            if self.inst is not None:
                self.rt.stop(self.inst)
                self.on_load(self.inst, None)
                self.inst = None


class LentRuntime(Runtime):
    """What `run_cell` sees for a shared engine: `running()` lends the group's instance (starting it
    on first use) and never stops it; `is_running` (the watchdog) asks the real runtime."""

    def __init__(self, shared: SharedEngine):
        self.shared = shared
        self.name = shared.rt.name

    @contextmanager
    def running(self, spec: ResolvedSpec, labels: dict[str, str], log_path: Optional[Path] = None) -> Iterator[Instance]:
        yield self.shared.ensure()

    def start(self, spec: ResolvedSpec, labels: dict[str, str], log_path: Optional[Path]) -> Instance:
        return self.shared.ensure()

    def wait_ready(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        return None

    def is_running(self, inst: Instance) -> bool:
        return self.shared.inst is not None and self.shared.rt.is_running(self.shared.inst)

    def stop(self, inst: Instance, timeout_s: float = 20.0) -> None:
        return None

    def log_tail(self, inst: Instance, n: int = 40) -> str:
        return self.shared.rt.log_tail(inst, n)
