"""Fixtures for the kvpress engine tests: one real server per session on the tiny model (CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE_DIR = REPO / "engines" / "kvpress"
READY_TIMEOUT_S = float(os.environ.get("KVT_ENGINE_READY_TIMEOUT", "240"))

# the pure modules (no torch) are importable without installing the engine package
if str(ENGINE_DIR) not in sys.path:
    sys.path.insert(0, str(ENGINE_DIR))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _engine_preexec() -> None:
    # its own process group (we end exactly what we started), and on Linux a SIGTERM when pytest dies,
    # so a killed test run (timeout, Ctrl-C twice) leaves no server behind
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def start_engine(args: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "kvpress_engine", "--host", "127.0.0.1", *args],
        env=engine_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_engine_preexec,
    )


def wait_healthy(proc: subprocess.Popen, base_url: str, log_path: Path) -> None:
    """Until the engine started with start_engine answers /health 200 (fails with its log tail if it exits or
    takes longer than READY_TIMEOUT_S)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def stop_engine(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    health_codes_seen: list[int] = field(default_factory=list)
    early_completion: httpx.Response | None = None  # a completion posted while loading

    @property
    def api(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    port = free_port()
    log_path = tmp_path_factory.mktemp("engine") / "engine.log"
    # one torch thread: on a shared 2-core runner, 2 OpenMP threads competing with other processes make
    # every forward pass ~10x slower; one thread is also plenty for a 135M model
    proc = start_engine(["--port", str(port), "--default-max-tokens", "16", "--threads", "1"], log_path)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        with httpx.Client(timeout=5) as c:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"engine exited with {proc.returncode} while starting:\n{srv.log()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"engine not ready after {READY_TIMEOUT_S} s:\n{srv.log()[-3000:]}")
                try:
                    r = c.get(srv.base_url + "/health")
                except httpx.TransportError:
                    time.sleep(0.1)
                    continue
                srv.health_codes_seen.append(r.status_code)
                if r.status_code == 200:
                    break
                if srv.early_completion is None:
                    srv.early_completion = c.post(srv.api + "/completions", json={"prompt": "hi", "max_tokens": 1})
                time.sleep(0.1)
        yield srv
    finally:
        stop_engine(proc)
