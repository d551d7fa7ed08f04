"""A whole cell: runtime → telemetry + runner → teardown → status; resumability without duplicates."""

from __future__ import annotations

import json

import pytest

from kv_transition.cell import cell_id_for, cell_inputs, request_body, resolve_cell_spec, run_cell
from kv_transition.db import connect, rows

from .conftest import SubprocessFakeRuntime


def test_healthy_cell_end_to_end(cell_env) -> None:
    cfg, paths = cell_env(6, decoding={"repeats": 2})
    rt = SubprocessFakeRuntime(("--token-delay", "0.01"))
    res = run_cell(cfg, paths, runtime_impl=rt)
    assert res.status == "completed" and res.n_requests == 12 == res.n_ok and res.n_todo == 12
    conn = connect(paths.db)
    cell = rows(conn, "SELECT * FROM cells")[0]
    assert cell["status"] == "completed" and cell["cell_id"] == res.cell_id and cell["n_ok"] == 12
    assert json.loads(cell["inputs_json"])["method"] == "full" and cell["config_hash"].startswith("sha256:")
    assert rows(conn, "SELECT COUNT(*) n FROM responses")[0]["n"] == 12
    inst = rows(conn, "SELECT * FROM engine_instances")[0]
    assert inst["ready_at"] and inst["stopped_at"] and json.loads(inst["pids_json"]) == rt.started[0].pids
    host = rows(conn, "SELECT * FROM telemetry_host WHERE run_id=?", (res.run_id,))
    assert host and all(h["proc_count"] >= 1 and h["proc_rss"] > 0 for h in host)
    kv = rows(conn, "SELECT * FROM telemetry_engine_metric WHERE run_id=?", (res.run_id,))
    assert kv and {k["metric"] for k in kv} == {"vllm:kv_cache_usage_perc"}
    assert json.loads(kv[0]["labels_json"]) == {"model_name": "fake-model"}
    run = rows(conn, "SELECT * FROM runs")[0]
    assert run["status"] == "completed" and run["n_sent"] == 12 and run["finished_at"]
    assert rt.started[0].handle.poll() is not None  # torn down

    # a complete cell re-run sends nothing and starts no engine
    rt2 = SubprocessFakeRuntime()
    res2 = run_cell(cfg, paths, runtime_impl=rt2)
    assert res2.status == "completed" and res2.n_todo == 0 and rt2.started == []


def test_crash_mid_cell_then_rerun_completes_exactly_the_missing(cell_env) -> None:
    cfg, paths = cell_env(10, engine={"concurrency": 1})  # 1: the 5th request (the crash) comes after the 4th is done
    rt = SubprocessFakeRuntime(("--crash-after", "4", "--token-delay", "0.01"))
    res = run_cell(cfg, paths, runtime_impl=rt, watchdog_interval_s=0.05)
    assert res.status == "incomplete" and res.n_ok == 4, res.reason
    assert "engine stopped mid-cell (exit code 17)" in res.reason
    conn = connect(paths.db)
    assert rows(conn, "SELECT exit_code FROM engine_instances")[0]["exit_code"] == 17
    # the broken stream's attempt carries the server's side: the engine log's last lines
    broken = rows(conn, "SELECT error_kind, body FROM attempts WHERE ok = 0 AND error_kind = 'connection'")
    assert broken and all("--- engine log (last lines) ---" in b["body"] and "crashing now" in b["body"]
                          for b in broken), broken
    ok_before = {r["example_id"] for r in rows(conn, "SELECT example_id FROM requests WHERE status='ok'")}

    rt2 = SubprocessFakeRuntime()
    res2 = run_cell(cfg, paths, runtime_impl=rt2)
    assert res2.status == "completed" and res2.cell_id == res.cell_id and res2.n_todo == 6
    assert res2.stats is not None and res2.stats.n_ok == 6
    # exactly the missing ones were sent: no request already answered was resent
    sent2 = {r["example_id"] for r in rows(conn, "SELECT q.example_id FROM attempts a JOIN requests q USING(request_id)"
                                            " WHERE a.run_id=?", (res2.run_id,))}
    assert sent2.isdisjoint(ok_before) and len(sent2) == 6
    assert rows(conn, "SELECT COUNT(*) n FROM responses")[0]["n"] == 10
    assert rows(conn, "SELECT COUNT(*) n FROM requests")[0]["n"] == 10
    # attempt numbers continue across runs (no primary-key clash)
    assert rows(conn, "SELECT COUNT(*) n FROM (SELECT request_id FROM attempts GROUP BY request_id, attempt_no"
                      " HAVING COUNT(*) > 1)")[0]["n"] == 0
    assert [r["status"] for r in rows(conn, "SELECT status FROM runs ORDER BY run_id")] == ["incomplete", "completed"]


