"""Fault-injection fixtures: a throwaway project driven through the real `kvt` CLI (a child process,
so it can be SIGKILLed / SIGINTed), the TEST DOUBLE engine (tests/fakes/fake_openai_server.py) as a
local process where the real engine is not the point, and DB/file probes for "nothing written"."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml

from tests.fakes.fake_engine import FAKE_SERVER, free_port

REPO = Path(__file__).resolve().parents[2]

FAKEKV = f"""
name: fakekv
image: kvt-test-engine
tag: latest
command: ["python", "-u", "{FAKE_SERVER}"]
args: ["--host", "{{host}}", "--port", "{{port}}", "--model", "{{served_model}}"]
passthrough_env: [HF_TOKEN, FAKE_PASSTHRU_TOKEN]
health: {{path: /health, readiness_timeout_s: 20, interval_s: 0.05}}
metrics: {{path: /metrics, kv_usage: ["vllm:kv_cache_usage_perc"]}}
concurrency: 1
gpu: false
method_mode: request
methods:
  full: {{request: {{kv_press: {{method: full}}}}, baseline: true}}
  snapkv: {{request: {{kv_press: {{method: snapkv}}}}, supports: [compression_ratio, budget]}}
"""


def tree_state(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 — an SQLite DB by its logical content (a full dump), as
    its -wal/-shm side files come and go with any reader — to prove nothing was written."""
    out = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.name.endswith(("-wal", "-shm")):
                continue
            data = p.read_bytes()
            if p.suffix == ".sqlite" and data.startswith(b"SQLite format 3"):
                c = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
                try:
                    data = "\n".join(c.iterdump()).encode()
                except sqlite3.DatabaseError:
                    pass
                finally:
                    c.close()
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def q(db: Path, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
    """Read-only query (never migrates, never writes)."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    c.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in c.execute(sql, params)]
    finally:
        c.close()


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except sqlite3.Error:
            v = None
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Project:
    root: Path
    config: Path
    env: dict[str, str]
    group: str
    db: Path
    started: list[subprocess.Popen] = field(default_factory=list)

    def kvt(self, *args: str, timeout: float = 120, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kv_transition", *args], cwd=self.root, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def spawn(self, *args: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "kv_transition", *args], cwd=self.root,
                             env={**self.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        self.started.append(p)
        return p

    def run_args(self, *extra: str) -> list[str]:
        return ["run", "-c", str(self.config), "-q", "--json", *extra]

    def engine_pids(self) -> list[int]:
        """Engine processes the process runtime registered for this test (its pidfile registry)."""
        reg = Path(self.env["KVT_STATE_DIR"]) / "processes"
        pids = []
        for f in reg.glob("*.json") if reg.is_dir() else []:
            try:
                pids.append(int(json.loads(f.read_text())["pid"]))
            except (ValueError, KeyError, OSError):
                pass
        return pids


def one_error_line(stderr: str) -> str:
    """The CLI's contract for bad input: exactly one line, `kvt: error: …`, and no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("kvt: error: "), stderr
    return lines[0]


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path: Path):
    """make(n_entries=6, token_delay=0.0, group='faults', prepared=True, **config sections) → Project: a
    config over the fake engine (a real local process), the manifest already in the DB when `prepared`."""
    made: list[Project] = []

    def make(n: int = 6, token_delay: float = 0.0, group: str = "faults", prepared: bool = True,
             **sections: Any) -> Project:
        eng = tmp_path / "engines" / "fakekv"
        eng.mkdir(parents=True, exist_ok=True)
        (eng / "engine.yaml").write_text(FAKEKV)
        model = tmp_path / "model"
        model.mkdir(exist_ok=True)
        raw: dict[str, Any] = {
            "experiment": {"group_id": group}, "dataset": {"id": "fakeds"},
            "model": {"id": "fake-model", "path": str(model)},
            "engine": {"name": "fakekv", "runtime": "process", "device": "cpu", "port": free_port(),
                       "extra_args": ["--token-delay", str(token_delay)] if token_delay else []},
            "decoding": {"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "max_retries": 1,
                         "request_timeout_s": 20},
            "telemetry": {"interval_s": 0.05, "nvml": False},
            "output": {"runs_root": "runs", "data_root": "data"},
        }
        for k, v in sections.items():
            raw[k] = {**raw.get(k, {}), **v}
        cpath = write_yaml(tmp_path / "config" / f"{group}.yaml", raw)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVT_", "FAKE_"))}
        env.update({"KVT_ENGINES_DIR": str(tmp_path / "engines"), "KVT_STATE_DIR": str(tmp_path / "state"),
                    "PYTHONPATH": os.pathsep.join([str(REPO / "harness"), str(REPO)]), "NO_COLOR": "1",
                    "KVT_DB_BUSY_TIMEOUT_S": "2"})
        db = tmp_path / "runs" / group / "kv_transition.sqlite"
        if prepared:
            from kv_transition.config import load_config, resolve_paths
            from kv_transition.db import connect
            from kv_transition.manifest.store import write_db
            from kv_transition.manifest.prepare import record_experiment
            from tests.matrix.conftest import scorable_manifest

            cfg = load_config(cpath, env=env)
            paths = resolve_paths(cfg, cwd=tmp_path)
            conn = connect(paths.db)
            record_experiment(conn, cfg)
            write_db(conn, scorable_manifest(paths.dataset_id, n), paths.manifest, cfg.experiment.group_id)
            conn.close()
            assert paths.db == db
        p = Project(tmp_path, cpath, env, group, db)
        made.append(p)
        return p

    yield make
    for p in made:  # nothing left running: our kvt children, then any engine they left behind
        for c in p.started:
            if c.poll() is None:
                c.kill()
                c.wait(10)
        for pid in p.engine_pids():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
