"""Runner test helpers: the TEST DOUBLE server (tests/fakes/fake_openai_server.py) in a thread or as a
child process behind a minimal in-test Runtime, and a throwaway DB with a hand-made manifest."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest

from tests.fakes.fake_engine import FAKE_SERVER, free_port, serve_in_thread  # noqa: E402

from kv_transition.db import connect, utcnow  # noqa: E402
from kv_transition.runtime.base import EngineStartError, Instance, Runtime  # noqa: E402


@pytest.fixture
def fake_server() -> Iterator[Any]:
    """fake_server(*knobs) → (base_url, server); every server is shut down at the end."""
    started: list[Any] = []

    def start(*fault: str) -> tuple[str, Any]:
        url, srv, t = serve_in_thread(list(fault))
        started.append((srv, t))
        return url, srv

    yield start
    for srv, t in started:
        srv.shutdown()
        srv.server_close()
        t.join(5)


class PeakInFlight(threading.Thread):
    """Polls the fake's server-side in-flight counter (can under-count, never over-count)."""

    def __init__(self, srv: Any):
        super().__init__(daemon=True)
        self.state = srv.RequestHandlerClass.state
        self.peak = 0
        self.stop_ev = threading.Event()

    def run(self) -> None:
        while not self.stop_ev.is_set():
            self.peak = max(self.peak, self.state.in_flight)
            time.sleep(0.0005)


