"""`kvt lock`: tags → digests (registry, RepoDigests, local id with a `local:` marker), unresolvable → exit 2;
plan/run use the lock; the docker path of a matrix through the real daemon with the test image."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from kv_transition.cli import main
from kv_transition.matrix.lock import LockError, resolve_image
from tests.fakes.docker_fixtures import docker_client, test_image  # noqa: F401 - fixtures

from .conftest import write_yaml


class FakeImages:
    def __init__(self, registry: Any = None, local: Any = None):
        self.registry, self.local = registry, local

    def get_registry_data(self, ref: str) -> Any:
        if isinstance(self.registry, Exception):
            raise self.registry
        return SimpleNamespace(id=self.registry)

    def get(self, ref: str) -> Any:
        if self.local is None:
            raise RuntimeError(f"No such image: {ref}")
        return SimpleNamespace(id=self.local[0], attrs={"RepoDigests": self.local[1]})


def test_resolution_order() -> None:
    d = "sha256:" + "1" * 64
    c = SimpleNamespace(images=FakeImages(registry=d))
    assert resolve_image(c, "vllm/vllm-openai:v1") == {"digest": d, "source": "registry"}
    off = RuntimeError("dial tcp: lookup registry-1.docker.io: no such host")
    c = SimpleNamespace(images=FakeImages(off, ("sha256:" + "2" * 64, ["vllm/vllm-openai@sha256:" + "3" * 64])))
    assert resolve_image(c, "vllm/vllm-openai:v1") == {"digest": "sha256:" + "3" * 64, "source": "repo_digest"}
    c = SimpleNamespace(images=FakeImages(off, ("sha256:" + "2" * 64, [])))
    assert resolve_image(c, "mine:dev") == {"digest": "local:sha256:" + "2" * 64, "source": "local"}
    with pytest.raises(LockError, match="image nope:1: cannot resolve a digest"):
        resolve_image(SimpleNamespace(images=FakeImages(off, None)), "nope:1")


DOCKER_ENGINE = """
name: fakedock
image: kvt-test-engine
tag: latest
args: ["--host", "{host}", "--port", "{port}", "--model", "{served_model}"]
health: {path: /health, readiness_timeout_s: 30, interval_s: 0.1}
metrics: {path: /metrics, kv_usage: ["vllm:kv_cache_usage_perc"]}
concurrency: 4
gpu: true
ipc_mode: null
shm_size: 64m
method_mode: request
methods:
  full: {request: {kv_press: {method: full}}, baseline: true}
  snapkv: {request: {kv_press: {method: snapkv}}, supports: [compression_ratio]}
"""


@pytest.mark.docker
def test_lock_and_a_docker_matrix_with_the_test_image(experiment, engines_dir: Path, tmp_path: Path, test_image: Any,
                                                      docker_client: Any, capsys: pytest.CaptureFixture) -> None:
    (engines_dir / "fakedock").mkdir()
    (engines_dir / "fakedock" / "engine.yaml").write_text(DOCKER_ENGINE)
    mx = {"name": "dock", "engines": {"fakedock": {"runtime": "docker", "compression_ratios": [0.5],
                                                   "methods": ["full", "snapkv"]}}}
    cpath, mpath, cfg, paths = experiment(4, mx)
    # a locally built image has no RepoDigests and the registry is unreachable here: local id, marked
    assert main(["lock", "-m", str(mpath)]) == 0
    lock_path = mpath.with_name("dock.lock.yaml")
    lock = yaml.safe_load(lock_path.read_text())
    entry = lock["images"]["kvt-test-engine:latest"]
    assert entry == {"digest": "local:" + test_image.id, "source": "local"}
    assert "kvt-test-engine:latest -> local:sha256:" in capsys.readouterr().out

    # the plan picks the lock up and shows the exact docker run
    assert main(["matrix", "plan", "-c", str(cpath), "-m", str(mpath), "--gpus", "0", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    g = plan["groups"][0]
    assert plan["lock"] == str(lock_path) and g["image_lock"] == entry["digest"] and len(g["cells"]) == 2
    assert g["docker_run"].startswith("docker run --rm --network host") and "kvt-test-engine:latest" in g["docker_run"]

    # run it through the real daemon (one container serves both cells); the lock is recorded
    from kv_transition.db import connect, rows

    assert main(["matrix", "run", "-c", str(cpath), "-m", str(mpath), "--slots", "1", "--no-live"]) == 0
    conn = connect(paths.db)
    assert {r["image_lock"] for r in rows(conn, "SELECT image_lock FROM matrix_cells")} == {entry["digest"]}
    loads = rows(conn, "SELECT * FROM matrix_engines")
    assert len(loads) == 1 and loads[0]["runtime"] == "docker" and loads[0]["image_digest"]
    assert json.loads(rows(conn, "SELECT lock_json FROM matrix_runs")[0]["lock_json"])["images"] == lock["images"]
    conn.close()
    left = docker_client.containers.list(all=True, filters={"label": f"kv-transition.group={cfg.experiment.group_id}"})
    assert left == []

    # a tag that resolves nowhere: exit 2, one line
    bad = mpath.with_name("bad.yaml")
    (engines_dir / "fakedock" / "engine.yaml").write_text(DOCKER_ENGINE.replace("tag: latest", "tag: no-such-tag"))
    write_yaml(bad, {**mx, "name": "bad"})
    capsys.readouterr()
    assert main(["lock", "-m", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvt: error: image kvt-test-engine:no-such-tag: cannot resolve a digest")
    assert not bad.with_name("bad.lock.yaml").exists()