def test_engine_start_failure_marks_cell_failed_with_log_tail(cell_env) -> None:
    cfg, paths = cell_env(3)
    res = run_cell(cfg, paths, runtime_impl=SubprocessFakeRuntime(("--exit-during-startup", "3")))
    assert res.status == "failed" and "engine start failed" in res.reason and "injected startup failure" in res.reason
    conn = connect(paths.db)
    inst = rows(conn, "SELECT * FROM engine_instances")[0]
    assert inst["exit_code"] == 3 and "injected startup failure" in inst["error"]
    assert rows(conn, "SELECT status FROM cells")[0]["status"] == "failed"
    assert rows(conn, "SELECT kind FROM events WHERE kind='cell_failed'")


def test_4xx_requests_leave_the_cell_incomplete(cell_env) -> None:
    cfg, paths = cell_env(3)
    res = run_cell(cfg, paths, runtime_impl=SubprocessFakeRuntime(("--fail-every", "2", "--fail-status", "400")))
    assert res.status == "incomplete" and res.n_failed == 1 and res.n_ok == 2
    # says what happened: a 4xx is not retried, and the server's words are in the reason (not only in attempts)
    assert res.reason.startswith("1 request(s) failed (not retried: the error is not retryable); last error: HTTP 400")


def test_cell_id_is_stable_and_ignores_operational_knobs(cell_env) -> None:
    cfg, paths = cell_env(2)
    spec, _, _ = resolve_cell_spec(cfg, method="snapkv", compression_ratio=0.5)
    a = cell_id_for(cell_inputs(cfg, spec, paths.dataset_id))
    assert a.startswith("fake.snapkv.r0.5-") and a == cell_id_for(cell_inputs(cfg, spec, paths.dataset_id))
    cfg2, _ = cell_env(2, engine={"concurrency": 32, "port": 9999}, decoding={"repeats": 3, "request_timeout_s": 5})
    spec2, _, _ = resolve_cell_spec(cfg2, method="snapkv", compression_ratio=0.5)
    assert cell_id_for(cell_inputs(cfg2, spec2, paths.dataset_id)) == a
    spec3, _, _ = resolve_cell_spec(cfg, method="snapkv", compression_ratio=0.75)
    assert cell_id_for(cell_inputs(cfg, spec3, paths.dataset_id)) != a
    spec4, _, _ = resolve_cell_spec(cfg, method="snapkv", budget=512)
    assert cell_id_for(cell_inputs(cfg, spec4, paths.dataset_id)).startswith("fake.snapkv.b512-")


def test_request_body_carries_extras_scope_and_special_tokens(cell_env) -> None:
    cfg, _ = cell_env(1, kv={"scope": "context_only"}, decoding={"temperature": 0.7})
    spec, _, _ = resolve_cell_spec(cfg, method="snapkv", compression_ratio=0.5)
    entry = {"prompt": "ctx Question: q", "max_new_tokens": 7, "add_special_tokens": False, "question_start": 4}
    b = request_body(entry, spec, cfg)
    assert b["prompt"] == "ctx Question: q" and b["max_tokens"] == 7 and b["temperature"] == 0.7
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
    assert b["add_special_tokens"] is False
    assert b["kv_press"] == {"method": "snapkv", "compression_ratio": 0.5, "scope": "context_only", "question_start": 4}
    assert "kv_press" not in spec.request_extras or "question_start" not in spec.request_extras["kv_press"]  # not mutated
    cfg_q, _ = cell_env(1)
    assert "scope" not in request_body(entry, resolve_cell_spec(cfg_q, method="snapkv", budget=64)[0], cfg_q)["kv_press"]


def test_external_runtime_needs_a_url(cell_env) -> None:
    from kv_transition.errors import ConfigError

    cfg, _ = cell_env(1)
    with pytest.raises(ConfigError, match="base URL"):
        resolve_cell_spec(cfg, runtime="external")
    spec, rt, url = resolve_cell_spec(cfg, runtime="external", base_url="http://127.0.0.1:8123/")
    assert (rt, url, spec.base_url) == ("external", "http://127.0.0.1:8123", "http://127.0.0.1:8123")
    # no --engine, and the config describes a local engine: the server is the generic `openai` engine
    assert (spec.engine, spec.method, spec.readiness_timeout_s) == ("openai", "full", 30.0)
    spec, _, url = resolve_cell_spec(cfg, engine="fake", runtime="external", base_url="http://127.0.0.1:8123/v1/")
    assert (spec.engine, url) == ("fake", "http://127.0.0.1:8123")
    cfg_ext, _ = cell_env(1, engine={"runtime": "external", "base_url": "http://127.0.0.1:8123/v1",
                                     "readiness_timeout_s": 5})
    spec, _, url = resolve_cell_spec(cfg_ext)  # the config names its engine for this server: that one
    assert (spec.engine, url, spec.readiness_timeout_s) == ("fake", "http://127.0.0.1:8123", 5)
