"""The runner against the TEST DOUBLE server: streaming, retries, 4xx, malformed SSE, stalls,
timeouts, concurrency — every attempt recorded through the DB writer."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from kv_transition.db import connect, rows
from kv_transition.runner import DbWriter, Runner, RunnerOptions, WorkItem

from .conftest import PeakInFlight, body, free_port, seed_requests

FAST = dict(backoff_s=0.01, backoff_max_s=0.05)


def run(db: Path, url: str, n: int, *, max_tokens: int = 5, stream: bool = True, **opts) -> tuple:
    run_id, ids = seed_requests(db, n)
    items = [WorkItem(rid, f"ex{i}", 0, body(i, max_tokens, stream)) for i, rid in enumerate(ids)]
    o = RunnerOptions(**{"concurrency": 4, "timeout_s": 10, "max_retries": 3, "stream": stream, **FAST, **opts})
    with DbWriter(db) as w:
        r = Runner(url, w, run_id, o)
        stats = asyncio.run(r.run(items))
    conn = connect(db)
    return stats, conn


def test_streaming_end_to_end_metrics_recorded(tmp_path: Path, fake_server) -> None:
    url, _ = fake_server("--ttft", "0.05", "--token-delay", "0.02")
    stats, conn = run(tmp_path / "k.sqlite", url, 3, max_tokens=5)
    assert (stats.n_ok, stats.n_failed, stats.n_attempts) == (3, 0, 3)
    resp = rows(conn, "SELECT * FROM responses ORDER BY request_id")
    assert len(resp) == 3
    for r in resp:
        assert r["text"] == "The quick brown fox jumps" and r["finish_reason"] == "length"
        assert r["completion_tokens"] == 5 and r["streamed"] == 1
        assert r["ttft_s"] >= 0.045
        itl = json.loads(r["itl_json"])
        assert len(itl) == 4 and all(x >= 0.015 for x in itl)
        assert r["e2e_s"] >= r["ttft_s"] + sum(itl) - 1e-6
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 4)
    assert {r["status"] for r in rows(conn, "SELECT status FROM requests")} == {"ok"}
    assert all(a["ok"] == 1 and a["attempt_no"] == 1 for a in rows(conn, "SELECT * FROM attempts"))


def test_non_streaming(tmp_path: Path, fake_server) -> None:
    url, _ = fake_server()
    stats, conn = run(tmp_path / "k.sqlite", url, 2, stream=False)
    assert stats.n_ok == 2
    r = rows(conn, "SELECT * FROM responses")[0]
    assert r["streamed"] == 0 and r["ttft_s"] is None and r["completion_tokens"] == 5


def test_retries_on_500_every_attempt_recorded(tmp_path: Path, fake_server) -> None:
    url, _ = fake_server("--fail-first", "2", "--fail-status", "500")
    stats, conn = run(tmp_path / "k.sqlite", url, 1)
    assert stats.n_ok == 1 and stats.n_attempts == 3 and stats.n_retries == 2
    att = rows(conn, "SELECT * FROM attempts ORDER BY attempt_no")
    assert [a["attempt_no"] for a in att] == [1, 2, 3]
    assert [a["http_status"] for a in att] == [500, 500, None]
    assert [a["error_kind"] for a in att] == ["http_5xx", "http_5xx", None]
    assert "injected failure" in att[0]["body"] and att[0]["retryable"] == 1
    assert rows(conn, "SELECT status, n_attempts FROM requests") == [{"status": "ok", "n_attempts": 3}]


def test_retries_exhausted_marks_failed(tmp_path: Path, fake_server) -> None:
    url, _ = fake_server("--fail-first", "100", "--fail-status", "503")
    stats, conn = run(tmp_path / "k.sqlite", url, 1, max_retries=2)
    assert stats.n_failed == 1 and stats.n_attempts == 3
    req = rows(conn, "SELECT * FROM requests")[0]
    assert req["status"] == "failed" and req["n_attempts"] == 3 and "503" in req["last_error"]
    assert rows(conn, "SELECT COUNT(*) n FROM responses")[0]["n"] == 0


def test_no_retry_on_4xx_body_recorded(tmp_path: Path, fake_server) -> None:
    url, _ = fake_server("--fail-first", "100", "--fail-status", "400")
    stats, conn = run(tmp_path / "k.sqlite", url, 2)
    assert stats.n_failed == 2 and stats.n_attempts == 2 and stats.n_retries == 0
    for a in rows(conn, "SELECT * FROM attempts"):
        assert a["http_status"] == 400 and a["error_kind"] == "http_4xx" and a["retryable"] == 0
        assert json.loads(a["body"])["error"]["type"] == "fake_injected_error"


def test_connection_refused_retried_then_failed(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    stats, conn = run(tmp_path / "k.sqlite", url, 1, max_retries=2)
    assert stats.n_failed == 1
    att = rows(conn, "SELECT * FROM attempts ORDER BY attempt_no")
    assert len(att) == 3 and {a["error_kind"] for a in att} == {"connect"}


def test_malformed_sse_is_a_failed_attempt_then_retried(tmp_path: Path, fake_server) -> None:
    url, _ = fake_server("--malformed-sse-every", "2")  # requests 2, 4, … are broken
    stats, conn = run(tmp_path / "k.sqlite", url, 2, concurrency=1)
    assert stats.n_ok == 2 and stats.n_attempts == 3
    bad = rows(conn, "SELECT * FROM attempts WHERE ok = 0")
    assert len(bad) == 1 and bad[0]["error_kind"] == "malformed" and '"ind' in bad[0]["body"]
    # the good retry's text is clean (nothing of the broken attempt leaks in)
    assert {r["text"] for r in rows(conn, "SELECT text FROM responses")} == {"The quick brown fox jumps"}


def test_stall_hits_the_stall_timeout_and_retries(tmp_path: Path, fake_server) -> None:
    url, _ = fake_server("--stall-every", "1", "--stall-s", "3")
    t = time.perf_counter()
    stats, conn = run(tmp_path / "k.sqlite", url, 1, stall_timeout_s=0.3, max_retries=1)
    assert time.perf_counter() - t < 2.5
    att = rows(conn, "SELECT * FROM attempts ORDER BY attempt_no")
    assert [a["error_kind"] for a in att] == ["stall", "stall"] and stats.n_failed == 1


def test_total_timeout_bounds_a_slow_trickle(tmp_path: Path, fake_server) -> None:
    # tokens keep coming (no stall) but the whole request exceeds timeout_s
    url, _ = fake_server("--token-delay", "0.1")
    stats, conn = run(tmp_path / "k.sqlite", url, 1, max_tokens=9, timeout_s=0.35, max_retries=0)
    att = rows(conn, "SELECT * FROM attempts")
    assert att[0]["error_kind"] == "timeout" and att[0]["duration_s"] < 1.0 and stats.n_failed == 1


def test_concurrency_limit_honoured(tmp_path: Path, fake_server) -> None:
    url, srv = fake_server("--token-delay", "0.01")
    peak = PeakInFlight(srv)
    peak.start()
    try:
        stats, _ = run(tmp_path / "k.sqlite", url, 24, max_tokens=9, concurrency=3)
    finally:
        peak.stop_ev.set()
        peak.join()
    assert stats.n_ok == 24
    assert peak.peak == 3 and stats.max_in_flight == 3


def test_abort_stops_sending_and_records_aborted_attempts(tmp_path: Path, fake_server) -> None:
    url, srv = fake_server("--token-delay", "0.05")
    db = tmp_path / "k.sqlite"
    run_id, ids = seed_requests(db, 20)
    items = [WorkItem(rid, f"ex{i}", 0, body(i, 9)) for i, rid in enumerate(ids)]
    with DbWriter(db) as w:
        r = Runner(url, w, run_id, RunnerOptions(concurrency=2, timeout_s=10, **FAST))

        async def go():
            task = asyncio.create_task(r.run(items))
            while r.counters.ok < 2:
                await asyncio.sleep(0.01)
            r.abort("engine stopped mid-cell")
            return await task

        stats = asyncio.run(go())
    assert stats.aborted == "engine stopped mid-cell"
    assert 0 < stats.n_ok < 20 and stats.n_not_done == 20 - stats.n_ok - stats.n_failed
    conn = connect(db)
    ab = rows(conn, "SELECT * FROM attempts WHERE error_kind = 'aborted'")
    assert 1 <= len(ab) <= 2
    n_att = rows(conn, "SELECT COUNT(*) n FROM attempts")[0]["n"]
    assert n_att == stats.n_ok + len(ab) == stats.n_attempts
    seen = srv.RequestHandlerClass.state.requests
    time.sleep(0.2)
    assert stats.n_ok <= srv.RequestHandlerClass.state.requests == seen <= n_att  # nothing sent after the abort
