"""Matrix fixtures: an engines dir with two TEST DOUBLE engines (tests/fakes/fake_openai_server.py) —
`fakekv` (request mode, like kvpress) and `fakesrv` (server mode, like vLLM) — selected through
KVT_ENGINES_DIR, and a throwaway experiment with a hand-made manifest already in its DB."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes.fake_engine import FAKE_SERVER

FAKEKV = f"""
name: fakekv
image: kvt-test-engine
tag: latest
command: ["python", "-u", "{FAKE_SERVER}"]
args: ["--host", "{{host}}", "--port", "{{port}}", "--model", "{{served_model}}"]
health: {{path: /health, readiness_timeout_s: 20, interval_s: 0.05}}
metrics: {{path: /metrics, kv_usage: ["vllm:kv_cache_usage_perc"]}}
concurrency: 4
gpu: true
method_mode: request
methods:
  full: {{request: {{kv_press: {{method: full}}}}, baseline: true}}
  snapkv: {{request: {{kv_press: {{method: snapkv}}}}, supports: [compression_ratio, budget]}}
  streamingllm: {{request: {{kv_press: {{method: streamingllm}}}}, supports: [compression_ratio, budget]}}
  knorm: {{request: {{kv_press: {{method: knorm}}}}, supports: [compression_ratio, budget]}}
"""

FAKESRV = f"""
name: fakesrv
image: kvt-test-engine
tag: latest
command: ["python", "-u", "{FAKE_SERVER}"]
args: ["--host", "{{host}}", "--port", "{{port}}", "--model", "{{served_model}}"]
health: {{path: /health, readiness_timeout_s: 20, interval_s: 0.05}}
metrics: {{path: /metrics, kv_usage: ["vllm:kv_cache_usage_perc"]}}
concurrency: 4
gpu: true
method_mode: server
methods:
  full: {{baseline: true}}
  fp8: {{args: ["--reply", "The quick brown fox"]}}
  int4: {{args: ["--reply", "The quick"]}}
"""


@pytest.fixture
def engines_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "engines"
    for name, text in (("fakekv", FAKEKV), ("fakesrv", FAKESRV)):
        (root / name).mkdir(parents=True)
        (root / name / "engine.yaml").write_text(text)
    monkeypatch.setenv("KVT_ENGINES_DIR", str(root))
    monkeypatch.setenv("KVT_STATE_DIR", str(tmp_path / "state"))  # process registry of this test only
    return root


def fake_model_dir() -> Path:
    """A local model path that exists (kvt refuses a missing one) and is the same for every test root
    (it is an input of the cell id); the fake engines never read it."""
    import tempfile

    p = Path(tempfile.gettempdir()) / "kvt-fake-model"
    p.mkdir(exist_ok=True)
    return p


def base_config(tmp_path: Path, group: str = "mx", **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "experiment": {"group_id": group}, "dataset": {"id": "fakeds"},
        "model": {"id": "fake-model", "path": str(fake_model_dir())},
        "engine": {"name": "fakekv", "runtime": "process", "device": "cpu", "port": 18400},
        "decoding": {"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "max_retries": 2, "request_timeout_s": 10},
        "telemetry": {"interval_s": 0.1, "nvml": False},
        "output": {"runs_root": str(tmp_path / "runs"), "data_root": str(tmp_path / "data")},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return raw


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def experiment(tmp_path: Path, engines_dir: Path):
    """make(n_entries, matrix dict, root=tmp_path, **config sections) → (config path, matrix path, cfg, paths)."""
    from kv_transition.config import load_config, resolve_paths
    from kv_transition.db import connect
    from kv_transition.manifest.store import write_db
    from kv_transition.manifest.prepare import record_experiment
    def make(n: int, matrix: dict[str, Any], root: Path = tmp_path, **sections: Any):
        cpath = write_yaml(root / "config.yaml", base_config(root, **sections))
        mpath = write_yaml(root / "matrix" / f"{matrix['name']}.yaml", matrix)
        cfg = load_config(cpath, env=dict(os.environ))
        paths = resolve_paths(cfg, cwd=root)
        conn = connect(paths.db)
        record_experiment(conn, cfg)
        write_db(conn, scorable_manifest(paths.dataset_id, n), paths.manifest, cfg.experiment.group_id)
        conn.close()
        return cpath, mpath, cfg, paths

    return make


def scorable_manifest(dataset_id: str, n: int) -> dict[str, Any]:
    """tests/runner's hand-made manifest, scorable: synthetic passkey examples whose answer is the fake's
    deterministic reply ("The quick brown fox", 4 tokens) for even examples and something else for odd."""
    from kv_transition.datasets.synthetic import SYNTHETIC_METRICS
    from kv_transition.manifest.store import seal
    from tests.runner.conftest import make_manifest

    m = make_manifest(dataset_id, n)
    m.pop("content_hash", None)
    for i, ex in enumerate(m["examples"]):
        ex["answers"] = ["The quick brown fox" if i % 2 == 0 else "lazy dog"]
        ex["meta"] = {"task": "passkey", "source": "synthetic", "metric": SYNTHETIC_METRICS["passkey"]}
    return seal(m)
