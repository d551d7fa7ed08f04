"""DockerRuntime against a real daemon and the locally built test image (kvt-test-engine:latest, the
fake OpenAI server). Skipped with the reason when no daemon is reachable; mandatory with
KVT_REQUIRE_DOCKER=1 (CI)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kv_transition.runtime import EngineStartError
from kv_transition.runtime.base import CELL_LABEL, GROUP_LABEL, OWNER_LABEL
from kv_transition.runtime.docker import DockerRuntime, ImageUnavailableError, cleanup_containers
from tests.fakes.fake_engine import fake_spec, spawn_child, spawn_child_nowait, wait_for_text

pytestmark = pytest.mark.docker


def _ours(client: Any, group: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": [f"{OWNER_LABEL}=kv-transition", f"{GROUP_LABEL}={group}"]})


def _gone(client: Any, cid: str) -> bool:
    from docker.errors import NotFound

    try:
        client.containers.get(cid)
        return False
    except NotFound:
        return True


def test_healthy_path_end_to_end(docker_client, test_image, group: str, tmp_path: Path):
    rt = DockerRuntime(client=docker_client, pull=False, stop_timeout_s=5)
    log = tmp_path / "logs" / "cell-1.log"
    spec = fake_spec("docker", env={"HF_TOKEN": "hf_secret_for_test"}, shm_size="96m")
    with rt.running(spec, {"group": group, "cell": "cell-1", "extra": "x"}, log) as inst:
        c = inst.handle["container"]
        assert inst.ready_at and inst.image_digest == test_image.id  # local image: no RepoDigests → image id
        assert c.labels[OWNER_LABEL] == "kv-transition" and c.labels[GROUP_LABEL] == group
        assert c.labels[CELL_LABEL] == "cell-1" and c.labels["kv-transition.extra"] == "x"
        hc = c.attrs["HostConfig"]
        assert hc["NetworkMode"] == "host" and hc["ShmSize"] == 96 * 2**20 and hc["Init"] is True
        assert "HF_TOKEN=hf_secret_for_test" in c.attrs["Config"]["Env"]
        assert [x.id for x in _ours(docker_client, group)] == [c.id] and rt.is_running(inst)
        assert inst.pids and inst.pids[0] > 0  # host pid of the container's init, for psutil
        r = httpx.post(inst.base_url + "/v1/completions", json={"prompt": "one two", "max_tokens": 4,
                                                                 "kv_press": {"method": "snapkv"}})
        body = r.json()
        assert r.status_code == 200 and body["choices"][0]["text"] == "The quick brown fox"
        assert body["usage"]["prompt_tokens"] == 2 and body["kvt_fake"]["extras"] == {"kv_press": {"method": "snapkv"}}
        with httpx.stream("POST", inst.base_url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                "stream_options": {"include_usage": True}}) as s:
            events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 10
        metrics = httpx.get(inst.base_url + "/metrics").text
        assert "vllm:kv_cache_usage_perc" in metrics
    assert inst.stopped_at and inst.exit_code == 0 and not rt.is_running(inst)
    assert _gone(docker_client, inst.ident) and _ours(docker_client, group) == []
    text = log.read_text()
    assert "TEST DOUBLE starting" in text and "POST /v1/completions" in text and "shutting down" in text
    assert "hf_secret_for_test" not in repr(inst.spec.masked_env())


def test_exit_during_health_wait_fails_fast_with_code_and_log_tail(docker_client, test_image, group, tmp_path):
    rt = DockerRuntime(client=docker_client, pull=False)
    spec = fake_spec("docker", ["--exit-during-startup", "3", "--startup-delay", "0.5"], readiness_timeout_s=120)
    t0 = time.monotonic()
    with pytest.raises(EngineStartError) as ei:
        with rt.running(spec, {"group": group, "cell": "dies"}, tmp_path / "dies.log"):
            pytest.fail("must not become ready")
    assert time.monotonic() - t0 < 15, "no hang until the readiness timeout"
    e = ei.value
    assert e.returncode == 3 and "exited with code 3" in str(e)
    assert "injected startup failure" in e.log_tail and "loading fake weights shard 3/3" in e.log_tail
    assert _ours(docker_client, group) == []


def test_log_tail_without_a_log_file_comes_from_docker(docker_client, test_image, group):
    rt = DockerRuntime(client=docker_client, pull=False)
    with pytest.raises(EngineStartError) as ei:
        with rt.running(fake_spec("docker", ["--exit-during-startup", "5"]), {"group": group}, None):
            pass
    assert ei.value.returncode == 5 and "injected startup failure" in ei.value.log_tail


def test_readiness_timeout_removes_the_container(docker_client, test_image, group, tmp_path):
    rt = DockerRuntime(client=docker_client, pull=False, stop_timeout_s=2)
    spec = fake_spec("docker", ["--unhealthy-for", "120"], readiness_timeout_s=1.5)
    with pytest.raises(EngineStartError, match=r"not healthy after 1.5s .*HTTP 503"):
        with rt.running(spec, {"group": group}, tmp_path / "slow.log"):
            pass
    assert _ours(docker_client, group) == []


def test_container_dying_mid_cell_is_seen(fake_container, docker_client):
    rt, inst = fake_container(["--crash-after", "2", "--crash-code", "17"])
    for _ in range(2):
        assert httpx.post(inst.base_url + "/v1/completions", json={"prompt": "x"}).status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.post(inst.base_url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    deadline = time.monotonic() + 10
    while rt.is_running(inst) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not rt.is_running(inst) and inst.exit_code == 17
    rt.stop(inst)
    assert _gone(docker_client, inst.ident)


def test_killed_container_then_stop_is_clean(fake_container, docker_client):
    rt, inst = fake_container()
    inst.handle["container"].kill()
    deadline = time.monotonic() + 10
    while rt.is_running(inst) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not rt.is_running(inst)
    rt.stop(inst)
    rt.stop(inst)  # idempotent
    assert _gone(docker_client, inst.ident)


@pytest.mark.parametrize("sig,rcs", [(signal.SIGINT, (-signal.SIGINT, 130)), (signal.SIGTERM, (143,))],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_to_harness_leaves_no_container(sig, rcs, docker_client, test_image, group, tmp_path):
    p, cid = spawn_child("docker", group, tmp_path / "child.log")
    assert [c.id for c in _ours(docker_client, group)] == [cid]
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode in rcs, err
    assert _ours(docker_client, group) == [] and _gone(docker_client, cid)
    assert "shutting down" in (tmp_path / "child.log").read_text()


def test_sigint_during_health_wait_leaves_no_container(docker_client, test_image, group, tmp_path):
    log = tmp_path / "child.log"
    p = spawn_child_nowait("docker", group, log, fault=["--unhealthy-for", "60"])
    try:
        assert wait_for_text(log, "listening on"), "the container never started"
        assert len(_ours(docker_client, group)) == 1
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode in (-signal.SIGINT, 130)
    assert _ours(docker_client, group) == []


def test_cleanup_removes_leftovers_of_a_sigkilled_harness(docker_client, test_image, group, tmp_path, capsys):
    from kv_transition.cli import main

    p, cid = spawn_child("docker", group, tmp_path / "child.log")
    p.kill()
    p.wait(timeout=10)
    assert [c.id for c in _ours(docker_client, group)] == [cid], "SIGKILL leaves the container behind"
    assert cleanup_containers(group=group + "-other", client=docker_client) == []
    (row,) = cleanup_containers(group=group, client=docker_client, dry_run=True)
    assert row["action"] == "would remove" and row["cell"] == "child"
    assert main(["cleanup", "--runtime", "docker", "--group", group]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and group in out and "cell=child" in out
    assert _ours(docker_client, group) == [] and _gone(docker_client, cid)


def test_missing_image_that_cannot_be_pulled(docker_client, group):
    # a registry on a closed loopback port: the pull fails at once, without leaving this machine
    rt = DockerRuntime(client=docker_client, progress=lambda *a: None)
    spec = fake_spec("docker", image="127.0.0.1:9/kvt-missing/engine", tag="v0")
    t0 = time.monotonic()
    with pytest.raises(ImageUnavailableError, match=r"image 127.0.0.1:9/kvt-missing/engine:v0: not present locally "
                                                    r"and the pull failed"):
        rt.start(spec, {"group": group}, None)
    assert time.monotonic() - t0 < 30 and _ours(docker_client, group) == []
    with pytest.raises(ImageUnavailableError, match="pulling is disabled"):
        DockerRuntime(client=docker_client, pull=False).start(spec, {"group": group}, None)


def test_missing_image_with_a_build_section_is_built(docker_client, test_image, group, tmp_path):
    import uuid

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("ARG FROM_IMAGE\nFROM ${FROM_IMAGE}\nLABEL kvt.test=built\n")
    tag = f"t{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    rt = DockerRuntime(client=docker_client, progress=lambda status, done, total: lines.append(status))
    spec = fake_spec("docker", image="kvt-test-built", tag=tag,
                     build={"context": str(ctx), "dockerfile": "Dockerfile", "args": {"FROM_IMAGE": "kvt-test-engine:latest"}})
    try:
        with rt.running(spec, {"group": group}, tmp_path / "b.log") as inst:
            assert httpx.get(inst.base_url + "/v1/models").status_code == 200
        img = docker_client.images.get(f"kvt-test-built:{tag}")
        assert img.labels["kvt.test"] == "built" and inst.image_digest == img.id
        assert any("FROM" in ln for ln in lines)
        bad = fake_spec("docker", image="kvt-test-built", tag=tag + "x", build={"context": str(ctx), "args": {}})
        with pytest.raises(ImageUnavailableError, match="the build from .* failed"):
            rt.start(bad, {"group": group}, None)
    finally:
        for t in (tag, tag + "x"):
            try:
                docker_client.images.remove(f"kvt-test-built:{t}", force=True)
            except Exception:
                pass
