"""One engine group on its GPU set (or CPU slot): its port, its (shared or per-cell) engine, its cells in
order through `run_cell`, each outcome recorded as it ends. The unit a backend places: the local backend runs
one per thread; any other backend runs the same `GroupRunner.run` where the group's GPUs are."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kv_transition.cell import CellResult, resolve_cell_spec, run_cell
from kv_transition.config import Config, Paths
from kv_transition.db import utcnow
from kv_transition.matrix.expand import EngineGroup, MatrixCell
from kv_transition.matrix.inventory import Inventory
from kv_transition.matrix.outcome import CellOutcome
from kv_transition.matrix.record import MatrixLog
from kv_transition.matrix.shared import LentRuntime, SharedEngine
from kv_transition.matrix.view import Board
from kv_transition.runtime.base import CELL_LABEL, GROUP_LABEL, OWNER_LABEL, Instance, Runtime
from kv_transition.runtime.health import port_free


def port_for(base: int, inv: Inventory, gpus: tuple[int, ...]) -> int:
    pos = inv.devices.index(gpus[0]) if gpus else 0
    return base + pos


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def group_cfg(cell: MatrixCell, port: int, gpus: tuple[int, ...], inv: Inventory) -> Config:
    eng = cell.cfg.engine.model_copy(update={"port": port, "gpus": list(gpus) if inv.real else []})
    return cell.cfg.model_copy(update={"engine": eng})


@dataclass
class GroupRunner:
    """Everything a group needs, passed in (no back-reference to the matrix runner)."""

    base_port: int
    inv: Inventory
    experiment_group: str                      # labels engines for cleanup
    logs_dir: Path
    runtime: Callable[[str], Runtime]          # runtime name → a (tracked) runtime
    record: MatrixLog
    paths_for: Callable[[MatrixCell], Paths]
    board: Board
    cancel: threading.Event
    cell_kwargs: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda s: None
    loads: dict[str, int] = field(default_factory=dict)   # group id → engine starts (shared groups)
    interleave: bool = True                    # shared groups: cells at the same time, example-major
    interleave_window: int = 2

    def run(self, group: EngineGroup, gpus: tuple[int, ...]) -> list[CellOutcome]:
        port = port_for(self.base_port, self.inv, gpus)
        host = group.cells[0].cfg.engine.host
        if group.runtime != "external" and not port_free(host, port):
            port = free_port(host)
        outcomes: list[CellOutcome] = []
        shared: Optional[SharedEngine] = None
        if group.shared and group.runtime != "external":
            c0 = group.cells[0]
            spec, _, _ = resolve_cell_spec(group_cfg(c0, port, gpus, self.inv), engine=c0.engine, method=c0.method,
                                           compression_ratio=c0.compression_ratio, budget=c0.budget,
                                           tensor_parallel=group.tp, digest=c0.digest)
            labels = {OWNER_LABEL: "kv-transition", GROUP_LABEL: self.experiment_group, CELL_LABEL: group.group_id}
            log_path = self.logs_dir / f"engine-{group.group_id}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)

            def on_load(inst: Instance, err: Optional[str]) -> None:
                self.record.load(group, gpus, inst, err)

            shared = SharedEngine(self.runtime(group.runtime), spec, labels, log_path, on_load)
        try:
            if shared is not None and self.interleave and len(group.cells) > 1:
                outcomes = self._interleaved(group, gpus, port, shared)
                return outcomes
            for i, cell in enumerate(group.cells):
                if self.cancel.is_set():
                    outcomes.append(CellOutcome(cell, "skipped", "matrix interrupted", gpus=gpus, group_id=group.group_id))
                    continue
                self.board.set(gpus, group=group.label, cell=cell.label, cell_id=cell.cell_id, status="running",
                               done=i, total=len(group.cells))
                outcomes.append(self._cell(group, cell, gpus, port, shared))
        finally:
            if shared is not None:
                shared.close()
                self.loads[group.group_id] = shared.loads
            self.board.set(gpus, group="", cell="", cell_id="", status="idle", done=0, total=0)
        return outcomes

    def _interleaved(self, group: EngineGroup, gpus: tuple[int, ...], port: int,
                     shared: SharedEngine) -> list[CellOutcome]:
        """Every cell of a shared group at once, each its own run_cell (own run, writer, resume, telemetry) in
        its own thread, their requests example-major through one ExampleGate."""
        from kv_transition.runner.gate import ExampleGate

        cells = group.cells
        from kv_transition.telemetry import SharedTelemetry

        gate = ExampleGate([c.cell_id for c in cells], window=self.interleave_window)
        hub = SharedTelemetry()  # one NVML reader and /metrics scraper for the cells on this engine
        n_done = [0]
        lock = threading.Lock()
        self.board.set(gpus, group=group.label, cell=f"{len(cells)} cells interleaved", cell_id="", status="running",
                       done=0, total=len(cells))

        def one(cell: MatrixCell) -> CellOutcome:
            try:
                if self.cancel.is_set():
                    return CellOutcome(cell, "skipped", "matrix interrupted", gpus=gpus, group_id=group.group_id)
                # the shared engine died under every interleaved cell at once: each resumes on the restarted
                # engine (SharedEngine.ensure restarts it at most max_restarts times, then fails fast). A cell
                # sees the death as "engine stopped" (the watchdog) or, when its requests ran out of retries
                # first, as failed requests: then the engine is dead now or was restarted meanwhile.
                while True:
                    loads0 = max(shared.loads, 1)
                    o = self._cell(group, cell, gpus, port, shared, gate=gate, telemetry_hub=hub)
                    died = (bool(o.reason and "engine stopped" in o.reason) or shared.loads > loads0
                            or (shared.inst is not None and not shared.rt.is_running(shared.inst)))
                    if (o.status == "completed" or o.status == "skipped" or not died or self.cancel.is_set()
                            or shared.start_error is not None or shared.loads > shared.max_restarts):
                        return o
            finally:
                gate.leave(cell.cell_id)
                with lock:
                    n_done[0] += 1
                    self.board.set(gpus, group=group.label, cell=f"{len(cells)} cells interleaved", cell_id="",
                                   status="running", done=n_done[0], total=len(cells))

        with ThreadPoolExecutor(max_workers=len(cells), thread_name_prefix=f"kvt-cell-{group.group_id}") as pool:
            return list(pool.map(one, cells))

    def _cell(self, group: EngineGroup, cell: MatrixCell, gpus: tuple[int, ...], port: int,
              shared: Optional[SharedEngine], gate: Any = None, telemetry_hub: Any = None) -> CellOutcome:
        started, t0 = utcnow(), time.monotonic()
        rt_impl: Optional[Runtime] = LentRuntime(shared) if shared else (
            self.runtime(cell.runtime) if cell.runtime != "external" else None)
        try:
            res: CellResult = run_cell(group_cfg(cell, port, gpus, self.inv), self.paths_for(cell),
                                       engine=cell.engine, method=cell.method,
                                       compression_ratio=cell.compression_ratio, budget=cell.budget,
                                       runtime_impl=rt_impl, tensor_parallel=cell.tp, digest=cell.digest,
                                       **({"gate": gate, "gate_key": cell.cell_id} if gate is not None else {}),
                                       **({"telemetry_hub": telemetry_hub} if telemetry_hub is not None else {}),
                                       **self.cell_kwargs)
            o = CellOutcome(cell, res.status, res.reason, res.n_ok, res.n_requests, gpus, group.group_id)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - continue on error
            o = CellOutcome(cell, "failed", f"{type(e).__name__}: {e}", gpus=gpus, group_id=group.group_id)
            self.log(traceback.format_exc(limit=3))
        o.elapsed_s = time.monotonic() - t0
        self.board.done(o)
        self.record.cell(o, port, started)
        self.log(f"[{self.inv.kind} {','.join(map(str, gpus))}] {cell.label} ({cell.model}) {o.status}"
                 f" {o.n_ok}/{o.n_requests}" + (f": {o.reason.splitlines()[0]}" if o.reason and o.status != "completed" else ""))
        return o
