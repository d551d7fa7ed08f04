"""The matrix runner: engine groups packed onto disjoint GPU sets (or simulated CPU slots), run in
parallel threads, each group its own engine on its own port.

    inv = inventory(gpus="0,1,2,3")             # or NVML, or inventory(slots=2) on CPU
    summary = MatrixRunner(cfg, expansion, inv).run()

* request-mode groups (kvpress): ONE engine per model and GPU set serves every method/ratio/budget; it
  starts lazily (only when some cell of the group still has requests to send), is restarted at most
  twice if it dies mid-group, and every cell goes through `run_cell` with a runtime that lends the
  running instance (engine_instances/telemetry are recorded per cell run as usual; the rows of one load
  share ident/started_at/ready_at; `matrix_engines` records each load).
* server-mode groups (vLLM, SGLang): one `run_cell` per cell, which starts and stops its engine.
* continue on error: a failed cell or group never stops the others; exit 1 at the end if any failed.
* resume: a complete cell starts no engine; an incomplete one sends only the missing requests.
* SIGINT/SIGTERM: every engine is stopped, running cells end `incomplete`, the matrix run `interrupted`.

The pieces: inventory.py (GPUs or slots), schedule.py (packing), group.py (one group on its GPUs),
shared.py (a request-mode group's one engine), record.py (matrix_* rows), view.py (the live view),
outcome.py (results). This module is the local backend: one thread per running group.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from kv_transition.config import Config, Paths, resolve_paths
from kv_transition.db import connect
from kv_transition.matrix.expand import Expansion, MatrixCell
from kv_transition.matrix.group import GroupRunner
from kv_transition.matrix.inventory import Inventory, require_gpu_inventory
from kv_transition.matrix.outcome import CellOutcome, MatrixSummary
from kv_transition.matrix.record import MatrixLog
from kv_transition.matrix.schedule import Job, assign, check_fits
from kv_transition.matrix.view import Board, live_view, null_ctx
from kv_transition.runtime.base import Runtime, get_runtime


def jobs_for(exp: Expansion, n_requests: Optional[dict[str, int]] = None) -> list[Job]:
    """One Job per engine group; work ≈ one engine load + its cells (× requests when known)."""
    out = []
    for i, g in enumerate(exp.groups):
        per = [max(1, (n_requests or {}).get(c.dataset_id, 1) * c.cfg.decoding.repeats) for c in g.cells]
        scale = sum(per) / len(per)
        out.append(Job(g.group_id, g.tp, work=1.0 + sum(per) / scale, baseline=g.has_baseline, order=i))
    return out


class MatrixRunner:
    def __init__(self, cfg: Config, exp: Expansion, inv: Inventory, *, cwd: Optional[Path] = None,
                 lock: Optional[dict[str, Any]] = None, live: bool = False, console: Any = None,
                 log: Optional[Callable[[str], None]] = None,
                 runtime_factory: Optional[Callable[[str], Runtime]] = None,
                 matrix_path: Optional[str] = None, matrix_sha256: Optional[str] = None,
                 cell_kwargs: Optional[dict[str, Any]] = None):
        self.cfg, self.exp, self.inv = cfg, exp, inv
        self.cwd = cwd or Path.cwd()
        self.lock_data = lock
        self.live, self.console = live, console
        self.log = log or (lambda s: None)
        self.runtime_factory = runtime_factory or (lambda name: get_runtime(name))
        self.matrix_path, self.matrix_sha256 = matrix_path, matrix_sha256
        self.cell_kwargs = cell_kwargs or {}
        self.paths = resolve_paths(cfg, cwd=self.cwd)
        self.board = Board(inv)
        self.cancel = threading.Event()
        self._runtimes: list[Runtime] = []
        self._rt_lock = threading.Lock()
        self.record = MatrixLog(self.paths.db)
        self.groups = GroupRunner(
            base_port=exp.matrix.base_port or cfg.engine.port, inv=inv, experiment_group=cfg.experiment.group_id,
            logs_dir=self.paths.logs_dir, runtime=self._runtime, record=self.record, paths_for=self._paths,
            board=self.board, cancel=self.cancel, cell_kwargs=self.cell_kwargs, log=self.log,
            interleave=exp.matrix.interleave, interleave_window=exp.matrix.interleave_window)
        self.loads = self.groups.loads

    # -- helpers
    def _paths(self, cell: MatrixCell) -> Paths:
        return resolve_paths(cell.cfg, cwd=self.cwd)

    def _runtime(self, name: str) -> Runtime:
        rt = self.runtime_factory(name)
        with self._rt_lock:
            self._runtimes.append(rt)
        return rt

    def stop_all_engines(self) -> None:
        with self._rt_lock:
            rts = list(self._runtimes)
        for rt in rts:
            try:
                rt.stop_all()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass

    def _db(self) -> Any:
        return connect(self.paths.db)

    @property
    def matrix_run_id(self) -> Optional[int]:
        return self.record.matrix_run_id

    # -- preparation
    def prepare(self, progress: bool = False) -> list[str]:
        """Build every model's manifest that is not in the DB yet; → the dataset ids prepared."""
        from kv_transition.manifest.prepare import prepare

        done, out = set(), []
        for c in self.exp.cells:
            if c.dataset_id in done:
                continue
            done.add(c.dataset_id)
            paths = self._paths(c)
            conn = connect(paths.db)
            try:
                have = conn.execute("SELECT 1 FROM datasets WHERE dataset_id=?", (c.dataset_id,)).fetchone()
            finally:
                conn.close()
            if not have:
                self.log(f"preparing manifest {c.dataset_id} for {c.model}")
                prepare(c.cfg, paths)
                out.append(c.dataset_id)
        return out

    def cleanup_stale(self) -> None:
        """Engines left by a SIGKILL'd earlier run of this group (their harness is gone)."""
        from kv_transition.runtime.cleanup import cleanup

        kinds = {c.runtime for c in self.exp.cells}
        for kind in ("process", "docker"):
            if kind not in kinds:
                continue
            try:
                rep = cleanup(group=self.cfg.experiment.group_id, runtime=kind)
                for line in rep.lines():
                    self.log(f"stale engine: {line}")
            except Exception as e:  # noqa: BLE001 - a note, not a failure
                self.log(f"note: stale-engine cleanup ({kind}) skipped: {e}")

    # -- the whole matrix
    def run(self) -> MatrixSummary:
        from kv_transition.runtime.signals import stop_on_signals

        t0 = time.monotonic()
        groups = {g.group_id: g for g in self.exp.groups}
        n_req = self._n_requests()
        jobs = jobs_for(self.exp, n_req)
        check_fits(jobs, self.inv.devices)
        require_gpu_inventory(self.exp, self.inv)
        self.record.start(self.cfg.experiment.group_id, self.exp.matrix.name, self.matrix_path, self.matrix_sha256,
                          self.lock_data, {"kind": self.inv.kind, "devices": list(self.inv.devices)}, len(self.exp.cells))
        self.board.total_cells = len(self.exp.cells)
        pending = list(jobs)
        free = list(self.inv.devices)
        running: dict[str, tuple[threading.Thread, tuple[int, ...]]] = {}
        done_q: "queue.Queue[tuple[str, list[CellOutcome]]]" = queue.Queue()
        outcomes: list[CellOutcome] = []
        status = "completed"

        def worker(job: Job, gpus: tuple[int, ...]) -> None:
            g = groups[job.key]
            try:
                res = self.groups.run(g, gpus)
            except BaseException as e:  # noqa: BLE001 - never lose a group silently
                res = [CellOutcome(c, "failed", f"group error: {type(e).__name__}: {e}", gpus=gpus, group_id=g.group_id)
                       for c in g.cells]
            done_q.put((job.key, res))

        view = live_view(self) if self.live else null_ctx()
        try:
            with stop_on_signals(self._on_signal), view:
                while pending or running:
                    if not self.cancel.is_set():
                        for job, gpus in assign(pending, free, self.inv.devices):
                            pending.remove(job)
                            free = [g for g in free if g not in gpus]
                            th = threading.Thread(target=worker, args=(job, gpus), name=f"kvt-group-{job.key}", daemon=True)
                            running[job.key] = (th, gpus)
                            th.start()
                    elif pending:
                        for job in pending:
                            outcomes += [CellOutcome(c, "skipped", "matrix interrupted", group_id=job.key)
                                         for c in groups[job.key].cells]
                        pending = []
                    if not running:
                        break
                    try:
                        key, res = done_q.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    th, gpus = running.pop(key)
                    th.join(5)
                    free = [d for d in self.inv.devices if d in set(free) | set(gpus)]
                    outcomes += res
        except (KeyboardInterrupt, SystemExit):
            status = "interrupted"
            self.cancel.set()
            self.stop_all_engines()
            deadline = time.monotonic() + 60
            while running and time.monotonic() < deadline:
                try:
                    key, res = done_q.get(timeout=0.5)
                except queue.Empty:
                    continue
                running.pop(key, None)
                outcomes += res
            self.record.finish(status, outcomes)
            raise
        if status == "completed" and any(o.status != "completed" for o in outcomes):
            status = "failed"
        self.record.finish(status, outcomes)
        order = {c.cell_id: i for i, c in enumerate(self.exp.cells)}
        outcomes.sort(key=lambda o: order.get(o.cell.cell_id, 0))
        return MatrixSummary(self.matrix_run_id, outcomes, dict(self.loads), time.monotonic() - t0, status)

    def _on_signal(self) -> None:
        self.cancel.set()
        self.stop_all_engines()

    def _n_requests(self) -> dict[str, int]:
        conn = self._db()
        try:
            return {r[0]: int(r[1]) for r in conn.execute("SELECT dataset_id, n_entries FROM datasets")}
        finally:
            conn.close()
