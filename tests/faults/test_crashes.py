"""Crashes and signals, replayed through the real `kvt` CLI (a child process) on the TEST DOUBLE engine
(a real local process): kill -9 of kvt, kill -9 of the engine, SIGINT, another process holding the
DB's write lock. Each asserts the exit code, the message, the DB state, and that nothing lies."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
import time

from .conftest import one_error_line, pid_alive, q, wait_for


def _answers(db, run_id=None) -> int:
    sql = "SELECT COUNT(*) n FROM responses" + (" WHERE run_id=?" if run_id else "")
    return q(db, sql, (run_id,) if run_id else ())[0]["n"]


def _kill9_mid_cell(p):
    """Start `kvt run`, SIGKILL it after 2 stored answers; → (run row, engine pids left behind)."""
    child = p.spawn(*p.run_args())
    wait_for(lambda: _answers(p.db) >= 2, 60, "2 stored answers")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert child.returncode == -signal.SIGKILL
    run = q(p.db, "SELECT * FROM runs ORDER BY run_id DESC LIMIT 1")[0]
    assert run["status"] == "running" and run["pid"] == child.pid  # what the dead harness left
    return run, child


def test_kill9_of_kvt_then_cleanup_closes_the_run_as_killed_and_resume_completes(project) -> None:
    p = project(n=6, token_delay=0.08)
    run, child = _kill9_mid_cell(p)
    orphans = [pid for pid in p.engine_pids() if pid_alive(pid)]
    assert orphans, "the engine of a SIGKILLed harness is orphaned (cleanup's job)"

    out = p.kvt("cleanup", "--group", p.group, "--runtime", "process")
    assert out.returncode == 0, out.stderr
    assert "closed as killed" in out.stdout and f"run {run['run_id']}" in out.stdout
    wait_for(lambda: not any(pid_alive(x) for x in orphans), 15, "the orphaned engine to be removed")
    closed = q(p.db, "SELECT * FROM runs WHERE run_id=?", (run["run_id"],))[0]
    assert closed["status"] == "killed" and closed["finished_at"]
    for fact in (str(child.pid), socket.gethostname(), run["started_at"]):  # pid + host + start time recorded
        assert fact in closed["reason"]
    stored = _answers(p.db, run["run_id"])
    assert stored >= 2 and closed["n_ok"] == stored  # counters count what was stored
    assert closed["n_sent"] >= closed["n_ok"]
    inst = q(p.db, "SELECT stopped_at FROM engine_instances WHERE run_id=?", (run["run_id"],))
    assert inst and all(i["stopped_at"] for i in inst)
    assert q(p.db, "SELECT status FROM cells")[0]["status"] == "incomplete"
    assert q(p.db, "SELECT COUNT(*) n FROM events WHERE kind='run_killed'")[0]["n"] == 1
    # idempotent: a second cleanup closes nothing more
    again = p.kvt("cleanup", "--group", p.group, "--runtime", "process")
    assert "closed as killed" not in again.stdout

    res = p.kvt(*p.run_args())  # resume: only the missing requests are sent
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed" and summary["requests"].startswith("6 ok")
    assert _answers(p.db) == 6  # never lost, never double-counted
    assert q(p.db, "SELECT COUNT(*) n FROM runs WHERE status='running'")[0]["n"] == 0
    last = q(p.db, "SELECT * FROM runs ORDER BY run_id DESC LIMIT 1")[0]
    assert last["status"] == "completed" and last["n_ok"] == 6 - stored


def test_kill9_of_kvt_then_the_next_run_closes_the_stale_run(project) -> None:
    p = project(n=4, token_delay=0.08)
    run, _ = _kill9_mid_cell(p)
    for pid in p.engine_pids():  # the orphan keeps its port; the next run needs it (cleanup's job, not this test's)
        os.killpg(pid, signal.SIGKILL)
    res = p.kvt(*p.run_args())
    assert res.returncode == 0, res.stderr
    rows = q(p.db, "SELECT run_id, status, reason FROM runs ORDER BY run_id")
    assert rows[0]["run_id"] == run["run_id"] and rows[0]["status"] == "killed"
    assert rows[-1]["status"] == "completed"
    assert not q(p.db, "SELECT * FROM engine_instances WHERE stopped_at IS NULL")


def test_sigint_counts_what_was_stored_and_stops_the_engine(project) -> None:
    p = project(n=8, token_delay=0.08)
    child = p.spawn(*p.run_args())
    wait_for(lambda: _answers(p.db) >= 2, 60, "2 stored answers")
    engines = p.engine_pids()
    os.kill(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    run = q(p.db, "SELECT * FROM runs ORDER BY run_id DESC LIMIT 1")[0]
    stored = _answers(p.db, run["run_id"])
    assert run["status"] == "interrupted" and stored >= 2
    assert run["n_ok"] == stored and run["n_sent"] >= stored  # not 0/0
    assert q(p.db, "SELECT status FROM cells")[0]["status"] == "incomplete"
    assert not q(p.db, "SELECT * FROM engine_instances WHERE stopped_at IS NULL")
    assert engines and not any(pid_alive(x) for x in engines)


def test_kill9_of_the_engine_reports_its_last_log_lines(project) -> None:
    p = project(n=8, token_delay=0.08)
    child = p.spawn(*p.run_args())
    wait_for(lambda: _answers(p.db) >= 1, 60, "a stored answer")
    t0 = time.monotonic()
    (engine,) = p.engine_pids()
    os.killpg(engine, signal.SIGKILL)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 1, err
    assert time.monotonic() - t0 < 15
    cell = q(p.db, "SELECT status, reason FROM cells")[0]
    assert cell["status"] == "incomplete"
    assert "engine stopped mid-cell" in cell["reason"] and "exit code -9" in cell["reason"]
    assert "last 30 engine log lines" in cell["reason"]
    assert "fake-openai-server" in cell["reason"] and "listening on" in cell["reason"]  # the engine's own words
    assert json.loads(out)["reason"] == cell["reason"]
    run = q(p.db, "SELECT * FROM runs ORDER BY run_id DESC LIMIT 1")[0]
    assert run["status"] == "incomplete" and run["n_ok"] == _answers(p.db, run["run_id"])


def _hold_write_lock(db, seconds: float) -> threading.Thread:
    ready = threading.Event()

    def hold() -> None:
        c = sqlite3.connect(db, timeout=30, isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        ready.set()
        time.sleep(seconds)
        c.execute("COMMIT")
        c.close()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    ready.wait(30)
    return t


def test_a_held_write_lock_mid_cell_loses_nothing_and_fails_nothing(project) -> None:
    p = project(n=6, token_delay=0.05)
    child = p.spawn(*p.run_args())  # the DB busy timeout is 2 s here: the 5 s lock outlasts it
    wait_for(lambda: _answers(p.db) >= 1, 60, "a stored answer")
    holder = _hold_write_lock(p.db, 5.0)
    out, err = child.communicate(timeout=120)
    holder.join()
    assert child.returncode == 0, err
    s = json.loads(out)
    assert s["status"] == "completed" and s["requests"].startswith("6 ok")
    assert _answers(p.db) == 6
    assert q(p.db, "SELECT COUNT(*) n FROM telemetry_host")[0]["n"] > 0


def test_score_under_a_held_lock_is_one_line_exit_2(project) -> None:
    p = project(n=2)
    assert p.kvt(*p.run_args()).returncode == 0
    holder = _hold_write_lock(p.db, 6.0)
    res = p.kvt("score", "-c", str(p.config), "-q")
    holder.join()
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert line == f"kvt: error: {p.db}: database is locked by another process (try again when it has finished)"
    assert q(p.db, "SELECT COUNT(*) n FROM scores")[0]["n"] == 0
