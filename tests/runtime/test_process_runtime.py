"""Process/external runtimes, signals and cleanup — with the fake server as the engine (no Docker)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from kv_transition.runtime import EngineStartError, get_runtime
from kv_transition.runtime.base import CELL_LABEL, GROUP_LABEL, OWNER_LABEL
from kv_transition.runtime.process import ProcessRegistry, ProcessRuntime, cleanup_processes
from kv_transition.runtime.signals import deferred_signals, stop_on_signals
from tests.fakes.fake_engine import fake_spec, serve_in_thread, spawn_child, spawn_child_nowait, wait_for_text


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def rt(registry: Path) -> ProcessRuntime:
    r = ProcessRuntime(registry_dir=registry, stop_timeout_s=5)
    yield r
    r.stop_all()


def test_argv_replaces_python_with_this_interpreter():
    spec = fake_spec("process")
    argv = ProcessRuntime.argv(spec)
    assert argv[0] == sys.executable and argv[1:3] == ["-u", spec.command[2]] and argv[-2:] == ["--port", str(spec.port)]


def test_start_health_request_stop(rt: ProcessRuntime, registry: Path, tmp_path: Path):
    log = tmp_path / "logs" / "cell.log"
    spec = fake_spec("process", env={"KVT_TEST_MARK": "x1"})
    with rt.running(spec, {"group": "g1", "cell": "c1"}, log) as inst:
        assert inst.ready_at and inst.pids == [int(inst.ident)]
        r = httpx.post(inst.base_url + "/v1/completions", json={"prompt": "a b", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "The quick brown"
        assert rt.is_running(inst)
        (entry,) = ProcessRegistry(registry).entries()
        assert entry.pid == inst.pids[0] and entry.labels[GROUP_LABEL] == "g1" and entry.labels[CELL_LABEL] == "c1"
        assert entry.labels[OWNER_LABEL] == "kv-transition"
        env = psutil.Process(inst.pids[0]).environ()
        assert env["KVT_TEST_MARK"] == "x1" and os.getpgid(inst.pids[0]) == inst.pids[0]  # own group
    assert inst.stopped_at and inst.exit_code == 0 and _gone(inst.pids[0])
    assert not rt.is_running(inst)
    assert ProcessRegistry(registry).entries() == []
    text = log.read_text()
    assert "listening on" in text and "POST /v1/completions" in text and "shutting down" in text
    rt.stop(inst)  # idempotent


def test_exit_during_startup_raises_with_code_and_log_tail(rt: ProcessRuntime, registry: Path, tmp_path: Path):
    spec = fake_spec("process", ["--exit-during-startup", "3", "--startup-delay", "0.3"], readiness_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(EngineStartError) as ei:
        with rt.running(spec, {"group": "g", "cell": "c"}, tmp_path / "c.log"):
            pytest.fail("must not become ready")
    assert time.monotonic() - t0 < 10, "an exited engine must end the health wait at once"
    e = ei.value
    assert e.returncode == 3 and "exited with code 3" in str(e)
    assert "injected startup failure" in e.log_tail and "loading fake weights" in e.log_tail
    assert ProcessRegistry(registry).entries() == []


def test_readiness_timeout_stops_the_engine(rt: ProcessRuntime, tmp_path: Path):
    spec = fake_spec("process", ["--unhealthy-for", "60"], readiness_timeout_s=1.0)
    inst = rt.start(spec, {"group": "g"}, tmp_path / "c.log")
    with pytest.raises(EngineStartError, match=r"not healthy after 1s .*HTTP 503"):
        rt.wait_ready(inst)
    rt.stop(inst)
    assert _gone(inst.pids[0])


def test_stop_kills_the_whole_process_group(rt: ProcessRuntime, tmp_path: Path):
    spec = fake_spec("process", ["--spawn-child"])
    with rt.running(spec, {}, tmp_path / "c.log") as inst:
        kids = [c.pid for c in psutil.Process(inst.pids[0]).children(recursive=True)]
        assert kids, "the fake should have spawned a child"
    assert _wait_gone([inst.pids[0], *kids], 5)


def test_sigterm_ignored_escalates_to_sigkill(registry: Path, tmp_path: Path):
    rt = ProcessRuntime(registry_dir=registry, stop_timeout_s=0.5)
    t0 = time.monotonic()
    with rt.running(fake_spec("process", ["--ignore-sigterm"]), {}, tmp_path / "c.log") as inst:
        pass
    assert inst.exit_code == -signal.SIGKILL and time.monotonic() - t0 < 8 and _gone(inst.pids[0])


def test_port_in_use_is_refused(rt: ProcessRuntime, tmp_path: Path):
    url, srv, _ = serve_in_thread()
    try:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(EngineStartError, match="port already in use"):
            rt.start(fake_spec("process", port=port), {}, tmp_path / "c.log")
    finally:
        srv.shutdown()


@pytest.mark.parametrize("sig,rcs", [(signal.SIGINT, (-signal.SIGINT, 130)), (signal.SIGTERM, (143,))])
def test_signal_to_harness_leaves_no_engine(sig: int, rcs: tuple[int, ...], registry: Path, tmp_path: Path):
    p, ident = spawn_child("process", "sig", tmp_path / "c.log", registry, ["--spawn-child"])
    pid = int(ident)
    kids = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    p.send_signal(sig)
    p.communicate(timeout=20)
    assert p.returncode in rcs
    assert _wait_gone([pid, *kids], 5)
    assert ProcessRegistry(registry).entries() == []


def test_sigint_during_health_wait_leaves_no_engine(registry: Path, tmp_path: Path):
    log = tmp_path / "c.log"
    p = spawn_child_nowait("process", "sigwait", log, registry, ["--unhealthy-for", "60"])
    try:
        assert wait_for_text(log, "listening on"), "the engine never started"
        (entry,) = ProcessRegistry(registry).entries()
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode in (-signal.SIGINT, 130)
    assert _wait_gone([entry.pid], 5) and ProcessRegistry(registry).entries() == []


def test_cleanup_kills_leftovers_of_a_sigkilled_harness(registry: Path, tmp_path: Path, capsys):
    p, ident = spawn_child("process", "leftover", tmp_path / "c.log", registry, ["--spawn-child"])
    pid = int(ident)
    p.kill()
    p.wait(timeout=10)
    time.sleep(0.2)
    assert not _gone(pid), "the engine survives its harness (own session)"
    kids = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    assert cleanup_processes(group="other-group", registry_dir=registry) == []
    assert cleanup_processes(registry_dir=registry, dry_run=True)[0]["action"] == "would kill"

    from kv_transition.cli import main

    assert main(["cleanup", "--runtime", "process", "--registry", str(registry), "--group", "leftover"]) == 0
    out = capsys.readouterr().out
    assert f"process group {pid}" in out and "killed" in out
    assert _wait_gone([pid, *kids], 5)
    assert ProcessRegistry(registry).entries() == []
    assert cleanup_processes(registry_dir=registry) == []


def test_cleanup_leaves_engines_of_a_running_harness_unless_forced(registry: Path, tmp_path: Path):
    p, ident = spawn_child("process", "live", tmp_path / "c.log", registry)
    try:
        (row,) = cleanup_processes(registry_dir=registry)
        assert row["action"].startswith("skipped (its harness") and not _gone(int(ident))
        (row,) = cleanup_processes(registry_dir=registry, force=True)
        assert row["action"] == "killed" and _wait_gone([int(ident)], 5)
    finally:
        p.kill()
        p.wait(timeout=10)


def test_cleanup_drops_stale_entries(registry: Path, tmp_path: Path):
    rt = ProcessRuntime(registry_dir=registry)
    inst = rt.start(fake_spec("process"), {"group": "g"}, tmp_path / "c.log")
    pid = inst.pids[0]
    os.killpg(pid, signal.SIGKILL)
    inst.handle["proc"].wait(timeout=5)
    (row,) = cleanup_processes(registry_dir=registry)
    assert row["action"] == "gone" and ProcessRegistry(registry).entries() == []
    rt.stop(inst)


# ---- external runtime

def test_external_runtime_healthy_and_noop_stop():
    url, srv, _ = serve_in_thread()
    try:
        rt = get_runtime("external", base_url=url + "/")
        with rt.running(fake_spec("process"), {}) as inst:
            assert inst.base_url == url and rt.is_running(inst)
            assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "fake-model"
        assert inst.stopped_at and httpx.get(url + "/health").status_code == 200  # not ours to stop
    finally:
        srv.shutdown()


def test_external_runtime_unreachable_is_a_clear_error():
    from tests.fakes.fake_engine import free_port

    rt = get_runtime("external", base_url=f"http://127.0.0.1:{free_port()}", health_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match=r"engine.base_url http://127.0.0.1:\d+: not reachable"):
        with rt.running(fake_spec("process"), {}):
            pass
    assert time.monotonic() - t0 < 5


# ---- signals

def test_stop_on_signals_calls_back_then_raises_and_restores():
    calls = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ei:
        with stop_on_signals(lambda: calls.append("stopped")):
            signal.raise_signal(signal.SIGTERM)
    assert ei.value.code == 143 and calls == ["stopped"]
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signals(lambda: calls.append("again")):
            signal.raise_signal(signal.SIGINT)
    assert calls == ["stopped", "again"]


def test_deferred_signals_deliver_at_the_end_of_the_critical_section():
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signals(lambda: seen.append("cb")):
            with deferred_signals():
                signal.raise_signal(signal.SIGINT)
                seen.append("critical section finished")
    assert seen == ["critical section finished", "cb"]


def test_stop_on_signals_is_a_noop_off_the_main_thread():
    out = []

    def body():
        with stop_on_signals(lambda: None):
            out.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out == [signal.getsignal(signal.SIGINT)]


# ---- docker pieces that need no daemon

def test_docker_unreachable_is_a_one_line_error(monkeypatch, tmp_path: Path, capsys):
    from kv_transition.cli import main
    from kv_transition.runtime.docker import DockerRuntime, DockerUnavailableError

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(DockerUnavailableError) as ei:
        DockerRuntime().start(fake_spec("docker"), {}, None)
    assert "cannot reach the Docker daemon" in str(ei.value) and "\n" not in str(ei.value)
    assert main(["cleanup", "--runtime", "docker"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvt: error: docker: cannot reach") and err.count("\n") == 1
    assert main(["cleanup", "--registry", str(tmp_path / "reg")]) == 0  # all: docker is only a note
    cap = capsys.readouterr()
    assert "kvt: note: docker: cannot reach" in cap.err and "nothing to clean up" in cap.out


def test_docker_create_kwargs_gpus_ipc_shm_env_labels():
    from kv_transition.runtime.base import full_labels
    from kv_transition.runtime.docker import DockerRuntime

    rt = DockerRuntime(client=object())
    lbl = full_labels({"group": "g", "cell": "c", "org.example/x": "1", "kv-transition.extra": "y"})
    from kv_transition.runtime.base import HARNESS_LABEL

    assert lbl.pop(HARNESS_LABEL).split(":")[1] == str(os.getpid())
    assert lbl == {OWNER_LABEL: "kv-transition", GROUP_LABEL: "g", CELL_LABEL: "c",
                   "org.example/x": "1", "kv-transition.extra": "y"}
    spec = fake_spec("docker", gpu=True, gpus=[0, 3], ipc_mode="host", shm_size="8g",
                     command=["vllm", "serve"], env={"HF_TOKEN": "secret"})
    kw = rt.create_kwargs(spec, lbl)
    (dr,) = kw["device_requests"]
    assert dr["DeviceIDs"] == ["0", "3"] and dr["Capabilities"] == [["gpu"]]
    assert kw["ipc_mode"] == "host" and "shm_size" not in kw and kw["network_mode"] == "host"
    assert kw["entrypoint"] == ["vllm", "serve"] and kw["command"] == spec.args
    assert kw["environment"] == {"HF_TOKEN": "secret"} and kw["labels"] is lbl
    kw = rt.create_kwargs(fake_spec("docker", ipc_mode=None, shm_size="2g"), lbl)
    assert kw["shm_size"] == "2g" and "ipc_mode" not in kw and "device_requests" not in kw
    assert "entrypoint" not in kw  # the image's own entrypoint


def test_process_gets_cuda_visible_devices_for_its_gpus(rt: ProcessRuntime, tmp_path: Path):
    with rt.running(fake_spec("process", gpu=True, gpus=[2, 5]), {}, tmp_path / "c.log") as inst:
        assert psutil.Process(inst.pids[0]).environ()["CUDA_VISIBLE_DEVICES"] == "2,5"


def test_docker_pull_reports_progress_and_records_the_repo_digest():
    """The pull path with a stub SDK client (there is no registry here): progress sums the layers,
    and the digest recorded is the RepoDigest of the pulled repository."""
    from docker.errors import ImageNotFound

    from kv_transition.runtime.docker import DockerRuntime, _digest_of

    class Img:
        id = "sha256:imageid"
        attrs = {"RepoDigests": ["other/repo@sha256:zzz", "example/engine@sha256:abc"]}

    class Images:
        pulled = False

        def get(self, ref):
            if not self.pulled:
                raise ImageNotFound(ref)
            return Img()

    class Api:
        def __init__(self, images):
            self.images = images

        def pull(self, repo, tag, stream, decode):
            assert (repo, tag, stream, decode) == ("example/engine", "v1", True, True)
            yield {"status": "Pulling from example/engine", "id": "v1"}
            yield {"status": "Downloading", "id": "l1", "progressDetail": {"current": 5, "total": 10}}
            yield {"status": "Downloading", "id": "l2", "progressDetail": {"current": 1, "total": 30}}
            yield {"status": "Downloading", "id": "l1", "progressDetail": {"current": 10, "total": 10}}
            self.images.pulled = True
            yield {"status": "Status: Downloaded newer image for example/engine:v1"}

    class Client:
        images = Images()
        api = Api(images)

    seen = []
    rt = DockerRuntime(client=Client(), progress=lambda status, done, total: seen.append((done, total)))
    img = rt.ensure_image(fake_spec("docker", image="example/engine", tag="v1"))
    assert seen[-1] == (11, 40) and (6, 40) in seen
    assert _digest_of(img, "example/engine") == "example/engine@sha256:abc"
    Img.attrs = {"RepoDigests": []}
    assert _digest_of(Img(), "example/engine") == "sha256:imageid"


def test_docker_build_context_is_repo_or_engine_relative(tmp_path: Path, monkeypatch):
    from kv_transition.runtime.docker import build_context

    (tmp_path / "engines" / "e1" / "docker").mkdir(parents=True)
    monkeypatch.setenv("KVT_ENGINES_DIR", str(tmp_path / "engines"))
    assert build_context(fake_spec("docker", engine="e1", build={"context": "engines/e1"})) == tmp_path / "engines" / "e1"
    assert build_context(fake_spec("docker", engine="e1", build={"context": "docker"})) == tmp_path / "engines" / "e1" / "docker"
    assert build_context(fake_spec("docker", engine="e1", build={"context": "/abs/x"})) == Path("/abs/x")
