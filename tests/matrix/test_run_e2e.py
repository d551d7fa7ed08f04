"""End to end on CPU: matrices through the process runtime over two simulated slots, the TEST DOUBLE
server as the engine (fast); continue on error; resume; SIGKILL of the harness mid-matrix."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from kv_transition.db import connect, rows
from kv_transition.matrix import expand, load_matrix
from kv_transition.matrix.inventory import inventory
from kv_transition.matrix.run import MatrixRunner

REPO = Path(__file__).resolve().parents[2]

MATRIX = {"name": "e2e", "interleave": False,  # one cell after the other (interleaving: test_interleaved_...)
          "engines": {"fakekv": {"compression_ratios": [0.5], "methods": ["full", "snapkv", "knorm"],
                                 "env": {"FAKE_TOKEN_DELAY": "0.02"}},
                      "fakesrv": {"methods": ["full", "fp8"], "env": {"FAKE_TOKEN_DELAY": "0.02"}}}}


def _run(cpath: Path, mpath: Path, slots: int = 2) -> Any:
    from kv_transition.config import load_config

    cfg = load_config(cpath, env=dict(os.environ))
    exp = expand(cfg, load_matrix(mpath))
    runner = MatrixRunner(cfg, exp, inventory(slots=slots), cwd=cpath.parent)
    return runner.run()


def _overlap(a: dict, b: dict) -> bool:
    return a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


def test_two_slots_shared_engine_baseline_first_and_resume(experiment) -> None:
    cpath, mpath, cfg, paths = experiment(6, MATRIX)
    s = _run(cpath, mpath)
    assert s.ok and s.counts() == {"completed": 5}, [(o.cell.label, o.reason) for o in s.outcomes]
    conn = connect(paths.db)
    mc = {r["cell_id"]: r for r in rows(conn, "SELECT * FROM matrix_cells")}
    kv = [r for r in mc.values() if r["engine"] == "fakekv"]
    srv = [r for r in mc.values() if r["engine"] == "fakesrv"]
    # one engine load served the three request-mode cells, on one slot; the server-mode cells used the other
    loads = rows(conn, "SELECT * FROM matrix_engines")
    assert len(loads) == 1 and s.engine_loads == {kv[0]["engine_group"]: 1}
    assert {r["gpus_json"] for r in kv} == {loads[0]["gpus_json"]} and len({r["gpus_json"] for r in srv}) == 1
    assert {r["gpus_json"] for r in kv} != {r["gpus_json"] for r in srv}
    # the two slots ran in parallel
    assert any(_overlap(a, b) for a in kv for b in srv)
    # baseline first within the shared group
    full = next(r for r in kv if r["method"] == "full")
    assert all(full["finished_at"] <= r["started_at"] for r in kv if r is not full)
    # per-cell engine_instances rows of the shared engine: same process, each cell's own run
    inst = rows(conn, "SELECT e.*, c.method FROM engine_instances e JOIN cells c USING(cell_id) WHERE c.engine='fakekv'")
    assert len(inst) == 3 and len({i["ident"] for i in inst}) == 1 and {i["ident"] for i in inst} == {loads[0]["ident"]}
    assert rows(conn, "SELECT COUNT(*) n FROM telemetry_host")[0]["n"] > 0
    # provenance per cell run
    runs = rows(conn, "SELECT * FROM runs")
    assert len(runs) == 5 and all(r["harness_version"] and r["config_hash"].startswith("sha256:") for r in runs)
    assert all(r["git_sha"] for r in runs)
    assert rows(conn, "SELECT COUNT(*) n FROM responses")[0]["n"] == 30
    attempts = rows(conn, "SELECT COUNT(*) n FROM attempts")[0]["n"]

    # resume: everything complete → no engine starts, nothing sent
    s2 = _run(cpath, mpath)
    assert s2.ok and s2.engine_loads == {kv[0]["engine_group"]: 0}
    assert rows(conn, "SELECT COUNT(*) n FROM attempts")[0]["n"] == attempts
    assert rows(conn, "SELECT COUNT(*) n FROM engine_instances")[0]["n"] == 5
    assert rows(conn, "SELECT status FROM matrix_runs ORDER BY matrix_run_id") == [{"status": "completed"}] * 2
    conn.close()


def test_continue_on_error_and_restart_of_a_dead_shared_engine(experiment) -> None:
    mx = {"name": "err", "interleave": False,  # sequential: the crash hits one cell, the restart serves the next
          "engines": {"fakekv": {"compression_ratios": [0.5], "methods": ["full", "snapkv", "knorm"],
                                 "concurrency": 1, "env": {"FAKE_CRASH_AFTER": "8"}},
                      "fakesrv": {"methods": ["full", "fp8"]}},
          "overrides": [{"match": {"engine": "fakesrv", "method": "fp8"}, "env": {"FAKE_EXIT_DURING_STARTUP": "3"}}]}
    cpath, mpath, cfg, paths = experiment(6, mx)
    s = _run(cpath, mpath)
    st = {o.cell.label: o.status for o in s.outcomes}
    assert st == {"fakekv/full": "completed", "fakekv/snapkv r=0.5": "incomplete", "fakekv/knorm r=0.5": "completed",
                  "fakesrv/full": "completed", "fakesrv/fp8": "failed"}, [(o.cell.label, o.reason) for o in s.outcomes]
    assert not s.ok and s.status == "failed"
    assert "engine start failed" in next(o.reason for o in s.outcomes if o.cell.method == "fp8")
    # the shared engine died after 8 requests (mid snapkv) and was restarted once for knorm
    conn = connect(paths.db)
    loads = rows(conn, "SELECT * FROM matrix_engines ORDER BY load_id")
    assert len(loads) == 2 and loads[0]["exit_code"] == 17 and "engine stopped" in loads[0]["error"]
    assert s.engine_loads[loads[0]["engine_group"]] == 2
    conn.close()

    # the CLI exits 1 on a failed matrix; a re-run sends only the missing requests
    from kv_transition.cli import main

    rc = main(["matrix", "run", "-c", str(cpath), "-m", str(mpath), "--slots", "2", "--no-live"])
    assert rc == 1
    conn = connect(paths.db)
    snap = rows(conn, "SELECT status, n_ok FROM cells WHERE engine='fakekv' AND method='snapkv'")[0]
    assert snap == {"status": "completed", "n_ok": 6}
    dup = rows(conn, "SELECT COUNT(*) n FROM (SELECT request_id FROM responses GROUP BY request_id HAVING COUNT(*)>1)")
    assert dup[0]["n"] == 0
    conn.close()


def _report_content(paths: Any) -> dict[str, Any]:
    """What a report says about accuracy: transitions.csv whole, bins.csv up to the measured columns."""
    keep = ("cell", "engine", "method", "compression_ratio", "budget", "kv_scope", "bin", "bin_label", "n", "mean",
            "ci_lo", "ci_hi", "mean_tokens", "n_paired", "baseline_mean", "rel", "rel_ci_lo", "rel_ci_hi")
    with open(paths.report_dir / "bins.csv") as f:
        bins = [{k: r[k] for k in keep} for r in csv.DictReader(f)]
    return {"bins": bins, "transitions": (paths.report_dir / "transitions.csv").read_text()}


def _report(cpath: Path) -> None:
    from kv_transition.cli import main

    for stage in ("score", "analyze", "report"):
        extra = ["-q"] if stage == "score" else []
        assert main([stage, "-c", str(cpath), *extra]) == 0, stage


def _kvt(cpath: Path, mpath: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kv_transition", "matrix", "run", "-c", str(cpath), "-m", str(mpath),
                             "--slots", "2", "--no-live"], env=env, cwd=cpath.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_matrix_then_rerun_gives_every_request_once_and_the_same_report(
        experiment, tmp_path: Path) -> None:
    mx = {"name": "kill",
          "engines": {"fakekv": {"compression_ratios": [0.5], "methods": ["full", "snapkv", "knorm"],
                                 "env": {"FAKE_TOKEN_DELAY": "0.06"}},
                      "fakesrv": {"methods": ["full", "fp8"], "env": {"FAKE_TOKEN_DELAY": "0.06"}}}}
    n = 8
    cpath, mpath, cfg, paths = experiment(n, mx, analysis={"bootstrap": 50})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = _kvt(cpath, mpath, env)
    deadline = time.monotonic() + 30
    done = 0
    while time.monotonic() < deadline and p.poll() is None:
        if paths.db.is_file():
            try:
                conn = connect(paths.db, readonly=True)
                done = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
                conn.close()
            except Exception:
                done = 0
        if done >= 6:
            break
        time.sleep(0.03)
    assert p.poll() is None, f"the matrix finished before the kill ({done} responses):\n{p.stdout.read()}"
    engines = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    p.stdout.close()
    conn = connect(paths.db, readonly=True)
    n_before = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    conn.close()
    assert 6 <= n_before < 5 * n

    # the same command again: stale engines of the killed harness are removed, the rest is sent once
    p2 = _kvt(cpath, mpath, env)
    out, _ = p2.communicate(timeout=60)
    assert p2.returncode == 0, out
    assert "stale engine" in out or not engines
    conn = connect(paths.db, readonly=True)
    assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 5 * n
    assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 5 * n
    assert conn.execute("SELECT COUNT(DISTINCT cell_id || '/' || example_id || '/' || repeat) FROM requests").fetchone()[0] == 5 * n
    assert conn.execute("SELECT COUNT(*) FROM cells WHERE status='completed'").fetchone()[0] == 5
    # the SIGKILLed matrix run is closed as killed by the next one (never `running` forever), and so are its runs
    assert [r[0] for r in conn.execute("SELECT status FROM matrix_runs ORDER BY matrix_run_id")] == ["killed", "completed"]
    assert conn.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM engine_instances WHERE stopped_at IS NULL").fetchone()[0] == 0
    conn.close()
    for pid in engines:  # nothing left running
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    # the report equals an uninterrupted run's
    ref_root = tmp_path / "ref"
    ref_root.mkdir()
    rc, rm, _, rpaths = experiment(n, mx, root=ref_root, analysis={"bootstrap": 50})
    p3 = _kvt(rc, rm, env)
    out3, _ = p3.communicate(timeout=60)
    assert p3.returncode == 0, out3
    _report(cpath)
    _report(rc)
    got, want = _report_content(paths), _report_content(rpaths)
    assert got["bins"] and any(b["mean"] not in ("", "0", "0.0") for b in got["bins"]) and got["transitions"]
    assert got == want


def test_interleaved_group_sends_example_major_and_survives_an_engine_crash(experiment) -> None:
    """A request-mode group's cells run at the same time; with window 1 every example's requests (one per
    cell) go out before any request of the next example. The shared engine crashes mid-group: every cell
    resumes on the restarted engine, each request answered once."""
    mx = {"name": "inter", "interleave_window": 1,
          "engines": {"fakekv": {"compression_ratios": [0.25, 0.5], "methods": ["full", "snapkv", "knorm"],
                                 "env": {"FAKE_TOKEN_DELAY": "0.005", "FAKE_CRASH_AFTER": "18"}}}}
    n = 6
    cpath, mpath, cfg, paths = experiment(n, mx)
    s = _run(cpath, mpath, slots=1)
    assert s.ok and s.counts() == {"completed": 5}, [(o.cell.label, o.reason) for o in s.outcomes]
    conn = connect(paths.db)
    assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 5 * n
    dup = conn.execute("SELECT COUNT(*) FROM (SELECT request_id FROM responses GROUP BY request_id HAVING COUNT(*)>1)")
    assert dup.fetchone()[0] == 0
    assert len(rows(conn, "SELECT * FROM matrix_engines")) == 2  # the crash, and one restart
    order = {r["example_id"]: r["ordinal"] for r in rows(conn, "SELECT example_id, ordinal FROM manifest_entries")}
    sent = rows(conn, "SELECT q.cell_id, q.example_id, a.started_at FROM attempts a JOIN requests q"
                      " USING(request_id) ORDER BY a.started_at, a.attempt_no")
    firsts: dict = {}
    for r in sent:
        firsts.setdefault((r["cell_id"], r["example_id"]), r["started_at"])
    by_time = sorted(firsts.items(), key=lambda kv: kv[1])
    positions = [order[k[1]] for k, _ in by_time]
    assert positions == sorted(positions), positions  # example-major: never an example before an earlier one
    mc = rows(conn, "SELECT * FROM matrix_cells")
    assert all(_overlap(a, b) for a in mc for b in mc if a is not b)  # the cells ran at the same time
    ev = rows(conn, "SELECT COUNT(DISTINCT cell_id) n FROM events WHERE kind='interleaved'")
    assert ev[0]["n"] == 5
    # one sampler per engine instance for the interleaved cells: each reading recorded under every run at once
    shared = rows(conn, "SELECT t, COUNT(DISTINCT run_id) n FROM telemetry_host GROUP BY t")
    assert shared and max(r["n"] for r in shared) == 5, shared[:5]
    conn.close()
