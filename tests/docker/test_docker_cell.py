"""A whole cell on the docker runtime: the engine container is killed mid-cell → the cell is
incomplete; the re-run sends exactly the missing requests (no duplicates, none lost)."""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Optional

import httpx
import pytest

from kv_transition.runtime.docker import DockerRuntime
from tests.fakes.fake_engine import free_port
from tests.runner.conftest import cell_env  # noqa: F401 - the runner's fixture: config + manifest in a DB

pytestmark = pytest.mark.docker

ENGINE_YAML = """
name: fakedocker
image: kvt-test-engine
tag: latest
args: ["--host", "{host}", "--port", "{port}", "--token-delay", "0.03"]
health: {path: /health, readiness_timeout_s: 20, interval_s: 0.1}
metrics: {path: /metrics, kv_usage: ["vllm:kv_cache_usage_perc"]}
concurrency: 1
gpu: false
ipc_mode: null
shm_size: 64m
method_mode: request
methods:
  full: {baseline: true}
"""


class KillAfter(DockerRuntime):
    """Kills the container (docker kill, SIGKILL) once the fake has received `n` completion requests."""

    def __init__(self, n: int, **kw: Any):
        super().__init__(**kw)
        self.n = n
        self.killed: Optional[str] = None

    def wait_ready(self, inst, timeout_s=None):
        super().wait_ready(inst, timeout_s)
        threading.Thread(target=self._killer, args=(inst,), daemon=True).start()

    def _killer(self, inst) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                m = re.search(r"^fake:requests_total (\d+)", httpx.get(inst.base_url + "/metrics").text, re.M)
            except httpx.HTTPError:
                return
            if m and int(m.group(1)) >= self.n:
                inst.handle["container"].kill()
                self.killed = inst.ident
                return
            time.sleep(0.01)


def test_container_killed_mid_cell_then_rerun_sends_exactly_the_missing(cell_env, docker_client, test_image,  # noqa: F811
                                                                        group, tmp_path):
    from kv_transition.cell import run_cell
    from kv_transition.db import connect, rows

    eng = tmp_path / "engines" / "fakedocker"
    eng.mkdir(parents=True)
    (eng / "engine.yaml").write_text(ENGINE_YAML)
    cfg, paths = cell_env(10, experiment={"group_id": group},
                          engine={"name": "fakedocker", "runtime": "docker", "port": free_port()})

    rt = KillAfter(5, client=docker_client, pull=False, stop_timeout_s=5)
    res = run_cell(cfg, paths, runtime_impl=rt, watchdog_interval_s=0.05)
    assert rt.killed, "the container was never killed"
    assert res.status == "incomplete" and 0 < res.n_ok < 10, res.reason
    assert "engine stopped mid-cell" in res.reason
    conn = connect(paths.db)
    (inst,) = rows(conn, "SELECT * FROM engine_instances")
    assert inst["exit_code"] == 137 and inst["image_digest"] == test_image.id
    ok_before = {r["example_id"] for r in rows(conn, "SELECT example_id FROM requests WHERE status='ok'")}
    assert len(ok_before) == res.n_ok

    res2 = run_cell(cfg, paths, runtime_impl=DockerRuntime(client=docker_client, pull=False, stop_timeout_s=5))
    assert res2.status == "completed" and res2.cell_id == res.cell_id and res2.n_todo == 10 - res.n_ok
    sent2 = {r["example_id"] for r in rows(conn, "SELECT q.example_id FROM attempts a JOIN requests q USING(request_id)"
                                            " WHERE a.run_id=?", (res2.run_id,))}
    assert sent2.isdisjoint(ok_before) and len(sent2) == 10 - res.n_ok
    assert rows(conn, "SELECT COUNT(*) n FROM responses")[0]["n"] == 10
    assert rows(conn, "SELECT COUNT(*) n FROM requests")[0]["n"] == 10
    assert [r["status"] for r in rows(conn, "SELECT status FROM runs ORDER BY run_id")] == ["incomplete", "completed"]
    assert docker_client.containers.list(all=True, filters={"label": f"kv-transition.group={group}"}) == []
