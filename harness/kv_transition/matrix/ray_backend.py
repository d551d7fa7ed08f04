"""The Ray backend of `kvt matrix run --backend ray`: every engine group becomes one Ray actor that asks for
the group's GPUs (`num_gpus = tp`; a CPU engine asks for a CPU, or one unit of `--ray-slot-resource`), and
runs `GroupRunner.run` on the node Ray picked: the engine starts there with the group's runtime (docker or
process, loopback only), the requests go out from there, NVML is sampled there.

One DB, exactly once: only this driver writes `runs/<group>/kv_transition.sqlite`. A group starts from a
shard — its cells' rows plus the manifest they send (`db.merge.export_shard`) — that the node keeps as a
local SQLite file and `run_cell` writes as usual. Every `sync_s` the driver pulls the shard's rows back
and merges them (`db.merge.merge_into`: stable keys, so a re-sent batch adds nothing); the last pull comes
when the group ends.

Faults:
* a worker node dies: whatever the last pull brought is kept; the requests that were in flight are
  recorded as `aborted` attempts (the node reports its in-flight set with each pull), the node's
  running runs are closed `killed`, and the group goes to another node (≤ `max_retries` times), where its
  shard is rebuilt from this DB — only the missing requests are sent — else its cells end `failed`;
* the driver dies: the actors die with it (Ray owns them); re-running the command resumes (a complete
  group starts no actor, an incomplete one sends only what is missing);
* SIGINT / SIGTERM: every actor stops its engines, its rows are pulled a last time, then label-based
  cleanup runs on every node (`runtime.cleanup.cleanup(group=…)`) and the actors are killed.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
import types
from pathlib import Path
from typing import Any, Optional

from kv_transition.errors import ConfigError, KvtError
from kv_transition.matrix.expand import EngineGroup, Expansion
from kv_transition.matrix.inventory import Inventory
from kv_transition.matrix.outcome import CellOutcome, MatrixSummary
from kv_transition.matrix.run import MatrixRunner, jobs_for
from kv_transition.matrix.schedule import priority

ENV_PREFIXES = ("KVT_", "HF_", "MKL_", "OMP_", "TRANSFORMERS_", "TOKENIZERS_", "DOCKER_")  # sent to the nodes
NAMESPACE = "kv-transition"


class RayUnavailableError(KvtError):
    """Ray is not installed, or no cluster answers at the address. CLI exit 2."""


# --- what Ray is asked for --------------------------------------------------------------------------

def group_needs_gpu(group: EngineGroup) -> bool:
    return any(c.runtime != "external" and c.spec.needs_gpu for c in group.cells)


def ray_request(group: EngineGroup, slot_resource: Optional[str] = None) -> dict[str, Any]:
    """The actor options for one engine group: GPUs = tp for a GPU engine; a CPU engine takes one CPU (or
    one unit of the custom `slot_resource`, e.g. a `kvt_slot` each CPU node declares)."""
    if group_needs_gpu(group):
        return {"num_gpus": group.tp, "num_cpus": 1}
    if slot_resource:
        return {"num_cpus": 0, "resources": {slot_resource: 1}}
    return {"num_cpus": 1}


def request_label(req: dict[str, Any]) -> str:
    parts = [f"GPU={req['num_gpus']}"] if req.get("num_gpus") else []
    parts.append(f"CPU={req.get('num_cpus', 0)}")
    parts += [f"{k}={v:g}" for k, v in (req.get("resources") or {}).items()]
    return " ".join(parts)


def plan_ray(exp: Expansion, slot_resource: Optional[str] = None) -> list[dict[str, Any]]:
    """What `kvt matrix plan --backend ray` shows: per group (priority order) the resources asked for."""
    order = {j.key: i for i, j in enumerate(priority(jobs_for(exp)))}
    out = []
    for g in sorted(exp.groups, key=lambda g: order[g.group_id]):
        req = ray_request(g, slot_resource)
        out.append({"group_id": g.group_id, "engine": g.engine, "model": g.model, "runtime": g.runtime, "tp": g.tp,
                    "shared_engine": g.shared, "ray_request": req, "ray_request_label": request_label(req),
                    "submit_order": order[g.group_id],
                    "cells": [{"cell_id": c.cell_id, "method": c.method, "compression_ratio": c.compression_ratio,
                               "budget": c.budget, "baseline": c.baseline} for c in g.cells]})
    return out


def check_feasible(exp: Expansion, nodes: list[dict[str, float]], slot_resource: Optional[str]) -> None:
    """Every group's request fits some live node's resources (else it would wait forever): exit 2 naming
    the first that cannot."""
    for g in exp.groups:
        req = ray_request(g, slot_resource)
        need = {"GPU": req.get("num_gpus", 0), "CPU": req.get("num_cpus", 0), **(req.get("resources") or {})}
        if not any(all(float(n.get(k, 0)) >= v for k, v in need.items() if v) for n in nodes):
            have = "; ".join(request_label({"num_gpus": n.get("GPU", 0), "num_cpus": n.get("CPU", 0),
                                            "resources": {k: v for k, v in n.items()
                                                          if k not in ("GPU", "CPU") and not k.startswith(("node:", "memory", "object_store"))}})
                             for n in nodes) or "no live node"
            raise ConfigError(f"group {g.group_id}: asks Ray for {request_label(req)} but no node of the cluster has "
                              f"that ({have}); add such a node, or pass --ray-slot-resource for CPU engines")


# --- Ray itself -------------------------------------------------------------------------------------

def import_ray() -> Any:
    try:
        import ray  # noqa: PLC0415
    except ImportError as e:
        raise RayUnavailableError(f"--backend ray: the ray package is not installed ({e}); `make ray` or "
                                  "pip install 'kv-transition[ray]'") from None
    return ray


def connect_ray(address: Optional[str]) -> Any:
    """ray.init to an existing cluster (`auto`, `host:port` or `ray://host:port`); never starts one."""
    ray = import_ray()
    addr = address or "auto"
    if ray.is_initialized():
        return ray
    probe = os.environ.get("RAY_ADDRESS", "") if addr == "auto" else addr
    hostport = probe.split("://", 1)[-1]
    if ":" in hostport:  # Ray itself retries a dead address for minutes: one quick TCP check first
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise RayUnavailableError(f"--ray-address {addr}: no Ray cluster answers at {hostport} ({e}); start one "
                                      "first: `ray start --head` (see README: running on a Ray cluster)") from None
    try:
        ray.init(address=addr, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayUnavailableError(f"--ray-address {addr}: no Ray cluster answers ({str(e).splitlines()[0][:200]}); "
                                  "start one first: `ray start --head` (see README: running on a Ray cluster)") from None
    return ray


def node_resources(ray: Any) -> list[dict[str, float]]:
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


# --- the node side: one actor per engine group ------------------------------------------------------

class NodeLog:
    """The node's stand-in for MatrixLog: what the group would record, kept to be sent to the driver."""

    def __init__(self) -> None:
        self.matrix_run_id = None
        self.items: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def cell(self, o: CellOutcome, port: Optional[int], started: str) -> None:
        with self.lock:
            self.items.append(("cell", (o, port, started)))

    def load(self, group: EngineGroup, gpus: tuple[int, ...], inst: Any, error: Optional[str]) -> None:
        from kv_transition.db import utcnow

        row = {"runtime": inst.runtime, "port": inst.spec.port, "ident": inst.ident,
               "image_digest": inst.image_digest or inst.spec.digest, "started_at": inst.started_at,
               "ready_at": inst.ready_at, "stopped_at": inst.stopped_at or utcnow(), "exit_code": inst.exit_code}
        with self.lock:
            self.items.append(("load", (gpus, row, error)))

    def take(self) -> list[tuple[str, Any]]:
        with self.lock:
            out, self.items = self.items, []
        return out


