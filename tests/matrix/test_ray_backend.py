"""`kvt matrix run --backend ray` on a real local Ray cluster (tests/matrix/ray_cluster.py: a head and two
worker nodes on 127.0.0.1, each worker one `kvt_slot`): groups placed one per node, rows merged into the
driver's DB exactly once, a worker node killed mid-group (in-flight requests recorded as attempts, the
group retried on the other node, every request answered exactly once), resume, SIGINT. Engines: the TEST
DOUBLE server (fast) and the real kvpress engine on the tiny model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.matrix.ray_cluster import SLOT, LocalCluster

from kv_transition.db import connect, rows

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray
ENV = {"FAKE_TOKEN_DELAY": "0.01"}
TWO = {"name": "rt", "engines": {"fakekv": {"compression_ratios": [0.5], "methods": ["full", "snapkv"], "env": ENV},
                                 "fakesrv": {"methods": ["full"], "env": ENV}}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(workers=2)
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def ray_cluster(cluster: LocalCluster) -> LocalCluster:
    cluster.ensure_workers(2)
    return cluster


def _runner(cpath: Path, mpath: Path, address: str, **kw: Any) -> Any:
    from kv_transition.config import load_config
    from kv_transition.matrix import expand, load_matrix
    from kv_transition.matrix.ray_backend import RayMatrixRunner

    cfg = load_config(cpath, env=dict(os.environ))
    r = RayMatrixRunner(cfg, expand(cfg, load_matrix(mpath)), address=address, slot_resource=SLOT,
                        cwd=cpath.parent, sync_s=kw.pop("sync_s", 0.5), log=kw.pop("log", print), **kw)
    r.prepare()
    return r


def _exactly_once(conn: Any) -> tuple[int, int]:
    """(requests, responses): every request has one response, none twice, none orphaned."""
    n_req = conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    n_resp = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert conn.execute("SELECT COUNT(*) FROM requests WHERE status<>'ok'").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM (SELECT cell_id, example_id, repeat FROM requests"
                        " GROUP BY 1,2,3 HAVING COUNT(*)>1)").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM responses p LEFT JOIN requests q USING(request_id)"
                        " WHERE q.request_id IS NULL").fetchone()[0] == 0
    return n_req, n_resp


def test_groups_run_on_the_nodes_and_merge_into_one_db(experiment, ray_cluster: LocalCluster) -> None:
    cpath, mpath, cfg, paths = experiment(5, TWO)
    s = _runner(cpath, mpath, ray_cluster.address).run()
    assert s.ok, [(o.cell.label, o.reason) for o in s.outcomes]
    assert s.counts() == {"completed": 3}
    conn = connect(paths.db)
    assert _exactly_once(conn) == (15, 15)
    # the cells ran in the actors (other pids than this driver), the two groups on the two worker nodes
    runs = rows(conn, "SELECT r.*, c.engine FROM runs r JOIN cells c USING(cell_id)")
    assert len(runs) == 3 and os.getpid() not in {r["pid"] for r in runs}
    assert len({r["pid"] for r in runs if r["engine"] == "fakekv"}) == 1
    assert {r["pid"] for r in runs if r["engine"] == "fakekv"} != {r["pid"] for r in runs if r["engine"] == "fakesrv"}
    mr = rows(conn, "SELECT * FROM matrix_runs")
    assert len(mr) == 1 and mr[0]["status"] == "completed" and '"kind": "ray"' in mr[0]["inventory_json"]
    assert len(rows(conn, "SELECT * FROM matrix_cells WHERE status='completed'")) == 3
    assert len(rows(conn, "SELECT * FROM matrix_engines")) == 1   # the shared request-mode engine, loaded once
    assert rows(conn, "SELECT COUNT(*) n FROM telemetry_host")[0]["n"] > 0
    assert rows(conn, "SELECT COUNT(*) n FROM engine_instances")[0]["n"] == 3
    n_att = rows(conn, "SELECT COUNT(*) n FROM attempts")[0]["n"]
    conn.close()
    # resume: complete groups start no actor, send nothing
    s2 = _runner(cpath, mpath, ray_cluster.address).run()
    assert s2.ok and set(s2.engine_loads.values()) == {0}
    conn = connect(paths.db)
    assert rows(conn, "SELECT COUNT(*) n FROM attempts")[0]["n"] == n_att
    assert rows(conn, "SELECT COUNT(*) n FROM runs")[0]["n"] == 3
    conn.close()


def test_plan_shows_what_ray_is_asked_for(experiment) -> None:
    cpath, mpath, cfg, paths = experiment(2, TWO)
    r = subprocess.run([sys.executable, "-m", "kv_transition", "matrix", "plan", "-c", str(cpath), "-m", str(mpath),
                        "--backend", "ray", "--ray-slot-resource", SLOT, "--json"],
                       capture_output=True, text=True, timeout=60, env={**os.environ})
    assert r.returncode == 0, r.stderr
    import json

    plan = json.loads(r.stdout)
    assert plan["backend"] == "ray" and plan["n_groups"] == 2
    reqs = {g["engine"]: g["ray_request"] for g in plan["groups"]}
    # the fake engines declare gpu: true but run with device cpu here → one slot each
    assert reqs == {"fakekv": {"num_cpus": 0, "resources": {SLOT: 1}}, "fakesrv": {"num_cpus": 0, "resources": {SLOT: 1}}}
    assert [g["submit_order"] for g in plan["groups"]] == [0, 1]


def test_ray_request_gpu_groups_ask_for_tp_gpus() -> None:
    from types import SimpleNamespace

    from kv_transition.matrix.ray_backend import ray_request, request_label

    gpu_cell = SimpleNamespace(runtime="docker", spec=SimpleNamespace(needs_gpu=True))
    g = SimpleNamespace(cells=[gpu_cell], tp=4)
    assert ray_request(g) == {"num_gpus": 4, "num_cpus": 1}  # type: ignore[arg-type]
    assert request_label(ray_request(g)) == "GPU=4 CPU=1"  # type: ignore[arg-type]
    cpu = SimpleNamespace(cells=[SimpleNamespace(runtime="process", spec=SimpleNamespace(needs_gpu=False))], tp=1)
    assert ray_request(cpu) == {"num_cpus": 1}  # type: ignore[arg-type]
    assert ray_request(cpu, "kvt_slot") == {"num_cpus": 0, "resources": {"kvt_slot": 1}}  # type: ignore[arg-type]
