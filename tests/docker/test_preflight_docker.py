"""Through the real Docker daemon with the test image (kvt-test-engine:latest): the argcheck runs inside
the pinned image (engine dir mounted read-only, no GPU, no network) and rejects a flag with the engine
parser's own message, exit 2 before any engine starts; a local model dir is bind-mounted read-only at a
stable path and recorded per engine instance; a GPU spec without GPU ids never becomes a container."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kv_transition.cli import main
from kv_transition.db import connect, rows
from kv_transition.engines.spec import Mount
from kv_transition.runtime.base import GROUP_LABEL, OWNER_LABEL
from kv_transition.runtime.docker import DockerRuntime
from kv_transition.runtime.gpus import GpuRequiredError
from tests.fakes.fake_engine import FAKES_DIR, fake_spec
from tests.matrix.conftest import engines_dir, experiment  # noqa: F401 - config + matrix + manifest in a DB

pytestmark = pytest.mark.docker

ENGINE = """
name: fakeck
image: kvt-test-engine
tag: latest
args: ["--host", "{host}", "--port", "{port}", "--model", "{served_model}"]
health: {path: /health, readiness_timeout_s: 30, interval_s: 0.1}
metrics: {path: /metrics, kv_usage: ["vllm:kv_cache_usage_perc"]}
gpu: false
ipc_mode: null
method_mode: server
argcheck: {script: argcheck.py}          # python3 inside the image; imports /opt/kvt/fake_openai_server.py
methods:
  full: {baseline: true}
  bad: {args: ["--calculate-kv-scales"]}
"""


def _ours(client: Any, group: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": [f"{OWNER_LABEL}=kv-transition", f"{GROUP_LABEL}={group}"]})


@pytest.fixture
def docker_experiment(experiment, engines_dir: Path, tmp_path: Path, test_image, docker_client):  # noqa: F811
    d = engines_dir / "fakeck"
    d.mkdir()
    (d / "engine.yaml").write_text(ENGINE)
    shutil.copy(FAKES_DIR / "argcheck.py", d / "argcheck.py")
    model = tmp_path / "weights" / "Tiny-Model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")

    groups: list[str] = []

    def make(methods: list[str]):
        import uuid

        group = f"kvt-test-{uuid.uuid4().hex[:8]}"
        groups.append(group)
        out = experiment(3, {"name": "dk", "engines": {"fakeck": {"runtime": "docker", "methods": methods}}},
                         experiment={"group_id": group}, model={"id": "fake-model", "path": str(model)},
                         engine={"name": "fakeck", "runtime": "docker"})
        return (*out, group, model)

    yield make
    from kv_transition.runtime.docker import cleanup_containers

    for g in groups:
        cleanup_containers(group=g, client=docker_client, force=True)


def test_argcheck_in_the_pinned_image_rejects_a_flag_before_any_engine_starts(docker_experiment, docker_client,
                                                                             capsys) -> None:
    cpath, mpath, cfg, paths, group, model = docker_experiment(["full", "bad"])
    rc = main(["preflight", "-c", str(cpath), "-m", str(mpath), "--slots", "1", "--json"])
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert rc == 2
    by = {(c["check"], c["cells"][0].split("-")[0] if c["cells"] else ""): c for c in checks}
    assert by[("image", "fakeck.full")]["status"] == "ok" and "present" in by[("image", "fakeck.full")]["detail"]
    assert by[("argcheck", "fakeck.full")]["status"] == "ok"
    bad = by[("argcheck", "fakeck.bad")]
    assert bad["status"] == "fail" and "unrecognized arguments: --calculate-kv-scales" in bad["detail"]
    mounts = [c for c in checks if c["check"] == "mounts"]
    assert mounts and all(c["status"] == "ok" and str(model) in c["subject"] for c in mounts)
    assert _ours(docker_client, group) == []  # the argcheck containers are gone

    rc = main(["matrix", "run", "-c", str(cpath), "-m", str(mpath), "--slots", "1", "--no-live"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("kvt: error: preflight: argcheck fakeck (cell fakeck.bad-")
    assert "unrecognized arguments: --calculate-kv-scales" in err[-1]
    conn = connect(paths.db)
    assert rows(conn, "SELECT COUNT(*) n FROM matrix_runs")[0]["n"] == 0 and _ours(docker_client, group) == []


def test_docker_cell_sees_the_model_read_only_and_records_mounts(docker_experiment, docker_client, capsys) -> None:
    cpath, mpath, cfg, paths, group, model = docker_experiment(["full"])
    assert main(["matrix", "run", "-c", str(cpath), "-m", str(mpath), "--slots", "1", "--no-live"]) == 0, \
        capsys.readouterr()
    conn = connect(paths.db)
    (inst,) = rows(conn, "SELECT * FROM engine_instances")
    assert json.loads(inst["mounts_json"]) == [{"source": str(model), "target": "/models/Tiny-Model",
                                                "read_only": True, "kind": "model"}]
    assert _ours(docker_client, group) == []


def test_container_gets_the_bind_mount_read_only_and_no_gpu_spec_without_ids(docker_client, test_image, group,
                                                                             tmp_path: Path) -> None:
    model = tmp_path / "M"
    model.mkdir()
    rt = DockerRuntime(client=docker_client, pull=False, stop_timeout_s=5)
    spec = fake_spec("docker", mounts=[Mount(str(model), "/models/M", True, "model")])
    with rt.running(spec, {"group": group, "cell": "mnt"}, tmp_path / "m.log") as inst:
        c = inst.handle["container"]
        c.reload()
        (m,) = [x for x in c.attrs["Mounts"] if x["Destination"] == "/models/M"]
        assert m["Source"] == str(model) and m["RW"] is False and m["Type"] == "bind"
        rc, out = c.exec_run(["python3", "-c", "import os; open('/models/M/x', 'w')"])
        assert rc != 0 and b"Read-only file system" in out
    with pytest.raises(GpuRequiredError, match="needs a GPU"):
        rt.start(fake_spec("docker", gpu=True, device="auto"), {"group": group, "cell": "nogpu"}, tmp_path / "g.log")
    assert _ours(docker_client, group) == []
