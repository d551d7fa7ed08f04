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
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from kv_transition import __version__
from kv_transition.cell import CellResult, git_sha, resolve_cell_spec, run_cell
from kv_transition.config import Config, Paths, resolve_paths
from kv_transition.db import connect, transaction, utcnow
from kv_transition.engines.spec import ResolvedSpec
from kv_transition.matrix.expand import EngineGroup, Expansion, MatrixCell
from kv_transition.matrix.schedule import Job, assign, check_fits
from kv_transition.runtime.base import CELL_LABEL, GROUP_LABEL, OWNER_LABEL, EngineStartError, Instance, Runtime, get_runtime
from kv_transition.runtime.health import port_free


# --- inventory ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inventory:
    devices: tuple[int, ...]
    real: bool                # real GPUs (engines get CUDA_VISIBLE_DEVICES / DeviceRequests) or CPU slots

    @property
    def kind(self) -> str:
        return "gpu" if self.real else "slot"


def inventory(gpus: Optional[str | list[int]] = None, slots: Optional[int] = None,
              nvml: Callable[[], int] | None = None) -> Inventory:
    """--gpus 0,1,2,3 > --slots N (simulated, CPU) > NVML device count > 1 slot."""
    if gpus not in (None, "", []):
        ids = [int(x) for x in gpus.split(",")] if isinstance(gpus, str) else [int(x) for x in gpus]
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            from kv_transition.errors import ConfigError

            raise ConfigError(f"--gpus {gpus!r}: distinct non-negative GPU indices expected")
        return Inventory(tuple(ids), True)
    if slots:
        return Inventory(tuple(range(slots)), False)
    try:
        n = (nvml or _nvml_count)()
    except Exception:  # noqa: BLE001 - no driver / no NVML: CPU
        n = 0
    return Inventory(tuple(range(n)), True) if n else Inventory((0,), False)


def require_gpu_inventory(exp: Expansion, inv: Inventory) -> None:
    """GPU engines never fall back to a CPU slot: a matrix with a GPU cell needs real GPUs (--gpus or
    NVML); exit 2 naming the first such cell otherwise."""
    if inv.real:
        return
    from kv_transition.runtime.gpus import GpuRequiredError, needs_gpu_message

    for c in exp.cells:
        if c.runtime != "external" and c.spec.needs_gpu:
            raise GpuRequiredError(
                f"cell {c.cell_id} ({c.label} on {c.model}): {needs_gpu_message(c.spec)} but no GPU was resolved "
                f"(no --gpus, NVML sees none, or --slots simulates CPU slots); pass --gpus 0,1,… or set "
                f"device: cpu for that engine in the matrix")


def _nvml_count() -> int:
    from kv_transition.telemetry.gpu import nvml_acquire, nvml_release

    nv = nvml_acquire()
    try:
        return int(nv.nvmlDeviceGetCount())
    finally:
        nvml_release()


# --- jobs ---------------------------------------------------------------------------------------

def jobs_for(exp: Expansion, n_requests: Optional[dict[str, int]] = None) -> list[Job]:
    """One Job per engine group; work ≈ one engine load + its cells (× requests when known)."""
    out = []
    for i, g in enumerate(exp.groups):
        per = [max(1, (n_requests or {}).get(c.dataset_id, 1) * c.cfg.decoding.repeats) for c in g.cells]
        scale = sum(per) / len(per)
        out.append(Job(g.group_id, g.tp, work=1.0 + sum(per) / scale, baseline=g.has_baseline, order=i))
    return out


def port_for(base: int, inv: Inventory, gpus: tuple[int, ...]) -> int:
    pos = inv.devices.index(gpus[0]) if gpus else 0
    return base + pos


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def group_cfg(cell: MatrixCell, port: int, gpus: tuple[int, ...], inv: Inventory) -> Config:
    eng = cell.cfg.engine.model_copy(update={"port": port, "gpus": list(gpus) if inv.real else []})
    return cell.cfg.model_copy(update={"engine": eng})


# --- a shared (request-mode) engine -------------------------------------------------------------

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


# --- bookkeeping --------------------------------------------------------------------------------

@dataclass
class CellOutcome:
    cell: MatrixCell
    status: str                 # completed | incomplete | failed | skipped
    reason: Optional[str] = None
    n_ok: int = 0
    n_requests: int = 0
    gpus: tuple[int, ...] = ()
    group_id: str = ""
    elapsed_s: float = 0.0


@dataclass
class MatrixSummary:
    matrix_run_id: Optional[int]
    outcomes: list[CellOutcome]
    engine_loads: dict[str, int]          # group id → engine starts in this run
    wall_s: float
    status: str                           # completed | failed | interrupted

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out


