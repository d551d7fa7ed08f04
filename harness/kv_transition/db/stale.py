"""Close the records of runs whose harness died without closing them (kill -9, OOM, power loss).

A `runs` (or `matrix_runs`) row in status `running` whose process is gone — same host, and no live
process with that pid started before the row — is closed as `killed`: its reason records the pid,
host and start time, its counters count what was stored, its engine instances get `stopped_at`, and
its cell (when no other live run holds it) becomes `incomplete`. Rows of another host are left
alone (we cannot see its processes). Called by `kvt run` / the matrix runner (the next run of the
group, a resume) and by `kvt cleanup`.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from datetime import datetime
from typing import Any, Optional

from kv_transition.db.core import transaction, utcnow


def _epoch(iso: str) -> Optional[float]:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None


def process_alive(pid: int, started_at: str) -> bool:
    """Is the process that wrote a row at `started_at` still running on this host? A pid reused by a
    process created after the row was written is not it."""
    if pid == os.getpid():
        return True
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        created = p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return psutil.pid_exists(pid) if pid > 0 else False
    t0 = _epoch(started_at)
    return t0 is None or created <= t0 + 1.0


def stored_counts(conn: sqlite3.Connection, run_id: int) -> dict[str, int]:
    """What one run really stored: requests it sent (any attempt), answers kept (a two-request example
    counts once, in the run that stored its last response), requests it failed."""
    n_sent = conn.execute("SELECT COUNT(DISTINCT request_id) FROM attempts WHERE run_id=?", (run_id,)).fetchone()[0]
    if _has(conn, "followups"):  # a two-request example is answered by its follow-up's response
        n_ok = conn.execute(
            "SELECT (SELECT COUNT(*) FROM responses p JOIN requests q USING (request_id) WHERE p.run_id=?"
            " AND q.status='ok' AND p.request_id NOT IN (SELECT request_id FROM followups))"
            " + (SELECT COUNT(*) FROM followups WHERE run_id=?)", (run_id, run_id)).fetchone()[0]
    else:
        n_ok = conn.execute("SELECT COUNT(*) FROM responses WHERE run_id=?", (run_id,)).fetchone()[0]
    n_failed = conn.execute(
        "SELECT COUNT(*) FROM requests q WHERE q.status='failed' AND q.request_id IN"
        " (SELECT request_id FROM attempts WHERE run_id=?)", (run_id,)).fetchone()[0]
    return {"n_sent": int(n_sent or 0), "n_ok": int(n_ok or 0), "n_failed": int(n_failed or 0)}


def find_stale(conn: sqlite3.Connection, host: Optional[str] = None) -> list[dict[str, Any]]:
    host = host or socket.gethostname()
    out = []
    for r in conn.execute("SELECT run_id, cell_id, host, pid, started_at FROM runs WHERE status='running'"):
        if r["host"] == host and not process_alive(int(r["pid"]), r["started_at"]):
            out.append(dict(r))
    return out


def close_stale_runs(conn: sqlite3.Connection, *, host: Optional[str] = None, dry_run: bool = False
                     ) -> list[dict[str, Any]]:
    """Close every stale `running` run (and matrix run) of this host as `killed`. → the closed runs
    ({run_id, cell_id, pid, host, started_at, reason}). Idempotent."""
    host = host or socket.gethostname()
    stale = find_stale(conn, host)
    stale_matrix = [dict(r) for r in conn.execute(
        "SELECT matrix_run_id, host, pid, started_at FROM matrix_runs WHERE status='running'")
        if r["host"] == host and not process_alive(int(r["pid"]), r["started_at"])] if _has(conn, "matrix_runs") else []
    for r in stale:
        r["reason"] = (f"killed: harness process {r['pid']} on {r['host']} (run started {r['started_at']}) ended "
                       "without closing this run")
    if dry_run or not (stale or stale_matrix):
        return stale
    now = utcnow()
    with transaction(conn):
        for r in stale:
            c = stored_counts(conn, r["run_id"])
            conn.execute("UPDATE runs SET status='killed', reason=?, n_sent=?, n_ok=?, n_failed=?, finished_at=?"
                         " WHERE run_id=? AND status='running'",
                         (r["reason"], c["n_sent"], c["n_ok"], c["n_failed"], now, r["run_id"]))
            conn.execute("UPDATE engine_instances SET stopped_at=?, error=COALESCE(error, ?)"
                         " WHERE run_id=? AND stopped_at IS NULL",
                         (now, "harness killed: engine stop time unknown, recorded when the run was closed",
                          r["run_id"]))
            conn.execute("INSERT INTO events(run_id, cell_id, t, level, kind, message, data_json)"
                         " VALUES (?,?,?,?,?,?,?)",
                         (r["run_id"], r["cell_id"], time.time(), "warning", "run_killed", r["reason"],
                          json.dumps({"pid": r["pid"], "host": r["host"], "started_at": r["started_at"], **c})))
            live = conn.execute("SELECT COUNT(*) FROM runs WHERE cell_id=? AND status='running'",
                                (r["cell_id"],)).fetchone()[0]
            if not live:
                n_ok = conn.execute("SELECT COUNT(*) FROM requests WHERE cell_id=? AND status='ok'",
                                    (r["cell_id"],)).fetchone()[0]
                n_failed = conn.execute("SELECT COUNT(*) FROM requests WHERE cell_id=? AND status='failed'",
                                        (r["cell_id"],)).fetchone()[0]
                conn.execute("UPDATE cells SET status='incomplete', reason=?, n_ok=?, n_failed=?, finished_at=?,"
                             " updated_at=? WHERE cell_id=? AND status='running'",
                             (f"run {r['run_id']} {r['reason']}", n_ok, n_failed, now, now, r["cell_id"]))
        for m in stale_matrix:
            conn.execute("UPDATE matrix_runs SET status='killed', finished_at=? WHERE matrix_run_id=? AND status='running'",
                         (now, m["matrix_run_id"]))
    return stale


def _has(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None
