"""close_stale_runs decides "dead" carefully: a gone pid, or a pid reused by a younger process, on THIS
host is dead; a live older process, this very process, and any row of another host are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

from kv_transition.db import connect
from kv_transition.db.stale import close_stale_runs
from tests.runner.conftest import seed_requests


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


def test_only_runs_of_dead_harnesses_on_this_host_are_closed(tmp_path) -> None:
    import socket

    db = tmp_path / "k.sqlite"
    seed_requests(db, 0)
    conn = connect(db)
    here = socket.gethostname()
    now = datetime.now(timezone.utc)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    time.sleep(1.2)
    young = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # created after the row below
    try:
        rows = {  # name: (host, pid, started_at)
            "dead": (here, gone.pid, _iso(now)),
            "reused": (here, young.pid, _iso(now - timedelta(seconds=5))),
            "live_older": (here, os.getppid(), _iso(now)),
            "myself": (here, os.getpid(), _iso(now)),
            "other_host": ("some-other-host", gone.pid, _iso(now)),
        }
        ids = {}
        for name, (host, pid, started) in rows.items():
            ids[name] = conn.execute(
                "INSERT INTO runs(cell_id, runtime, config_hash, host, pid, harness_version, status, started_at)"
                " VALUES ('c1','process','h',?,?,'0','running',?)", (host, pid, started)).lastrowid
        conn.execute("INSERT INTO engine_instances(run_id, cell_id, runtime, command_json, args_json, env_json,"
                     " gpus_json, gpu_uuids_json, pids_json) VALUES (?,?,?,?,?,?,?,?,?)",
                     (ids["dead"], "c1", "process", "[]", "[]", "{}", "[]", "[]", "[]"))
        closed = close_stale_runs(conn)
        assert sorted(r["run_id"] for r in closed) == sorted([ids["dead"], ids["reused"]])
        status = {n: conn.execute("SELECT status FROM runs WHERE run_id=?", (i,)).fetchone()[0] for n, i in ids.items()}
        assert status == {"dead": "killed", "reused": "killed", "live_older": "running", "myself": "running",
                          "other_host": "running"}
        reason = conn.execute("SELECT reason FROM runs WHERE run_id=?", (ids["dead"],)).fetchone()[0]
        assert str(gone.pid) in reason and here in reason and rows["dead"][2] in reason
        assert conn.execute("SELECT stopped_at FROM engine_instances").fetchone()[0] is not None
        assert close_stale_runs(conn) == []  # idempotent
    finally:
        young.kill()
        young.wait()
        conn.close()