def seed_requests(db: Path, n: int, cell_id: str = "c1") -> tuple[int, list[int]]:
    """A cells row, a runs row and n pending requests; → (run_id, request_ids)."""
    conn = connect(db)
    now = utcnow()
    conn.execute("INSERT OR IGNORE INTO cells(cell_id, group_id, dataset_id, engine, method, kv_scope, model_id, repeats,"
                 " inputs_json, config_json, config_hash, spec_json, status, created_at, updated_at)"
                 " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                 (cell_id, "g", "ds", "fake", "full", "query_aware", "m", 1, "{}", "{}", "h", "{}", "running", now, now))
    run_id = conn.execute("INSERT INTO runs(cell_id, runtime, config_hash, host, pid, harness_version, status, started_at)"
                          " VALUES (?,?,?,?,?,?,?,?)", (cell_id, "test", "h", "h", 1, "0", "running", now)).lastrowid
    ids = []
    for i in range(n):
        ids.append(conn.execute("INSERT INTO requests(cell_id, dataset_id, example_id, repeat, status, created_at,"
                                " updated_at) VALUES (?,?,?,?,?,?,?)", (cell_id, "ds", f"ex{i}", 0, "pending", now, now)).lastrowid)
    conn.close()
    return int(run_id), ids


def body(i: int = 0, max_tokens: int = 5, stream: bool = True) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "fake-model", "prompt": f"prompt number {i}", "max_tokens": max_tokens,
                         "temperature": 0.0, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


class SubprocessFakeRuntime(Runtime):
    """A minimal Runtime over the fake server as a child process (real crashes: os._exit)."""

    name = "fake-subprocess"

    def __init__(self, knobs: tuple[str, ...] = ()):
        self.knobs = knobs
        self.started: list[Instance] = []

    def start(self, spec: Any, labels: dict[str, str], log_path: Optional[Path]) -> Instance:
        port = free_port()
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        p = subprocess.Popen([sys.executable, "-u", str(FAKE_SERVER), "--port", str(port), *self.knobs],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        inst = Instance(runtime=self.name, base_url=f"http://127.0.0.1:{port}", spec=spec, ident=str(p.pid),
                        pids=[p.pid], log_path=log_path, started_at=utcnow(), handle=p)
        self.started.append(inst)
        return inst

    def wait_ready(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        deadline = time.monotonic() + (timeout_s or 15)
        while time.monotonic() < deadline:
            if inst.handle.poll() is not None:
                inst.exit_code = inst.handle.returncode
                raise EngineStartError("fake engine exited during the health wait", returncode=inst.exit_code,
                                       log_tail=self.log_tail(inst))
            try:
                if httpx.get(inst.base_url + "/health", timeout=0.5).status_code == 200:
                    inst.ready_at = utcnow()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise EngineStartError("fake engine not healthy in time")

    def is_running(self, inst: Instance) -> bool:
        return inst.handle.poll() is None

    def stop(self, inst: Instance, timeout_s: float = 5.0) -> None:
        p = inst.handle
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        inst.exit_code = p.returncode
        inst.stopped_at = inst.stopped_at or utcnow()


FAKE_ENGINE_YAML = """
name: fake
image: kvt-test-engine
tag: latest
command: ["python", "-u", "fake_openai_server.py"]
args: ["--host", "{host}", "--port", "{port}"]
health: {path: /health, readiness_timeout_s: 15, interval_s: 0.1}
metrics: {path: /metrics, kv_usage: ["vllm:kv_cache_usage_perc"]}
concurrency: 4
gpu: false
method_mode: request
send_add_special_tokens: true
methods:
  full: {baseline: true}
  snapkv:
    request: {kv_press: {method: snapkv}}
    supports: [compression_ratio, budget]
"""


def make_manifest(dataset_id: str, n: int) -> dict[str, Any]:
    from kv_transition.manifest.store import seal

    examples, entries = [], []
    for i in range(n):
        eid = f"ex{i:03d}"
        examples.append({"example_id": eid, "question": f"q{i}", "context": "ctx " * 5, "answers": ["a"],
                         "meta": {"task": "passkey"}})
        prompt = f"context words {i} Question: q{i}"
        entries.append({"example_id": eid, "task": "passkey", "bin_id": i % 2, "prompt": prompt, "chat": False,
                        "add_special_tokens": True, "original_tokens": 10 + i, "final_tokens": 10 + i,
                        "truncated": False, "max_new_tokens": 4, "question_start": prompt.index("Question")})
    return seal({
        "format": "kv-transition/manifest@1", "dataset_id": dataset_id,
        "dataset": {"source": "synthetic", "inputs": {}, "n_loaded": n}, "tokenizer": {"name": "t", "revision": "r"},
        "model": {"id": "fake-model", "max_context": 8192}, "binning": {"strategy": "explicit", "by": "final_tokens",
                                                                       "edges": [0, 12], "n_per_bin": None, "seed": 0},
        "bins": [{"bin_id": 0, "label": "[0,12)", "lo": 0, "hi": 12, "n_candidates": n, "n_selected": n},
                 {"bin_id": 1, "label": "[12,∞)", "lo": 12, "hi": None, "n_candidates": n, "n_selected": n}],
        "entries": entries, "examples": examples,
    })


@pytest.fixture
def cell_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """make(n_entries, **config sections) → (cfg, paths) with the manifest already in the DB."""
    from kv_transition.config import resolve_paths
    from kv_transition.config.schema import Config
    from kv_transition.manifest.store import write_db
    from kv_transition.manifest.prepare import record_experiment

    eng = tmp_path / "engines" / "fake"
    eng.mkdir(parents=True)
    (eng / "engine.yaml").write_text(FAKE_ENGINE_YAML)
    monkeypatch.setenv("KVT_ENGINES_DIR", str(tmp_path / "engines"))

    def make(n: int = 6, **sections: Any):
        raw: dict[str, Any] = {
            "experiment": {"group_id": "rt"}, "dataset": {"id": "fakeds"},
            "model": {"id": "fake-model", "path": "fake-org/fake-model"},
            "engine": {"name": "fake", "runtime": "process", "device": "cpu"},
            "decoding": {"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "max_retries": 2,
                         "request_timeout_s": 10},
            "telemetry": {"interval_s": 0.05},
            "output": {"runs_root": str(tmp_path / "runs"), "data_root": str(tmp_path / "data")},
        }
        for k, v in sections.items():
            raw[k] = {**raw.get(k, {}), **v}
        cfg = Config.model_validate(raw)
        paths = resolve_paths(cfg, cwd=tmp_path)
        conn = connect(paths.db)
        record_experiment(conn, cfg)
        write_db(conn, make_manifest(paths.dataset_id, n), paths.manifest, cfg.experiment.group_id)
        conn.close()
        return cfg, paths

    return make