@dataclass
class SlotState:
    group: str = ""
    cell: str = ""
    cell_id: str = ""
    status: str = "idle"
    done: int = 0               # cells of the group finished
    total: int = 0


class Board:
    """Shared state for the live view: one row per GPU/slot."""

    def __init__(self, inv: Inventory):
        self.inv = inv
        self.slots: dict[int, SlotState] = {d: SlotState() for d in inv.devices}
        self.lock = threading.Lock()
        self.finished: list[CellOutcome] = []
        self.total_cells = 0

    def set(self, gpus: tuple[int, ...], **kw: Any) -> None:
        with self.lock:
            for g in gpus:
                for k, v in kw.items():
                    setattr(self.slots[g], k, v)

    def done(self, o: CellOutcome) -> None:
        with self.lock:
            self.finished.append(o)


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
        self.loads: dict[str, int] = {}
        self.matrix_run_id: Optional[int] = None

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

    def _record_start(self) -> None:
        conn = self._db()
        try:
            with transaction(conn):
                cur = conn.execute(
                    "INSERT INTO matrix_runs(group_id, matrix_name, matrix_path, matrix_sha256, lock_json, inventory_json,"
                    " harness_version, git_sha, host, pid, status, n_cells, started_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (self.cfg.experiment.group_id, self.exp.matrix.name, self.matrix_path, self.matrix_sha256,
                     json.dumps(self.lock_data) if self.lock_data else None,
                     json.dumps({"kind": self.inv.kind, "devices": list(self.inv.devices)}), __version__, git_sha(),
                     socket.gethostname(), os.getpid(), "running", len(self.exp.cells), utcnow()))
                self.matrix_run_id = int(cur.lastrowid)
        finally:
            conn.close()

    def _record_cell(self, o: CellOutcome, port: Optional[int], started: str) -> None:
        conn = self._db()
        try:
            conn.execute(
                "INSERT OR REPLACE INTO matrix_cells(matrix_run_id, cell_id, engine_group, model_id, engine, method,"
                " compression_ratio, budget, gpus_json, port, image_lock, status, reason, started_at, finished_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (self.matrix_run_id, o.cell.cell_id, o.group_id, o.cell.model, o.cell.engine, o.cell.method,
                 o.cell.compression_ratio, o.cell.budget, json.dumps(list(o.gpus)), port, o.cell.image_lock,
                 o.status, o.reason, started, utcnow()))
        finally:
            conn.close()

    def _record_load(self, group: EngineGroup, gpus: tuple[int, ...], inst: Instance, error: Optional[str]) -> None:
        conn = self._db()
        try:
            conn.execute(
                "INSERT INTO matrix_engines(matrix_run_id, engine_group, model_id, engine, runtime, gpus_json, port,"
                " ident, image_digest, started_at, ready_at, stopped_at, exit_code, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (self.matrix_run_id, group.group_id, group.model, group.engine, inst.runtime, json.dumps(list(gpus)),
                 inst.spec.port, inst.ident, inst.image_digest or inst.spec.digest, inst.started_at, inst.ready_at,
                 inst.stopped_at or utcnow(), inst.exit_code, error))
        finally:
            conn.close()

    def _finish(self, status: str, outcomes: list[CellOutcome]) -> None:
        conn = self._db()
        try:
            conn.execute("UPDATE matrix_runs SET status=?, n_completed=?, n_failed=?, finished_at=? WHERE matrix_run_id=?",
                         (status, sum(o.status == "completed" for o in outcomes),
                          sum(o.status != "completed" for o in outcomes), utcnow(), self.matrix_run_id))
        finally:
            conn.close()

    # -- preparation
    def prepare(self, progress: bool = False) -> list[str]:
        """Build every model's manifest that is not in the DB yet; → the dataset ids prepared."""
        from kv_transition.prepare import prepare

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

    # -- one group
    def _run_group(self, group: EngineGroup, gpus: tuple[int, ...]) -> list[CellOutcome]:
        base = self.exp.matrix.base_port or self.cfg.engine.port
        port = port_for(base, self.inv, gpus)
        host = group.cells[0].cfg.engine.host
        if group.runtime != "external" and not port_free(host, port):
            port = _free_port(host)
        outcomes: list[CellOutcome] = []
        shared: Optional[SharedEngine] = None
        if group.shared and group.runtime != "external":
            c0 = group.cells[0]
            spec, _, _ = resolve_cell_spec(group_cfg(c0, port, gpus, self.inv), engine=c0.engine, method=c0.method,
                                           compression_ratio=c0.compression_ratio, budget=c0.budget,
                                           tensor_parallel=group.tp, digest=c0.digest)
            labels = {OWNER_LABEL: "kv-transition", GROUP_LABEL: self.cfg.experiment.group_id, CELL_LABEL: group.group_id}
            log_path = self.paths.logs_dir / f"engine-{group.group_id}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)

            def on_load(inst: Instance, err: Optional[str]) -> None:
                self._record_load(group, gpus, inst, err)

            shared = SharedEngine(self._runtime(group.runtime), spec, labels, log_path, on_load)
        try:
            for i, cell in enumerate(group.cells):
                if self.cancel.is_set():
                    outcomes.append(CellOutcome(cell, "skipped", "matrix interrupted", gpus=gpus, group_id=group.group_id))
                    continue
                self.board.set(gpus, group=group.label, cell=cell.label, cell_id=cell.cell_id, status="running",
                               done=i, total=len(group.cells))
                started, t0 = utcnow(), time.monotonic()
                rt_impl: Optional[Runtime] = LentRuntime(shared) if shared else (
                    self._runtime(cell.runtime) if cell.runtime != "external" else None)
                try:
                    res: CellResult = run_cell(group_cfg(cell, port, gpus, self.inv), self._paths(cell),
                                               engine=cell.engine, method=cell.method,
                                               compression_ratio=cell.compression_ratio, budget=cell.budget,
                                               runtime_impl=rt_impl, tensor_parallel=cell.tp, digest=cell.digest,
                                               **self.cell_kwargs)
                    o = CellOutcome(cell, res.status, res.reason, res.n_ok, res.n_requests, gpus, group.group_id)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # noqa: BLE001 - continue on error
                    o = CellOutcome(cell, "failed", f"{type(e).__name__}: {e}", gpus=gpus, group_id=group.group_id)
                    self.log(traceback.format_exc(limit=3))
                o.elapsed_s = time.monotonic() - t0
                outcomes.append(o)
                self.board.done(o)
                self._record_cell(o, port, started)
                self.log(f"[{self.inv.kind} {','.join(map(str, gpus))}] {cell.label} ({cell.model}) {o.status}"
                         f" {o.n_ok}/{o.n_requests}" + (f": {o.reason.splitlines()[0]}" if o.reason and o.status != "completed" else ""))
        finally:
            if shared is not None:
                shared.close()
                self.loads[group.group_id] = shared.loads
            self.board.set(gpus, group="", cell="", cell_id="", status="idle", done=0, total=0)
        return outcomes

    # -- the whole matrix
    def run(self) -> MatrixSummary:
        from kv_transition.runtime.signals import stop_on_signals

        t0 = time.monotonic()
        groups = {g.group_id: g for g in self.exp.groups}
        n_req = self._n_requests()
        jobs = jobs_for(self.exp, n_req)
        check_fits(jobs, self.inv.devices)
        require_gpu_inventory(self.exp, self.inv)
        self._record_start()
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
                res = self._run_group(g, gpus)
            except BaseException as e:  # noqa: BLE001 - never lose a group silently
                res = [CellOutcome(c, "failed", f"group error: {type(e).__name__}: {e}", gpus=gpus, group_id=g.group_id)
                       for c in g.cells]
            done_q.put((job.key, res))

        view = _live_view(self) if self.live else _null_ctx()
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
            self._finish(status, outcomes)
            raise
        if status == "completed" and any(o.status != "completed" for o in outcomes):
            status = "failed"
        self._finish(status, outcomes)
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


@contextmanager
def _null_ctx() -> Iterator[None]:
    yield


@contextmanager
def _live_view(runner: MatrixRunner) -> Iterator[None]:
    from rich.live import Live

    from kv_transition.matrix.view import render

    cache: dict[str, Any] = {"t": 0.0, "progress": {}}

    def get() -> Any:
        now = time.monotonic()
        if now - cache["t"] > 1.0:
            cache["t"] = now
            cache["progress"] = _progress(runner.paths.db)
        return render(runner.board, cache["progress"])

    with Live(get_renderable=get, console=runner.console, refresh_per_second=2, transient=False):
        yield


def _progress(db: Path) -> dict[str, tuple[int, int, int]]:
    try:
        conn = connect(db, readonly=True)
    except Exception:  # noqa: BLE001
        return {}
    try:
        return {r[0]: (int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)) for r in conn.execute(
            "SELECT c.cell_id, c.n_requests, SUM(q.status='ok'), SUM(q.status='failed') FROM cells c"
            " LEFT JOIN requests q ON q.cell_id = c.cell_id GROUP BY c.cell_id")}
    except Exception:  # noqa: BLE001 - a locked/partial DB never breaks the view
        return {}
    finally:
        conn.close()