class GroupWorker:
    """The body of the Ray actor (decorated with ray.remote by the driver): runs one engine group on this
    node against a node-local shard DB, reports its rows on `poll`."""

    def __init__(self, env: dict[str, str]):
        for k in [k for k in os.environ if k.startswith(ENV_PREFIXES) and k not in env]:
            del os.environ[k]  # the driver's settings, not what the node's raylet was started with
        os.environ.update(env)
        self.thread: Optional[threading.Thread] = None
        self.cancel = threading.Event()
        self.outcomes: Optional[list[CellOutcome]] = None
        self.error: Optional[str] = None
        self.runtimes: list[Any] = []
        self.rt_lock = threading.Lock()
        self.in_flight: dict[tuple[int, int], tuple[int, str]] = {}   # (request_id, attempt_no) → (run_id, started_at)
        self.if_lock = threading.Lock()
        self.log = NodeLog()
        self.shard: Optional[Path] = None
        self.cells: set[str] = set()
        self.sent_final: set[int] = set()   # shard run ids whose final rows the driver has
        self.node: dict[str, Any] = {}

    def where(self) -> dict[str, Any]:
        import ray

        from kv_transition import __version__
        from kv_transition.cell import git_sha

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "ip": ray.util.get_node_ip_address(), "gpus": [int(g) for g in ray.get_gpu_ids()],
                "harness": f"{__version__} {git_sha() or ''}".strip()}

    def _runtime(self, name: str) -> Any:
        from kv_transition.runtime.base import get_runtime

        rt = get_runtime(name)
        with self.rt_lock:
            self.runtimes.append(rt)
        return rt

    def _on_attempt(self, run_id: int, request_id: int, n: int, started_at: str, began: bool) -> None:
        with self.if_lock:
            if began:
                self.in_flight[(request_id, n)] = (run_id, started_at)
            else:
                self.in_flight.pop((request_id, n), None)

    def start(self, p: dict[str, Any]) -> dict[str, Any]:
        """Write the shard, start the group in a thread; → where it runs."""
        import tempfile

        from kv_transition.matrix.group import GroupRunner
        from kv_transition.matrix.view import Board

        self.node = self.where()
        group: EngineGroup = p["group"]
        work = Path(os.environ.get("KVT_RAY_WORKDIR") or tempfile.gettempdir()) / "kvt-ray" / p["experiment_group"] / (
            f"{group.group_id}-{os.getpid()}")
        work.mkdir(parents=True, exist_ok=True)
        self.shard = work / "shard.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.shard) + suffix).unlink(missing_ok=True)
        self.shard.write_bytes(p["shard"])
        self.cells = {c.cell_id for c in group.cells}
        gpus = tuple(self.node["gpus"]) if p["needs_gpu"] else (0,)
        inv = Inventory(gpus, p["needs_gpu"])
        logs = work / "logs"
        paths = {c.cell_id: dataclasses.replace(pp, db=self.shard, logs_dir=logs, run_dir=work)
                 for c, pp in zip(group.cells, p["paths"])}
        # a retry takes other ports than the attempt before it: on a shared host (a test cluster) the dead
        # node's engine may still hold them
        base = p["base_port"] + (gpus[0] if p["needs_gpu"] else p["order"]) + 64 * p.get("attempt", 0)
        gr = GroupRunner(base_port=base, inv=inv, experiment_group=p["experiment_group"], logs_dir=logs,
                         runtime=self._runtime, record=self.log, paths_for=lambda c: paths[c.cell_id],  # type: ignore[arg-type]
                         board=Board(inv), cancel=self.cancel,
                         cell_kwargs={**p.get("cell_kwargs", {}), "on_attempt": self._on_attempt})

        def body() -> None:
            try:
                self.outcomes = gr.run(group, gpus)
            except BaseException as e:  # noqa: BLE001 - reported to the driver
                self.error = f"{type(e).__name__}: {e}"
                self.outcomes = []

        self.thread = threading.Thread(target=body, name=f"kvt-ray-group-{group.group_id}", daemon=True)
        self.thread.start()
        return {**self.node, "shard": str(self.shard)}

    def poll(self) -> dict[str, Any]:
        """The shard's rows of this group's cells (consistent copy), what is in flight, what was recorded,
        and, once the group ended, its outcomes."""
        from kv_transition.db.merge import export_shard, open_source

        done = self.thread is not None and not self.thread.is_alive()
        with self.if_lock:
            flying = dict(self.in_flight)
        records = self.log.take()
        assert self.shard is not None
        mem = open_source(self.shard)  # a consistent copy (SQLite's backup) while run_cell keeps writing
        try:
            # a finished run's engine/telemetry/event rows went with an earlier pull: not again
            rows = export_shard(mem, self.cells, manifests=False, skip_runs=self.sent_final)
            self.sent_final |= {int(r[0]) for r in mem.execute("SELECT run_id FROM runs WHERE status<>'running'")}
            flight = []
            for (rid, n), (run_id, started) in flying.items():
                q = mem.execute("SELECT cell_id, example_id, repeat FROM requests WHERE request_id=?", (rid,)).fetchone()
                r = mem.execute("SELECT host, pid, started_at FROM runs WHERE run_id=?", (run_id,)).fetchone()
                if q is not None and r is not None:
                    flight.append({"cell_id": q[0], "example_id": q[1], "repeat": q[2], "attempt_no": n,
                                   "started_at": started, "run": {"host": r[0], "pid": r[1], "started_at": r[2]}})
        finally:
            mem.close()
        return {"done": done, "rows": rows, "in_flight": flight, "records": records,
                "outcomes": self.outcomes if done else None, "error": self.error if done else None}

    def discard(self) -> bool:
        """The driver merged the last pull: the shard (a copy of rows it now has) goes; engine logs stay."""
        if self.shard is not None and (self.thread is None or not self.thread.is_alive()):
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.shard) + suffix).unlink(missing_ok=True)
            return True
        return False

    def stop(self) -> bool:
        """SIGINT on the driver: stop this node's engines (the cells end incomplete, the rest skipped)."""
        self.cancel.set()
        with self.rt_lock:
            rts = list(self.runtimes)
        for rt in rts:
            try:
                rt.stop_all()
            except Exception:  # noqa: BLE001 - best effort
                pass
        if self.thread is not None:
            self.thread.join(60)
        return True


