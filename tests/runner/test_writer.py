"""DbWriter: producers never block on SQLite; batches are one transaction; flush is a barrier."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kv_transition.db import connect, rows
from kv_transition.runner import DbWriter, WriterError
from tests.runner.conftest import seed_requests


def _ev(i: int) -> dict:
    return {"run_id": None, "cell_id": "c", "t": float(i), "level": "info", "kind": "k", "message": f"m{i}",
            "data_json": None}


def test_rows_queued_before_start_commit_in_few_batches(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    w = DbWriter(db, max_batch=1000)
    for i in range(2500):
        w.insert("events", _ev(i))
    w.start()
    w.flush()
    assert w.n_statements == 2500 and w.n_batches == 3  # 1000 + 1000 + 500
    w.close()
    assert rows(connect(db), "SELECT COUNT(*) n FROM events")[0]["n"] == 2500


def test_insert_never_blocks_while_the_db_is_locked(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    other = connect(db)
    w = DbWriter(db).start()
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    t = time.perf_counter()
    for i in range(2000):
        w.insert("events", _ev(i))
    w.execute("UPDATE events SET level='x' WHERE message='m0'")
    # every call returned while the lock is still held and nothing could be written: they only queued
    # (a call that waited for the lock would wait here up to the writer's lock_wait_s, 300 s). The bound is far
    # below that and far above what a loaded 2-core CI box needs (0.54 s seen for a 0.5 s bound)
    assert time.perf_counter() - t < 10
    assert rows(other, "SELECT COUNT(*) n FROM events")[0]["n"] == 0
    time.sleep(0.2)
    other.execute("COMMIT")
    w.flush()
    assert rows(other, "SELECT COUNT(*) n FROM events")[0]["n"] == 2000
    assert rows(other, "SELECT level FROM events WHERE message='m0'")[0]["level"] == "x"  # order kept
    w.close()


def _exp(i: int, created: object = "t") -> dict:
    return {"group_id": f"g{i}", "name": "", "created_at": created, "updated_at": "t", "config_json": "{}",
            "config_hash": "h"}


def test_a_bad_row_does_not_lose_the_batch(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    w = DbWriter(db)
    w.insert("experiments", _exp(1))
    w.insert("experiments", _exp(2, created=None))  # created_at NOT NULL
    w.insert("experiments", _exp(3))
    w.start()
    with pytest.raises(WriterError, match="NOT NULL"):
        w.flush()
    with pytest.raises(WriterError):
        w.close()
    assert [r["group_id"] for r in rows(connect(db), "SELECT group_id FROM experiments ORDER BY 1")] == ["g1", "g3"]


def test_a_bad_telemetry_or_event_row_is_dropped_with_one_event_never_raised(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    w = DbWriter(db, context=(None, "c"))
    w.insert("events", _ev(1))
    for t in (2.0, 2.5):
        w.insert("events", {"run_id": None, "cell_id": "c", "t": t, "level": None, "kind": "k", "message": "bad",
                            "data_json": None})  # level NOT NULL
    w.insert("events", _ev(3))
    w.start()
    w.flush()
    w.close()  # no WriterError: losing an event row must not fail anything
    assert w.n_dropped == 2 and not w.errors
    got = rows(connect(db), "SELECT kind, message FROM events ORDER BY event_id")
    assert [r["message"] for r in got if r["kind"] == "k"] == ["m1", "m3"]
    dropped = [r for r in got if r["kind"] == "writer_dropped"]
    assert len(dropped) == 1 and dropped[0]["message"].startswith("2 telemetry/event row(s) dropped")


def test_coalesced_multi_row_statements_last_update_wins_barriers_kept(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    w = DbWriter(db)
    for i in range(1200):  # more rows than one multi-row statement takes (500)
        w.insert("events", _ev(i))
    for i in range(1200):
        w.update("events", "event_id", {"event_id": i + 1, "level": "first"})
    w.update("events", "event_id", {"event_id": 7, "level": "second"})  # same key again: this one wins
    w.execute("UPDATE events SET kind='barrier' WHERE level='second'")   # sees every update before it
    w.update("events", "event_id", {"event_id": 7, "level": "third"})   # after the barrier: applied after it
    w.start()
    w.flush()
    assert w.n_statements == 2403 and w.n_sql == 3 + 3 + 1 + 1 and w.n_batches == 1
    conn = connect(db)
    assert rows(conn, "SELECT level, kind FROM events WHERE event_id=7") == [{"level": "third", "kind": "barrier"}]
    assert rows(conn, "SELECT COUNT(*) n FROM events WHERE level='first'")[0]["n"] == 1199
    w.close()


def _hold_lock(db: Path, seconds: float):
    """Another connection holding the write lock for `seconds` (in a thread)."""
    import threading

    other = connect(db)
    other.execute("BEGIN IMMEDIATE")
    t = threading.Timer(seconds, lambda: (other.execute("COMMIT"), other.close()))
    t.start()
    return t


def test_a_lock_longer_than_the_busy_timeout_is_waited_out_with_backoff(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    run_id, _ = seed_requests(db, 0)
    held = _hold_lock(db, 1.5)
    w = DbWriter(db, busy_timeout_s=0.2, lock_wait_s=20).start()
    w.insert("experiments", _exp(1))
    w.insert("telemetry_host", {"run_id": run_id, "t": 1.0})
    w.flush(timeout=30)
    w.close()
    held.join()
    assert w.n_lock_waits >= 1 and not w.errors and w.n_dropped == 0
    c = connect(db)
    assert rows(c, "SELECT COUNT(*) n FROM experiments")[0]["n"] == 1
    assert rows(c, "SELECT COUNT(*) n FROM telemetry_host")[0]["n"] == 1


def test_a_lock_outlasting_the_wait_drops_telemetry_but_reports_lost_answers(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    run_id, _ = seed_requests(db, 0)
    held = _hold_lock(db, 2.0)
    w = DbWriter(db, busy_timeout_s=0.1, lock_wait_s=0.5, context=(None, "c")).start()
    for i in range(5):
        w.insert("telemetry_host", {"run_id": run_id, "t": float(i)})
    w.flush(timeout=30)  # telemetry only: dropped, no error
    assert w.n_dropped == 5 and not w.errors
    w.insert("experiments", _exp(1))
    with pytest.raises(WriterError, match="locked"):
        w.flush(timeout=30)  # an essential row that could not be written is an error, never silent
    held.join()
    w.insert("events", _ev(9))  # the lock is gone: the next commit also writes the ONE drop event
    with pytest.raises(WriterError):
        w.close()  # the earlier lost row stays reported
    ev = rows(connect(db), "SELECT message FROM events WHERE kind='writer_dropped'")
    assert len(ev) == 1 and ev[0]["message"].startswith("5 telemetry/event row(s) dropped")
    assert rows(connect(db), "SELECT COUNT(*) n FROM telemetry_host")[0]["n"] == 0
