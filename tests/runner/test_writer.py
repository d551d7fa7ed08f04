"""DbWriter: producers never block on SQLite; batches are one transaction; flush is a barrier."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kv_transition.db import connect, rows
from kv_transition.runner import DbWriter, WriterError


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
    assert time.perf_counter() - t < 0.5
    time.sleep(0.2)
    other.execute("COMMIT")
    w.flush()
    assert rows(other, "SELECT COUNT(*) n FROM events")[0]["n"] == 2000
    assert rows(other, "SELECT level FROM events WHERE message='m0'")[0]["level"] == "x"  # order kept
    w.close()


def test_a_bad_row_does_not_lose_the_batch(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    w = DbWriter(db)
    w.insert("events", _ev(1))
    w.insert("events", {"run_id": None, "cell_id": "c", "t": 2.0, "level": None, "kind": "k", "message": "bad",
                        "data_json": None})  # level NOT NULL
    w.insert("events", _ev(3))
    w.start()
    with pytest.raises(WriterError, match="NOT NULL"):
        w.flush()
    with pytest.raises(WriterError):
        w.close()
    assert [r["message"] for r in rows(connect(db), "SELECT message FROM events ORDER BY t")] == ["m1", "m3"]


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
