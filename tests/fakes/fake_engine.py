"""Helpers around the TEST DOUBLE server (fake_openai_server.py) for runtime and runner tests.

    from tests.fakes.fake_engine import fake_spec, free_port   # repo root on sys.path (pytest does it)
    spec = fake_spec(runtime="process", fault=["--crash-after", "3"])
    spec = fake_spec(runtime="docker", fault=[...])     # image kvt-test-engine:latest (see docker_image.py)

Or without a runtime, in-process: `serve_in_thread(["--fail-first", "2"])` → (base_url, server, thread)
(startup and crash knobs act only when the fake runs as its own process: --crash-after would exit pytest).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

FAKES_DIR = Path(__file__).resolve().parent
FAKE_SERVER = FAKES_DIR / "fake_openai_server.py"
TEST_IMAGE = "kvt-test-engine"
TEST_TAG = "latest"
SERVER_IN_IMAGE = "/opt/kvt/fake_openai_server.py"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_spec(runtime: str = "process", fault: Sequence[str] = (), *, port: Optional[int] = None,
              readiness_timeout_s: float = 20.0, env: Optional[dict[str, str]] = None, **overrides: Any):
    """A ResolvedSpec that starts the fake server (as a local process, or from the test image)."""
    from kv_transition.engines.spec import ResolvedSpec

    port = port or free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), *fault]
    if runtime == "docker":
        command: list[str] = []  # the image's entrypoint: python3 -u /opt/kvt/fake_openai_server.py
    else:
        command = ["python", "-u", str(FAKE_SERVER)]
    fields: dict[str, Any] = dict(
        engine="fake", method="full", compression_ratio=None, budget=None, method_mode="server",
        image=TEST_IMAGE, tag=TEST_TAG, digest=None, command=command, args=args, env=dict(env or {}),
        gpus=[], host="127.0.0.1", port=port, ipc_mode=None, shm_size="64m", health_path="/health",
        readiness_timeout_s=readiness_timeout_s, health_interval_s=0.1, models_path="/v1/models",
        metrics_path="/metrics", kv_usage_metrics=["vllm:kv_cache_usage_perc"], concurrency=4,
        request_extras={}, served_model="fake-model", build=None, gpu=False, send_add_special_tokens=True,
    )
    fields.update(overrides)
    return ResolvedSpec(**fields)


def serve_in_thread(fault: Sequence[str] = (), port: int = 0):
    """Run the fake in this process (no fork): returns (base_url, server, thread); call server.shutdown()."""
    from tests.fakes import fake_openai_server as f

    opts = f.parse_args(["--port", str(port), *fault])
    srv = f.make_server(opts)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.server_address[1]}", srv, t


def spawn_child(runtime: str, group: str, log_path: Path, registry: Optional[Path] = None,
                fault: Sequence[str] = (), timeout_s: float = 30.0):
    """Start `python -m tests.fakes.run_engine_child` (a harness holding one fake engine in `running()`);
    return (popen, ident) once it printed READY. The caller signals/kills it."""
    import time

    p = spawn_child_nowait(runtime, group, log_path, registry, fault)
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if line.startswith("READY") or p.poll() is not None:
            break
    if not line.startswith("READY"):
        p.kill()
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"child harness never became ready (rc={p.returncode}): {line}{out}\n{err}")
    return p, line.split()[1]


def spawn_child_nowait(runtime: str, group: str, log_path: Path, registry: Optional[Path] = None,
                       fault: Sequence[str] = ()):
    """Like spawn_child, but returns at once (for signals during startup/health wait)."""
    import os
    import subprocess
    import sys

    repo = FAKES_DIR.parents[1]
    argv = [sys.executable, "-m", "tests.fakes.run_engine_child", runtime, group, str(log_path)]
    if registry is not None:
        argv.append(str(registry))
    if fault:
        argv += ["--", *fault]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_text(path: Path, text: str, timeout_s: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False
