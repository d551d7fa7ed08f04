"""On CPU through the process runtime with the TEST DOUBLE server: a matrix pins the attention backend per
method and the DB records the backend each cell's engine logged; `kvt preflight` (and `kvt matrix run`
before anything starts) runs each argv through the engine's own parser and exits 2 naming the cell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kv_transition.cli import main
from kv_transition.db import connect, rows
from tests.fakes.fake_engine import FAKE_SERVER, FAKES_DIR

ENGINE = f"""
name: fakeab
image: kvt-test-engine
tag: latest
command: ["python", "-u", "{FAKE_SERVER}"]
args: ["--host", "{{host}}", "--port", "{{port}}", "--model", "{{served_model}}"]
env: {{FAKE_SERVER_DIR: "{FAKES_DIR}"}}
health: {{path: /health, readiness_timeout_s: 20, interval_s: 0.05}}
metrics: {{path: /metrics, kv_usage: ["vllm:kv_cache_usage_perc"]}}
gpu: true
method_mode: server
argcheck: {{script: argcheck.py}}
attention_backend:
  args: ["--attention-backend", "{{attention_backend}}"]
  log_patterns:
    - 'Using (?P<backend>[A-Z0-9_]+) attention backend out of potential backends'
    - 'Using AttentionBackendEnum\\.(?P<backend>[A-Z0-9_]+) backend\\.'
methods:
  full: {{baseline: true}}
  fp8: {{args: ["--reply", "The quick brown fox"]}}
  bad: {{args: ["--kv-cache-dtype", "fp9"]}}
"""


def _engine(engines_dir: Path) -> None:
    d = engines_dir / "fakeab"
    d.mkdir()
    (d / "engine.yaml").write_text(ENGINE)
    shutil.copy(FAKES_DIR / "argcheck.py", d / "argcheck.py")


def test_pinned_backend_per_method_and_the_used_backend_in_the_db(experiment, engines_dir: Path, capsys) -> None:
    _engine(engines_dir)
    matrix = {"name": "ab", "engines": {"fakeab": {"methods": ["full", "fp8"]}},
              "overrides": [{"match": {"engine": "fakeab", "method": "fp8"}, "attention_backend": "TRITON_ATTN"}]}
    cpath, mpath, cfg, paths = experiment(4, matrix)
    rc = main(["matrix", "run", "-c", str(cpath), "-m", str(mpath), "--slots", "1", "--no-live"])
    assert rc == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "argcheck" in out and "accepted by the engine's parser" in out  # the preflight ran first
    conn = connect(paths.db)
    inst = {r["cell_id"].split("-")[0]: r for r in rows(conn, "SELECT * FROM engine_instances")}
    assert inst["fakeab.full"]["attention_backend_requested"] is None
    assert inst["fakeab.full"]["attention_backend"] == "FLASH_ATTN"  # the engine chose (its log says so)
    assert inst["fakeab.fp8"]["attention_backend_requested"] == "TRITON_ATTN"
    assert inst["fakeab.fp8"]["attention_backend"] == "TRITON_ATTN"
    assert "--attention-backend" in json.loads(inst["fakeab.fp8"]["args_json"])
    assert "--attention-backend" not in json.loads(inst["fakeab.full"]["args_json"])
    assert all(json.loads(r["mounts_json"]) == [] for r in inst.values())  # process runtime: host paths
    cells = {r["method"]: r["attention_backend"] for r in rows(conn, "SELECT method, attention_backend FROM cells")}
    assert cells == {"full": "FLASH_ATTN", "fp8": "TRITON_ATTN"}


def test_preflight_rejects_a_bad_argv_with_the_engines_message_before_anything_starts(
        experiment, engines_dir: Path, capsys) -> None:
    _engine(engines_dir)
    matrix = {"name": "pf", "engines": {"fakeab": {"methods": ["full", "bad"]}}}
    cpath, mpath, cfg, paths = experiment(4, matrix)
    rc = main(["preflight", "-c", str(cpath), "-m", str(mpath), "--slots", "1"])
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc == 2 and len(err) == 1, cap
    assert "preflight: argcheck fakeab" in err[0] and "cell fakeab.bad-" in err[0]
    assert "unrecognized arguments: --kv-cache-dtype fp9" in err[0]  # argparse's own message, from the engine's parser
    assert "argcheck" in cap.out and "fail" in cap.out  # the table
    assert main(["preflight", "-c", str(cpath), "-m", str(mpath), "--slots", "1", "--json"]) == 2
    checks = json.loads(capsys.readouterr().out)["checks"]
    ac = {c["cells"][0].split("-")[0]: c for c in checks if c["check"] == "argcheck"}
    assert ac["fakeab.full"]["status"] == "ok" and "attention_backend=FLASH_ATTN" in ac["fakeab.full"]["detail"]
    assert ac["fakeab.bad"]["status"] == "fail"

    rc = main(["matrix", "run", "-c", str(cpath), "-m", str(mpath), "--slots", "1", "--no-live"])
    assert rc == 2 and "fp9" in capsys.readouterr().err
    conn = connect(paths.db)
    assert rows(conn, "SELECT COUNT(*) n FROM matrix_runs")[0]["n"] == 0  # nothing started, nothing recorded
    assert rows(conn, "SELECT COUNT(*) n FROM cells")[0]["n"] == 0
    assert not paths.logs_dir.exists() or not any(paths.logs_dir.iterdir())

    # --no-preflight skips it: the bad cell then fails at its engine's start, the good one completes
    rc = main(["matrix", "run", "-c", str(cpath), "-m", str(mpath), "--slots", "1", "--no-live", "--no-preflight"])
    assert rc == 1
    st = {r["method"]: r["status"] for r in rows(conn, "SELECT method, status FROM cells")}
    assert st == {"full": "completed", "bad": "failed"}


def test_preflight_of_one_config_cell_json(experiment, engines_dir: Path, capsys) -> None:
    _engine(engines_dir)
    cpath, mpath, cfg, paths = experiment(2, {"name": "one", "engines": {"fakeab": {"methods": ["full"]}}},
                                          engine={"name": "fakeab"}, kv={"method": "bad"})
    assert main(["preflight", "-c", str(cpath), "--json"]) == 2
    cap = capsys.readouterr()
    checks = json.loads(cap.out)["checks"]
    ac = next(c for c in checks if c["check"] == "argcheck")
    assert ac["status"] == "fail" and "fp9" in ac["detail"] and ac["cells"] == ["fakeab/bad"]
    gpu = next(c for c in checks if c["check"] == "gpus")
    assert gpu["status"] in ("skip", "ok")  # device cpu: no GPU engine involved
    assert {c["check"] for c in checks} >= {"argcheck", "port", "gpus", "disk"}