def node_cleanup(group: Optional[str], kinds: list[str], dry_run: bool = False, force: bool = False) -> dict[str, Any]:
    """Label-based cleanup of this experiment group's engines on the node it runs on."""
    from kv_transition.runtime.cleanup import cleanup

    lines, skipped = [], []
    for kind in kinds:
        try:
            rep = cleanup(group=group, runtime=kind, dry_run=dry_run, force=force)
            lines += rep.lines()
            skipped += rep.skipped
        except Exception as e:  # noqa: BLE001 - a note per node, never a failure
            skipped.append(f"{kind}: {e}")
    return {"host": socket.gethostname(), "lines": lines, "skipped": skipped}


def cleanup_cluster(ray: Any, group: Optional[str], kinds: list[str], *, dry_run: bool = False, force: bool = False,
                    timeout_s: float = 120.0) -> list[str]:
    """`node_cleanup` on every live node of the cluster (one task pinned to each node) → lines, each
    prefixed with the node's host name."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(node_cleanup)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [task.options(num_cpus=0, runtime_env={"env_vars": forwarded_env()},
                         scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                         ).remote(group, kinds, dry_run, force) for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out = [f"cleanup: {len(refs) - len(ready)} node(s) did not answer within {timeout_s:.0f} s"] if len(ready) < len(refs) else []
    for r in ready:
        try:
            res = ray.get(r)
        except Exception as e:  # noqa: BLE001 - a node that went away meanwhile
            out.append(f"cleanup on a node failed: {type(e).__name__}")
            continue
        out += [f"{res['host']}: {line}" for line in res["lines"]]
        out += [f"{res['host']}: note: {s}" for s in res["skipped"]]
    return out


# --- the driver -------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Live:
    group: EngineGroup
    actor: Any
    attempt: int                   # 0 = first placement
    start_ref: Any
    node: Optional[dict[str, Any]] = None
    poll_ref: Any = None
    last_poll: float = 0.0
    in_flight: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    done: bool = False
    stopping: bool = False


class RayMatrixRunner(MatrixRunner):
    """The matrix on a Ray cluster. Same inputs, records and summary as the local MatrixRunner."""

    def __init__(self, cfg: Any, exp: Expansion, *, address: Optional[str] = None, max_retries: int = 2,
                 sync_s: float = 5.0, slot_resource: Optional[str] = None, **kw: Any):
        kw.pop("live", None)
        super().__init__(cfg, exp, Inventory((0,), False), live=False, **kw)
        self.address, self.max_retries, self.sync_s, self.slot_resource = address, max_retries, sync_s, slot_resource
        self.ray: Any = None
        self.live_groups: dict[str, _Live] = {}
        self.nodes_seen: dict[str, str] = {}     # node id → host
        self.lock = threading.Lock()

    # -- helpers
    @staticmethod
    def _harness() -> str:
        from kv_transition import __version__
        from kv_transition.cell import git_sha

        return f"{__version__} {git_sha() or ''}".strip()

    def connect(self) -> Any:
        if self.ray is None:
            self.ray = connect_ray(self.address)
            check_feasible(self.exp, node_resources(self.ray), self.slot_resource)
        return self.ray

    def _merge(self, rows: bytes, what: str) -> None:
        from kv_transition.db import connect
        from kv_transition.db.merge import merge_into

        conn = connect(self.paths.db, busy_timeout_s=300)
        try:
            rep = merge_into(conn, rows, source_name=what, manifests=False, matrix=False)
        finally:
            conn.close()
        for c in rep.conflicts:
            self.log(f"note: {what}: {c}")

    def _replay(self, records: list[tuple[str, Any]], group: EngineGroup, node: Optional[dict[str, Any]]) -> None:
        for kind, data in records:
            if kind == "cell":
                o, port, started = data
                self.record.cell(o, port, started)
                where = f"{node['host']} {node['node_id'][:8]}" if node else "?"
                self.log(f"[ray {where}] {o.cell.label} ({o.cell.model}) {o.status} {o.n_ok}/{o.n_requests}"
                         + (f": {o.reason.splitlines()[0]}" if o.reason and o.status != "completed" else ""))
            elif kind == "load":
                gpus, row, err = data
                inst = types.SimpleNamespace(runtime=row["runtime"], ident=row["ident"], image_digest=row["image_digest"],
                                             started_at=row["started_at"], ready_at=row["ready_at"],
                                             stopped_at=row["stopped_at"], exit_code=row["exit_code"],
                                             spec=types.SimpleNamespace(port=row["port"], digest=None))
                self.record.load(group, gpus, inst, err)  # type: ignore[arg-type]
                self.loads[group.group_id] = self.loads.get(group.group_id, 0) + 1

    def _complete_cell(self, c: Any) -> bool:
        """Every request of the cell (entries × repeats) has a response in this DB."""
        from kv_transition.db import connect

        want = self._n_requests().get(c.dataset_id, 0) * c.cfg.decoding.repeats
        conn = connect(self.paths.db)
        try:
            got = conn.execute("SELECT COUNT(*) FROM requests WHERE cell_id=? AND status='ok' AND repeat<?",
                               (c.cell_id, c.cfg.decoding.repeats)).fetchone()[0]
        finally:
            conn.close()
        return bool(want) and got >= want

    def _complete(self, group: EngineGroup) -> bool:
        """Every cell of the group is complete already (resume: start no actor)."""
        return all(self._complete_cell(c) for c in group.cells)

    def _payload(self, group: EngineGroup, order: int, attempt: int = 0) -> dict[str, Any]:
        from kv_transition.db import connect
        from kv_transition.db.merge import export_shard

        conn = connect(self.paths.db)
        try:
            shard = export_shard(conn, {c.cell_id for c in group.cells}, datasets={c.dataset_id for c in group.cells},
                                 telemetry=False)
        finally:
            conn.close()
        return {"group": group, "shard": shard, "paths": [self._paths(c) for c in group.cells],
                "experiment_group": self.cfg.experiment.group_id, "needs_gpu": group_needs_gpu(group),
                "base_port": self.exp.matrix.base_port or self.cfg.engine.port, "order": order, "attempt": attempt,
                "cell_kwargs": self.cell_kwargs}

    def _submit(self, group: EngineGroup, attempt: int, order: int) -> _Live:
        ray = self.ray
        opts = {**ray_request(group, self.slot_resource), "max_restarts": 0, "max_task_retries": 0,
                "runtime_env": {"env_vars": forwarded_env()}}
        actor = ray.remote(GroupWorker).options(**opts).remote(forwarded_env())
        live = _Live(group, actor, attempt, actor.start.remote(self._payload(group, order, attempt)))
        self.live_groups[group.group_id] = live
        return live

    def _record_death(self, live: _Live, why: str) -> None:
        """The node is gone: its in-flight requests become aborted attempts, its running runs `killed`."""
        from kv_transition.db import connect, transaction, utcnow
        from kv_transition.db.stale import stored_counts

        node = live.node or {}
        reason = f"killed: worker node {node.get('host', '?')} ({str(node.get('node_id', '?'))[:8]}) died: {why}"
        now = utcnow()
        conn = connect(self.paths.db, busy_timeout_s=300)
        try:
            with transaction(conn):
                for f in live.in_flight:
                    rid = conn.execute("SELECT request_id FROM requests WHERE cell_id=? AND example_id=? AND repeat=?",
                                       (f["cell_id"], f["example_id"], f["repeat"])).fetchone()
                    run = conn.execute("SELECT run_id FROM runs WHERE cell_id=? AND host=? AND pid=? AND started_at=?",
                                       (f["cell_id"], f["run"]["host"], f["run"]["pid"], f["run"]["started_at"])).fetchone()
                    if rid is None or run is None:
                        continue
                    if conn.execute("SELECT 1 FROM attempts WHERE request_id=? AND run_id=? AND started_at=?",
                                    (rid[0], run[0], f["started_at"])).fetchone():
                        continue
                    n = f["attempt_no"]
                    if conn.execute("SELECT 1 FROM attempts WHERE request_id=? AND attempt_no=?", (rid[0], n)).fetchone():
                        n = int(conn.execute("SELECT MAX(attempt_no) FROM attempts WHERE request_id=?",
                                             (rid[0],)).fetchone()[0]) + 1
                    try:
                        from datetime import datetime

                        dur = max(0.0, time.time() - datetime.fromisoformat(f["started_at"]).timestamp())
                    except ValueError:
                        dur = 0.0
                    conn.execute("INSERT INTO attempts(request_id, attempt_no, run_id, started_at, duration_s, ok,"
                                 " error_kind, error, retryable) VALUES (?,?,?,?,?,0,'aborted',?,1)",
                                 (rid[0], n, run[0], f["started_at"], dur, f"aborted: {reason}"))
                    conn.execute("UPDATE requests SET n_attempts=MAX(n_attempts, ?), updated_at=? WHERE request_id=?",
                                 (n, now, rid[0]))
                cells = [c.cell_id for c in live.group.cells]
                marks = ",".join("?" * len(cells))
                runs = conn.execute(f"SELECT run_id, cell_id FROM runs WHERE status='running' AND cell_id IN ({marks})"
                                    + (" AND host=? AND pid=?" if node else ""),
                                    [*cells, *([node["host"], node["pid"]] if node else [])]).fetchall()
                for run_id, cell_id in runs:
                    c = stored_counts(conn, run_id)
                    conn.execute("UPDATE runs SET status='killed', reason=?, n_sent=?, n_ok=?, n_failed=?, finished_at=?"
                                 " WHERE run_id=?", (reason, c["n_sent"], c["n_ok"], c["n_failed"], now, run_id))
                    conn.execute("UPDATE engine_instances SET stopped_at=COALESCE(stopped_at, ?), error=COALESCE(error, ?)"
                                 " WHERE run_id=?", (now, "the worker node died", run_id))
                    conn.execute("INSERT INTO events(run_id, cell_id, t, level, kind, message, data_json)"
                                 " VALUES (?,?,?,?,?,?,NULL)", (run_id, cell_id, time.time(), "warning", "node_died", reason))
                    conn.execute("UPDATE cells SET status='incomplete', reason=?, updated_at=? WHERE cell_id=?"
                                 " AND status='running'", (f"run {run_id} {reason}", now, cell_id))
                from kv_transition.db.merge import refresh_cells

                refresh_cells(conn, cells)
                engines = {} if not runs else {r["ident"]: dict(r) for r in conn.execute(
                    f"SELECT * FROM engine_instances WHERE run_id IN ({','.join('?' * len(runs))}) AND ident IS NOT NULL",
                    [r[0] for r in runs])}
        finally:
            conn.close()
        if live.group.shared:  # the dead node's engine load never reported its end: record it here
            for e in engines.values():
                inst = types.SimpleNamespace(runtime=e["runtime"], ident=e["ident"], image_digest=e["image_digest"],
                                             started_at=e["started_at"], ready_at=e["ready_at"], stopped_at=now,
                                             exit_code=None, spec=types.SimpleNamespace(port=None, digest=None))
                self.record.load(live.group, tuple(node.get("gpus") or ()), inst, "the worker node died")  # type: ignore[arg-type]
                self.loads[live.group.group_id] = self.loads.get(live.group.group_id, 0) + 1
        self.log(f"{live.group.group_id}: {reason}; {len(live.in_flight)} in-flight request(s) recorded as aborted attempts")

    def _close_orphans(self) -> None:
        """Runs a dead driver's remote groups left `running` (other hosts: close_stale_runs cannot see them)."""
        from kv_transition.db import connect, transaction, utcnow
        from kv_transition.db.stale import close_stale_runs, stored_counts

        conn = connect(self.paths.db)
        try:
            close_stale_runs(conn)
            if conn.execute("SELECT COUNT(*) FROM matrix_runs WHERE status='running'").fetchone()[0]:
                return  # another matrix driver of this group may be alive
            me = socket.gethostname()
            now = utcnow()
            with transaction(conn):
                for run_id, cell_id, host in conn.execute(
                        "SELECT run_id, cell_id, host FROM runs WHERE status='running' AND host<>?", (me,)).fetchall():
                    c = stored_counts(conn, run_id)
                    reason = f"killed: its matrix driver ended without closing this run (remote host {host})"
                    conn.execute("UPDATE runs SET status='killed', reason=?, n_sent=?, n_ok=?, n_failed=?, finished_at=?"
                                 " WHERE run_id=?", (reason, c["n_sent"], c["n_ok"], c["n_failed"], now, run_id))
                    conn.execute("UPDATE cells SET status='incomplete', reason=?, updated_at=? WHERE cell_id=?"
                                 " AND status='running'", (f"run {run_id} {reason}", now, cell_id))
        finally:
            conn.close()

    def cleanup_stale(self) -> None:
        """Label-based cleanup of this group's leftover engines on every live node."""
        self.connect()
        self._close_orphans()
        for line in self.cleanup_nodes():
            self.log(f"stale engine: {line}")

    def cleanup_nodes(self, timeout_s: float = 120.0) -> list[str]:
        kinds = sorted({c.runtime for c in self.exp.cells} & {"process", "docker"})
        return cleanup_cluster(self.connect(), self.cfg.experiment.group_id, kinds, timeout_s=timeout_s) if kinds else []

    # -- the whole matrix
    def run(self) -> MatrixSummary:
        from kv_transition.runtime.signals import stop_on_signals

        ray = self.connect()
        t0 = time.monotonic()
        self.record.start(self.cfg.experiment.group_id, self.exp.matrix.name, self.matrix_path, self.matrix_sha256,
                          self.lock_data, {"kind": "ray", "devices": [], "address": self.address or "auto",
                                           "nodes": len(node_resources(ray))}, len(self.exp.cells))
        groups = {g.group_id: g for g in self.exp.groups}
        order = [j.key for j in priority(jobs_for(self.exp, self._n_requests()))]
        outcomes: list[CellOutcome] = []
        status = "completed"
        for i, key in enumerate(order):
            g = groups[key]
            if self._complete(g):
                from kv_transition.db import utcnow

                for c in g.cells:
                    o = CellOutcome(c, "completed", "nothing to send: every request has a response",
                                    group_id=g.group_id)
                    self.record.cell(o, None, utcnow())
                    outcomes.append(o)
                self.loads[g.group_id] = 0
                continue
            self._submit(g, 0, i)
        try:
            with stop_on_signals(self._on_signal):
                while self.live_groups:
                    outcomes += self._step(order)
                    time.sleep(0.2)
        except (KeyboardInterrupt, SystemExit):
            status = "interrupted"
            self._on_signal()
            deadline = time.monotonic() + 90
            while any(not lv.done for lv in self.live_groups.values()) and time.monotonic() < deadline:
                outcomes += self._step(order, final=True)
                time.sleep(0.2)
            for lv in self.live_groups.values():
                if not lv.done:
                    outcomes += [CellOutcome(c, "incomplete", "interrupted", group_id=lv.group.group_id)
                                 for c in lv.group.cells]
            self._shutdown()
            self.record.finish(status, outcomes)
            raise
        self._shutdown()
        if any(o.status != "completed" for o in outcomes):
            status = "failed"
        self.record.finish(status, outcomes)
        pos = {c.cell_id: i for i, c in enumerate(self.exp.cells)}
        outcomes.sort(key=lambda o: pos.get(o.cell.cell_id, 0))
        return MatrixSummary(self.matrix_run_id, outcomes, dict(self.loads), time.monotonic() - t0, status)

    def _step(self, order: list[str], final: bool = False) -> list[CellOutcome]:
        """One pass over the live groups: started?, due for a pull?, finished?, dead?"""
        ray = self.ray
        out: list[CellOutcome] = []
        now = time.monotonic()
        for key, lv in list(self.live_groups.items()):
            if lv.done:
                continue
            try:
                if lv.node is None:
                    ready, _ = ray.wait([lv.start_ref], timeout=0)
                    if not ready:
                        continue
                    lv.node = ray.get(lv.start_ref)
                    self.nodes_seen[lv.node["node_id"]] = lv.node["host"]
                    self.log(f"{key}: on node {lv.node['host']} {lv.node['node_id'][:8]} (pid {lv.node['pid']}"
                             + (f", GPUs {','.join(map(str, lv.node['gpus']))}" if lv.node["gpus"] else "") + ")")
                    lv.last_poll = now
                    if lv.node.get("harness") != self._harness():
                        self.log(f"note: {key}: node {lv.node['host']} runs harness {lv.node.get('harness')}, this "
                                 f"driver {self._harness()} (install the same checkout on every node)")
                if lv.poll_ref is None and (final or now - lv.last_poll >= self.sync_s):
                    lv.poll_ref = lv.actor.poll.remote()
                if lv.poll_ref is not None:
                    ready, _ = ray.wait([lv.poll_ref], timeout=0)
                    if not ready:
                        continue
                    res = ray.get(lv.poll_ref)
                    lv.poll_ref, lv.last_poll = None, time.monotonic()
                    self._merge(res["rows"], f"group {key} on {lv.node['host']}")
                    lv.in_flight = res["in_flight"]
                    self._replay(res["records"], lv.group, lv.node)
                    if res["done"]:
                        lv.done = True
                        got = res["outcomes"] or []
                        if res["error"]:
                            self.log(f"{key}: group error on {lv.node['host']}: {res['error']}")
                            seen = {o.cell.cell_id for o in got}
                            got += [CellOutcome(c, "failed", f"group error: {res['error']}", group_id=key)
                                    for c in lv.group.cells if c.cell_id not in seen]
                        out += got
                        try:
                            ray.get(lv.actor.discard.remote(), timeout=30)
                        except Exception:  # noqa: BLE001 - a shard left on the node is only disk
                            pass
                        ray.kill(lv.actor)
            except Exception as e:  # noqa: BLE001 - RayActorError & co: the actor (its node) is gone
                lv.done = True
                if not _actor_gone(ray, e):  # the group's code failed on the node: this group fails, not the matrix
                    why = f"group error on the node: {type(e).__name__}: {str(e).splitlines()[-1][:300] if str(e) else ''}"
                    self.log(f"{key}: {why}")
                    for c in lv.group.cells:
                        o = CellOutcome(c, "failed", why, group_id=key)
                        self.record.cell(o, None, _now())
                        out.append(o)
                    try:
                        ray.kill(lv.actor)
                    except Exception:  # noqa: BLE001
                        pass
                    continue
                self._record_death(lv, type(e).__name__)
                if final or self.cancel.is_set() or lv.attempt >= self.max_retries:
                    why = (f"worker node died; not retried (--ray-max-retries {self.max_retries})"
                           if not (final or self.cancel.is_set()) else "worker node died while stopping")
                    for c in lv.group.cells:
                        o = (CellOutcome(c, "completed", "answered before its node died", group_id=key)
                             if self._complete_cell(c) else CellOutcome(c, "failed", why, group_id=key))
                        self.record.cell(o, None, _now())
                        out.append(o)
                else:
                    self.log(f"{key}: retrying on another node ({lv.attempt + 1}/{self.max_retries})")
                    self._submit(lv.group, lv.attempt + 1, order.index(key))
        for key in [k for k, lv in self.live_groups.items() if lv.done]:
            del self.live_groups[key]
        return out

    def _on_signal(self) -> None:
        self.cancel.set()
        for lv in list(self.live_groups.values()):
            if not lv.stopping:
                lv.stopping = True
                try:
                    lv.actor.stop.remote()
                except Exception:  # noqa: BLE001 - best effort
                    pass

    def _shutdown(self) -> None:
        ray = self.ray
        for lv in list(self.live_groups.values()):
            try:
                ray.kill(lv.actor)
            except Exception:  # noqa: BLE001
                pass
        self.live_groups.clear()
        try:
            for line in self.cleanup_nodes():
                self.log(f"cleanup: {line}")
        except Exception as e:  # noqa: BLE001 - a note
            self.log(f"note: node cleanup skipped: {e}")

    def stop_all_engines(self) -> None:
        self._on_signal()


def _now() -> str:
    from kv_transition.db import utcnow

    return utcnow()


def _actor_gone(ray: Any, e: BaseException) -> bool:
    ex = ray.exceptions
    kinds = tuple(k for k in (getattr(ex, "RayActorError", None), getattr(ex, "ActorDiedError", None),
                              getattr(ex, "ActorUnavailableError", None), getattr(ex, "NodeDiedError", None),
                              getattr(ex, "WorkerCrashedError", None), getattr(ex, "OwnerDiedError", None)) if k)
    return isinstance(e, kinds)

