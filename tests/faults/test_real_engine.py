"""kill -9 of the REAL kvpress engine (`python -m kvpress_engine`, process runtime, CPU, tiny model)
mid-cell: `kvt run` notices within seconds, exits 1, and the cell's reason quotes the engine's last
log lines; the run row counts exactly the answers stored; nothing is left running."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.fake_engine import free_port

from .conftest import pid_alive, q, wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.engine
def test_kill9_of_the_real_kvpress_engine_mid_cell(tmp_path: Path, tokenizer_cache: Path) -> None:
    from kv_transition.config import load_config, resolve_paths
    from kv_transition.db import connect
    from kv_transition.manifest.store import seal, write_db
    from kv_transition.manifest.prepare import record_experiment
    from tests.matrix.conftest import scorable_manifest

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVT_", "FAKE_"))}
    env.update({"KVT_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO / "harness"), str(REPO)])})
    shutil.copytree(tokenizer_cache, tmp_path / "data" / "tokenizers", dirs_exist_ok=True)
    overrides = ["experiment.group_id=kill9real", "dataset.id=tiny6", "output.runs_root=runs", "output.data_root=data",
                 f"engine.port={free_port()}", "telemetry.interval_s=0.5", "decoding.retry_backoff_s=0.5"]
    cfg = load_config(REPO / "config" / "default.yaml", overrides, env=env)
    paths = resolve_paths(cfg, cwd=tmp_path)
    m = scorable_manifest(paths.dataset_id, 6)
    m.pop("content_hash", None)
    for e in m["entries"]:
        e["max_new_tokens"] = 48  # long enough on CPU that the kill lands mid-cell
    conn = connect(paths.db)
    record_experiment(conn, cfg)
    write_db(conn, seal(m), paths.manifest, cfg.experiment.group_id)
    conn.close()

    argv = [sys.executable, "-m", "kv_transition", "run", "-c", str(REPO / "config" / "default.yaml"), "-q", "--json",
            *[x for o in overrides for x in ("-o", o)]]
    child = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: q(paths.db, "SELECT COUNT(*) n FROM responses")[0]["n"] >= 1, 300, "a first real answer")
        inst = q(paths.db, "SELECT pids_json, log_path FROM engine_instances ORDER BY instance_id DESC LIMIT 1")[0]
        engine = json.loads(inst["pids_json"])[0]
        t0 = time.monotonic()
        os.killpg(engine, signal.SIGKILL)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 1, err
    assert time.monotonic() - t0 < 30
    cell = q(paths.db, "SELECT status, reason FROM cells")[0]
    assert cell["status"] == "incomplete"
    assert "engine stopped mid-cell (exit code -9)" in cell["reason"]
    assert "last 30 engine log lines" in cell["reason"]
    log_lines = [ln for ln in Path(inst["log_path"]).read_text(errors="replace").splitlines() if ln.strip()]
    assert log_lines and log_lines[-1] in cell["reason"]  # the engine's own last words
    run = q(paths.db, "SELECT * FROM runs")[0]
    stored = q(paths.db, "SELECT COUNT(*) n FROM responses WHERE run_id=?", (run["run_id"],))[0]["n"]
    assert run["status"] == "incomplete" and run["n_ok"] == stored >= 1
    assert not q(paths.db, "SELECT * FROM engine_instances WHERE stopped_at IS NULL")
    assert not pid_alive(engine)
    assert not list((tmp_path / "state" / "processes").glob("*.json"))  # nothing registered as still running
