"""Docker pytest fixtures (import them into a conftest: `from tests.fakes.docker_fixtures import *`): a reachable daemon (skip with the reason, or fail when KVT_REQUIRE_DOCKER=1),
the test image (kvt-test-engine:latest, built without a registry), a per-test label group that is
always cleaned up, and `fake_container` — start the fake engine in a container (also for runner tests:
"container killed mid-cell → re-run completes exactly the missing requests")."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest

REQUIRED = os.environ.get("KVT_REQUIRE_DOCKER") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"KVT_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


_NO_DAEMON: list[str] = []  # the reason, once: a skip in a session fixture is re-raised per test


@pytest.fixture(scope="session")
def docker_client() -> Any:
    from kv_transition.runtime.docker import DockerUnavailableError, docker_client as connect

    if _NO_DAEMON:
        _unavailable(_NO_DAEMON[0])
    try:
        return connect(timeout_s=120)
    except DockerUnavailableError as e:
        _NO_DAEMON.append(f"no Docker daemon: {e}")
        _unavailable(_NO_DAEMON[0])


@pytest.fixture(scope="session")
def test_image(docker_client: Any) -> Any:
    from tests.fakes.docker_image import ensure_test_image

    try:
        return ensure_test_image(docker_client)
    except Exception as e:  # noqa: BLE001 - no debootstrap/mirror: say why
        _unavailable(f"cannot build the test image kvt-test-engine:latest: {type(e).__name__}: {e}")


@pytest.fixture
def group(docker_client: Any) -> Iterator[str]:
    """A unique kv-transition.group label; every container with it is removed after the test."""
    from kv_transition.runtime.docker import cleanup_containers

    g = f"kvt-test-{uuid.uuid4().hex[:8]}"
    yield g
    cleanup_containers(group=g, client=docker_client)


@pytest.fixture
def fake_container(docker_client: Any, test_image: Any, group: str, tmp_path: Path) -> Callable[..., Any]:
    """start(fault=(), cell="c", log_path=None, **spec_overrides) → (runtime, inst), healthy.
    Stopped at teardown. `inst.handle["container"].kill()` kills it mid-cell; `runtime.is_running(inst)`."""
    from kv_transition.runtime.docker import DockerRuntime
    from tests.fakes.fake_engine import fake_spec

    started: list[tuple[Any, Any]] = []

    def start(fault: Sequence[str] = (), cell: str = "c", log_path: Optional[Path] = None, **overrides: Any):
        rt = DockerRuntime(client=docker_client, pull=False, stop_timeout_s=5)
        spec = fake_spec("docker", fault, **overrides)
        inst = rt.start(spec, {"group": group, "cell": cell}, log_path or tmp_path / f"{cell}.log")
        started.append((rt, inst))
        rt.wait_ready(inst)
        return rt, inst

    yield start
    for rt, inst in started:
        rt.stop(inst)


__all__ = ["REQUIRED", "docker_client", "test_image", "group", "fake_container"]
