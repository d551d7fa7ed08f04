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
def ray_cluster(cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    cluster.ensure_workers(2)
    monkeypatch.setenv("KVT_RAY_WORKDIR", str(tmp_path / "nodes"))  # the nodes' shards and engine logs
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
    # the engine logs stayed on the nodes (their paths recorded); the shards are gone once merged
    logs = [r["log_path"] for r in rows(conn, "SELECT log_path FROM engine_instances")]
    assert all(lp and Path(lp).is_file() and str(paths.runs_root.parent / "nodes") in lp for lp in logs)
    assert not list((paths.runs_root.parent / "nodes").rglob("shard.sqlite"))
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


SLOW = {"name": "rk", "engines": {"fakekv": {"compression_ratios": [0.5], "methods": ["full", "snapkv"],
                                             "env": {"FAKE_TOKEN_DELAY": "0.25"}}}}


def _kill_when(paths: Any, cluster: LocalCluster, runner: Any, n_responses: int, th: threading.Thread,
               box: dict, deadline_s: float = 120) -> dict:
    """Once the group's node is known and `n_responses` answers reached the driver's DB: kill that node."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if not th.is_alive():
            s = box.get("s")
            raise AssertionError(f"the matrix ended before the kill: {s and [(o.cell.label, o.reason) for o in s.outcomes]}")
        lv = next(iter(runner.live_groups.values()), None)
        if lv is not None and lv.node is not None and paths.db.exists():
            conn = connect(paths.db)
            try:
                n = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            finally:
                conn.close()
            if n >= n_responses:
                node = dict(lv.node)
                cluster.kill_worker(node["node_id"])
                return node
        time.sleep(0.1)
    raise AssertionError("the group never got going")


def _bins(db: Path) -> dict:
    conn = connect(db)
    try:
        return {(r["cell_id"], r["bin_id"]): (r["n"], r["mean"], r["rel"]) for r in rows(conn, "SELECT * FROM analysis_bins")}
    finally:
        conn.close()


def _score_analyze(cpath: Path) -> None:
    for cmd in (["score", "-q"], ["analyze"]):
        r = subprocess.run([sys.executable, "-m", "kv_transition", cmd[0], "-c", str(cpath), *cmd[1:]],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + r.stdout


def test_worker_node_killed_mid_group_retried_elsewhere_exactly_once(experiment, ray_cluster: LocalCluster,
                                                                      tmp_path: Path) -> None:
    from kv_transition.runtime.cleanup import cleanup

    cpath, mpath, cfg, paths = experiment(8, SLOW, root=tmp_path / "ray")
    runner = _runner(cpath, mpath, ray_cluster.address)
    box: dict[str, Any] = {}
    th = threading.Thread(target=lambda: box.update(s=runner.run()), daemon=True)
    th.start()
    node = _kill_when(paths, ray_cluster, runner, 3, th, box)
    th.join(300)
    assert not th.is_alive()
    s = box["s"]
    assert s.ok, [(o.cell.label, o.reason) for o in s.outcomes]
    conn = connect(paths.db)
    assert _exactly_once(conn) == (16, 16)
    # the dead node's run is closed as killed, its in-flight requests are attempts (aborted), resent elsewhere
    killed = rows(conn, "SELECT * FROM runs WHERE status='killed'")
    assert killed and all("worker node" in r["reason"] and r["pid"] == node["pid"] for r in killed)
    aborted = rows(conn, "SELECT a.*, q.status FROM attempts a JOIN requests q USING(request_id)"
                         " WHERE a.error_kind='aborted' AND a.error LIKE '%worker node%'")
    assert aborted and all(a["run_id"] in {r["run_id"] for r in killed} for a in aborted)
    assert all(a["status"] == "ok" for a in aborted)
    later = rows(conn, "SELECT DISTINCT pid FROM runs WHERE status='completed'")
    assert later and node["pid"] not in {r["pid"] for r in later}
    assert rows(conn, "SELECT COUNT(*) n FROM events WHERE kind='node_died'")[0]["n"] >= 1
    # no answer was sent twice: per request, one ok attempt
    assert rows(conn, "SELECT COUNT(*) n FROM (SELECT request_id FROM attempts WHERE ok=1 GROUP BY request_id"
                      " HAVING COUNT(*)>1)")[0]["n"] == 0
    conn.close()
    # nothing left running on any node (label-based cleanup ran per node at the end)
    assert cleanup(group=cfg.experiment.group_id, runtime="process", dry_run=True).processes == []
    # the same report as a run that was never interrupted (local backend, same cells)
    from kv_transition.config import load_config
    from kv_transition.matrix import expand, load_matrix
    from kv_transition.matrix.inventory import inventory
    from kv_transition.matrix.run import MatrixRunner

    cref, mref, _, pref = experiment(8, SLOW, root=tmp_path / "ref")
    rcfg = load_config(cref, env=dict(os.environ))
    ref = MatrixRunner(rcfg, expand(rcfg, load_matrix(mref)), inventory(slots=1), cwd=cref.parent).run()
    assert ref.ok, [(o.cell.label, o.reason) for o in ref.outcomes]
    _score_analyze(cpath)
    _score_analyze(cref)
    got, want = _bins(paths.db), _bins(pref.db)
    assert got and got == want


def _kvt_run(cpath: Path, mpath: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kv_transition", "matrix", "run", "-c", str(cpath), "-m", str(mpath),
                             "--backend", "ray", "--ray-address", address, "--ray-slot-resource", SLOT,
                             "--ray-sync-s", "0.5", "--no-live"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ})


def _wait_responses(db: Path, n: int, proc: subprocess.Popen, deadline_s: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if db.exists():
            conn = connect(db)
            try:
                if conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] >= n:
                    return
            finally:
                conn.close()
        time.sleep(0.2)
    raise AssertionError("no responses reached the driver's DB")


def _engines_gone(conn: Any) -> None:
    import psutil

    for r in rows(conn, "SELECT pids_json FROM engine_instances"):
        import json

        for pid in json.loads(r["pids_json"] or "[]"):
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "driver-killed"])
def test_driver_stops_or_dies_then_rerun_resumes(experiment, ray_cluster: LocalCluster, sig: int) -> None:
    from kv_transition.runtime.cleanup import cleanup

    cpath, mpath, cfg, paths = experiment(8, SLOW)
    p = _kvt_run(cpath, mpath, ray_cluster.address)
    _wait_responses(paths.db, 2, p)
    p.send_signal(sig)
    out = p.communicate(timeout=180)[0]
    conn = connect(paths.db)
    n_ok = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert 2 <= n_ok < 16
    if sig == signal.SIGINT:
        assert p.returncode == 130, out[-3000:]
        assert rows(conn, "SELECT status FROM matrix_runs") == [{"status": "interrupted"}]
        # every remote engine was stopped; label-based cleanup on each node finds nothing left
        _engines_gone(conn)
        assert cleanup(group=cfg.experiment.group_id, runtime="process", dry_run=True).processes == []
        assert rows(conn, "SELECT COUNT(*) n FROM runs WHERE status='running'")[0]["n"] == 0
    else:
        # the driver's actors died with it; their engines are orphans on the nodes: the label-based cleanup
        # reaches them through the cluster (this host's own registry is left out: --registry of an empty dir)
        time.sleep(3)
        r = subprocess.run([sys.executable, "-m", "kv_transition", "cleanup", "--group", cfg.experiment.group_id,
                            "--runtime", "process", "--registry", str(paths.run_dir / "empty-registry"),
                            "--runs-root", str(paths.runs_root), "--ray-address", ray_cluster.address],
                           capture_output=True, text=True, timeout=120, env={**os.environ})
        assert r.returncode == 0, r.stderr
        assert any(ln.startswith("node ") and "process group" in ln for ln in r.stdout.splitlines()), r.stdout
        _engines_gone(conn)
        assert cleanup(group=cfg.experiment.group_id, runtime="process", dry_run=True).processes == []
    conn.close()
    # re-running the same command resumes: only what is missing is sent
    p2 = _kvt_run(cpath, mpath, ray_cluster.address)
    out2 = p2.communicate(timeout=300)[0]
    assert p2.returncode == 0, out2[-3000:]
    conn = connect(paths.db)
    assert _exactly_once(conn) == (16, 16)
    assert rows(conn, "SELECT COUNT(*) n FROM runs WHERE status='running'")[0]["n"] == 0
    assert rows(conn, "SELECT COUNT(*) n FROM (SELECT request_id FROM attempts WHERE ok=1 GROUP BY request_id"
                      " HAVING COUNT(*)>1)")[0]["n"] == 0
    statuses = [r["status"] for r in rows(conn, "SELECT status FROM matrix_runs ORDER BY matrix_run_id")]
    assert statuses[-1] == "completed" and statuses[0] in ("interrupted", "killed", "running")
    _engines_gone(conn)
    conn.close()
    assert cleanup(group=cfg.experiment.group_id, runtime="process", dry_run=True).processes == []


@pytest.mark.engine
def test_smoke_matrix_real_kvpress_on_ray_node_killed_same_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   tokenizer_cache: Path,
                                                                   ray_cluster: LocalCluster) -> None:
    """The smoke matrix (kvpress full + snapkv + streamingllm + knorm, one engine) on the tiny model: its
    worker node is killed after the first answers, the group finishes on the other node; every request is
    answered exactly once and the analysis equals an uninterrupted local-backend run's."""
    from tests.matrix.test_kvpress_real import _kvpress_loadable

    why = _kvpress_loadable()
    if why:
        pytest.skip(why)
    from kv_transition.config import load_config, resolve_paths
    from kv_transition.manifest.store import write_db
    from kv_transition.matrix import expand, load_matrix
    from kv_transition.matrix.inventory import inventory
    from kv_transition.matrix.ray_backend import RayMatrixRunner
    from kv_transition.matrix.run import MatrixRunner
    from kv_transition.manifest.prepare import record_experiment

    from .conftest import scorable_manifest, write_yaml

    monkeypatch.delenv("KVT_ENGINES_DIR", raising=False)
    monkeypatch.setenv("KVT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # 6 examples x 4 cells: on a lightly loaded box the tiny model answered 3 x 4 before the driver's first
    # pull showed 2 and the kill found the matrix over (CI, 2026-12-02)
    n_ex = 6

    def setup(root: Path, port: int) -> tuple[Any, Any, Path]:
        shutil.copytree(tokenizer_cache, root / "data" / "tokenizers", dirs_exist_ok=True)
        cpath = write_yaml(root / "config.yaml", {
            "extends": str(REPO / "config" / "default.yaml"), "experiment": {"group_id": "kvray"},
            "dataset": {"id": "tiny3"}, "output": {"runs_root": str(root / "runs"), "data_root": str(root / "data")},
            "engine": {"port": port}, "telemetry": {"interval_s": 0.5}})
        cfg = load_config(cpath, env={})
        paths = resolve_paths(cfg, cwd=root)
        conn = connect(paths.db)
        record_experiment(conn, cfg)
        write_db(conn, scorable_manifest(paths.dataset_id, n_ex), paths.manifest, cfg.experiment.group_id)
        conn.close()
        return cfg, paths, cpath

    cfg, paths, cpath = setup(tmp_path / "ray", 18480)
    # cells one after another: with the group's cells interleaved and their prefill shared, the tiny model answers
    # all 12 requests before the driver's first pull shows 2, and the kill would find nothing left to do
    # (interleaved groups under a node kill: test_worker_node_killed_mid_group_retried_elsewhere_exactly_once)
    smoke = load_matrix(REPO / "config" / "matrix" / "smoke.yaml").model_copy(update={"interleave": False})
    exp = expand(cfg, smoke)
    assert len(exp.cells) == 4 and len(exp.groups) == 1
    runner = RayMatrixRunner(cfg, exp, address=ray_cluster.address, slot_resource=SLOT, cwd=tmp_path / "ray",
                             sync_s=0.5, log=print)
    box: dict[str, Any] = {}
    th = threading.Thread(target=lambda: box.update(s=runner.run()), daemon=True)
    th.start()
    node = _kill_when(paths, ray_cluster, runner, 2, th, box, deadline_s=300)
    th.join(600)
    assert not th.is_alive()
    s = box["s"]
    assert s.ok, [(o.cell.label, o.reason) for o in s.outcomes]
    conn = connect(paths.db)
    assert _exactly_once(conn) == (4 * n_ex, 4 * n_ex)
    assert rows(conn, "SELECT COUNT(*) n FROM runs WHERE status='killed' AND pid=?", (node["pid"],))[0]["n"] >= 1
    applied = [r["kv_applied_json"] for r in rows(conn, "SELECT kv_applied_json FROM responses")]
    assert any(a and "snapkv" in a for a in applied), applied
    assert rows(conn, "SELECT COUNT(*) n FROM matrix_engines")[0]["n"] >= 2   # loaded on both nodes
    conn.close()
    # the reference: the same matrix, never interrupted, on the local backend
    rcfg, rpaths, rcpath = setup(tmp_path / "ref", 18490)
    ref = MatrixRunner(rcfg, expand(rcfg, smoke), inventory(slots=1),
                       cwd=tmp_path / "ref").run()
    assert ref.ok, [(o.cell.label, o.reason) for o in ref.outcomes]
    _score_analyze(cpath)
    _score_analyze(rcpath)
    got, want = _bins(paths.db), _bins(rpaths.db)
    assert got and got == want


def test_no_cluster_at_the_address_is_one_line_exit_2(experiment) -> None:
    pytest.importorskip("ray")
    cpath, mpath, cfg, paths = experiment(2, TWO)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kv_transition", "matrix", "run", "-c", str(cpath), "-m", str(mpath),
                        "--backend", "ray", "--ray-address", "127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("kvt: error")]
    assert len(err) == 1 and "127.0.0.1:9" in err[0] and "ray start --head" in err[0]
    assert time.monotonic() - t0 < 60
    conn = connect(paths.db)
    assert rows(conn, "SELECT COUNT(*) n FROM matrix_runs")[0]["n"] == 0   # nothing written
    conn.close()


def test_a_request_no_node_can_hold_is_refused_before_anything_starts() -> None:
    from types import SimpleNamespace

    from kv_transition.errors import ConfigError
    from kv_transition.matrix.ray_backend import check_feasible

    g = SimpleNamespace(group_id="vllm.llama-x", tp=8,
                        cells=[SimpleNamespace(runtime="docker", spec=SimpleNamespace(needs_gpu=True))])
    exp = SimpleNamespace(groups=[g])
    nodes = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}]   # 8 GPUs in all, but never 8 on one node
    with pytest.raises(ConfigError, match=r"vllm.llama-x: asks Ray for GPU=8 CPU=1 but no node"):
        check_feasible(exp, nodes, None)  # type: ignore[arg-type]
    check_feasible(exp, nodes + [{"CPU": 64.0, "GPU": 8.0}], None)  # type: ignore[arg-type]
    cpu = SimpleNamespace(group_id="kvpress.tiny", tp=1,
                          cells=[SimpleNamespace(runtime="process", spec=SimpleNamespace(needs_gpu=False))])
    with pytest.raises(ConfigError, match="kvt_slot=1"):
        check_feasible(SimpleNamespace(groups=[cpu]), nodes, "kvt_slot")  # type: ignore[arg-type]


