"""`kvt cleanup`: remove leftover engines — containers labelled owner=kv-transition, and engine process
groups in the process runtime's pidfile registry — optionally only one experiment group."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class CleanupReport:
    containers: list[dict[str, Any]] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per runtime that could not be checked
    runs: list[dict[str, Any]] = field(default_factory=list)  # stale `running` run records closed as killed

    def lines(self) -> list[str]:
        out = []
        for c in self.containers:
            out.append(f"container {c['name']} ({c['id']}, {c['status']}, group={c['group']}, cell={c['cell']}): "
                       f"{c['action']}")
        for p in self.processes:
            out.append(f"process group {p['pid']} (group={p['group']}, cell={p['cell']}, "
                       f"{' '.join(p['argv'][:3])}…): {p['action']}")
        for r in self.runs:
            out.append(f"run {r['run_id']} of cell {r['cell_id']} in {r['db']}: {r['reason']}: "
                       f"{'would close as killed' if r.get('dry_run') else 'closed as killed'}")
        return out


def cleanup(group: Optional[str] = None, runtime: str = "all", registry_dir: Optional[Path | str] = None,
            dry_run: bool = False, client: Any = None, force: bool = False) -> CleanupReport:
    """runtime: all | docker | process. With `all`, an unreachable Docker daemon is noted in
    `skipped` and the processes are still cleaned; with `docker` it raises DockerUnavailableError.
    Engines whose harness is still running are left alone unless `force`."""
    rep = CleanupReport()
    if runtime in ("all", "docker"):
        from kv_transition.runtime.docker import DockerUnavailableError, cleanup_containers

        try:
            rep.containers = cleanup_containers(group=group, client=client, dry_run=dry_run, force=force)
        except DockerUnavailableError as e:
            if runtime == "docker":
                raise
            rep.skipped.append(str(e))
    if runtime in ("all", "process"):
        from kv_transition.runtime.process import cleanup_processes

        rep.processes = cleanup_processes(group=group, registry_dir=registry_dir, dry_run=dry_run, force=force)
    return rep


def group_dbs(runs_root: Path, group: Optional[str] = None) -> list[Path]:
    """The experiment groups' databases under runs_root (one group's, or every group's)."""
    if group:
        p = runs_root / group / "kv_transition.sqlite"
        return [p] if p.is_file() else []
    return sorted(runs_root.glob("*/kv_transition.sqlite")) if runs_root.is_dir() else []


def close_stale_records(dbs: list[Path], dry_run: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Close the `running` run records of dead harnesses in each DB as `killed`. → (closed, notes)."""
    from kv_transition.db import connect
    from kv_transition.db.stale import close_stale_runs

    closed: list[dict[str, Any]] = []
    notes: list[str] = []
    for db in dbs:
        try:
            conn = connect(db, busy_timeout_s=10)
        except Exception as e:  # noqa: BLE001 - a damaged/locked DB is a note here, not a failure
            notes.append(f"run records in {db} not checked: {e}")
            continue
        try:
            for r in close_stale_runs(conn, dry_run=dry_run):
                closed.append({**r, "db": str(db), "dry_run": dry_run})
        except Exception as e:  # noqa: BLE001
            notes.append(f"run records in {db} not checked: {e}")
        finally:
            conn.close()
    return closed, notes