@pytest.mark.docker
def test_a_docker_group_runs_on_a_ray_node_and_leaves_no_container(experiment, engines_dir: Path,
                                                                   ray_cluster: LocalCluster) -> None:
    """The group's runtime on the node is the docker runtime too: the node's actor starts the container (host
    network, loopback), sends the cell's requests from the node, and the container is gone afterwards."""
    from tests.matrix.test_lock import DOCKER_ENGINE

    from kv_transition.runtime.docker import docker_client

    try:
        client = docker_client(timeout_s=60)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no Docker daemon: {e}")
    from tests.fakes.docker_image import ensure_test_image

    ensure_test_image(client)
    (engines_dir / "fakedock").mkdir()
    (engines_dir / "fakedock" / "engine.yaml").write_text(DOCKER_ENGINE)
    mx = {"name": "rdock", "engines": {"fakedock": {"runtime": "docker", "compression_ratios": [0.5],
                                                    "methods": ["full", "snapkv"]}}}
    cpath, mpath, cfg, paths = experiment(4, mx)
    s = _runner(cpath, mpath, ray_cluster.address).run()
    assert s.ok, [(o.cell.label, o.reason) for o in s.outcomes]
    conn = connect(paths.db)
    assert _exactly_once(conn) == (8, 8)
    loads = rows(conn, "SELECT * FROM matrix_engines")
    assert len(loads) == 1 and loads[0]["runtime"] == "docker"
    runs = rows(conn, "SELECT pid FROM runs")
    assert runs and os.getpid() not in {r["pid"] for r in runs}   # sent from the node's actor, not the driver
    conn.close()
    left = client.containers.list(all=True, filters={"label": f"kv-transition.group={cfg.experiment.group_id}"})
    assert left == []
