"""`process` runtime: a local engine process in its own process group (the kvpress engine on CPU).

argv = spec.command (a leading python/python3 becomes sys.executable) + spec.args; env = os.environ +
CUDA_VISIBLE_DEVICES=spec.gpus (when spec.gpu) + spec.env (+ KVT_ENGINE_OWNER); stdout+stderr → the log file. Stop = SIGTERM to the whole group,
SIGKILL after the timeout. Every started engine is written to a small pidfile registry
(`ProcessRegistry`, default `$KVT_STATE_DIR/processes` or `~/.local/state/kv-transition/processes`) so
`kvt cleanup` can kill what a SIGKILL'd harness left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import psutil

from kv_transition.engines.spec import ResolvedSpec
from kv_transition.errors import KvtError
from kv_transition.runtime.base import (
    CELL_LABEL,
    GROUP_LABEL,
    HARNESS_LABEL,
    EngineStartError,
    Instance,
    Runtime,
    full_labels,
    harness_alive,
    now_iso,
)
from kv_transition.runtime.health import port_in_use, wait_healthy
from kv_transition.runtime.signals import deferred_signals


def default_registry_dir() -> Path:
    base = os.environ.get("KVT_STATE_DIR")
    if base:
        return Path(base) / "processes"
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "kv-transition" / "processes"


@dataclass
class RegistryEntry:
    pid: int
    pgid: int
    create_time: float
    argv: list[str]
    labels: dict[str, str]
    base_url: str
    log_path: Optional[str]
    harness_pid: int
    started_at: str
    path: Optional[Path] = None

    @property
    def group(self) -> Optional[str]:
        return self.labels.get(GROUP_LABEL)

    @property
    def cell(self) -> Optional[str]:
        return self.labels.get(CELL_LABEL)


class ProcessRegistry:
    """One JSON file per live engine process: `<dir>/<pid>.json`."""

    def __init__(self, directory: Optional[Path | str] = None):
        self.dir = Path(directory) if directory else default_registry_dir()

    def add(self, proc: subprocess.Popen, argv: list[str], labels: dict[str, str], base_url: str,
            log_path: Optional[Path]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            ct = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            ct = 0.0
        data = {"pid": proc.pid, "pgid": proc.pid, "create_time": ct, "argv": argv, "labels": labels,
                "base_url": base_url, "log_path": str(log_path) if log_path else None,
                "harness_pid": os.getpid(), "started_at": now_iso()}
        path = self.dir / f"{proc.pid}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
        return path

    def remove(self, pid: int) -> None:
        try:
            (self.dir / f"{pid}.json").unlink()
        except FileNotFoundError:
            pass

    def entries(self) -> list[RegistryEntry]:
        out = []
        for p in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                d = json.loads(p.read_text())
                out.append(RegistryEntry(**{k: d[k] for k in RegistryEntry.__dataclass_fields__ if k in d}, path=p))
            except (OSError, ValueError, TypeError):
                p.unlink(missing_ok=True)  # unreadable/partial entry: nothing we could act on
        return out


def _group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error, OSError):
            continue
    return out


def _entry_alive(e: RegistryEntry) -> bool:
    """The leader with the same create time is alive, or other members of its group are."""
    try:
        p = psutil.Process(e.pid)
        if p.status() != psutil.STATUS_ZOMBIE and (not e.create_time or abs(p.create_time() - e.create_time) < 1.0):
            return True
    except psutil.Error:
        pass
    return bool(_group_members(e.pgid))


def kill_group(pgid: int, timeout_s: float = 10.0, leader: Optional[subprocess.Popen] = None) -> bool:
    """SIGTERM the process group, wait, SIGKILL what is left. True if anything was signalled."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        if leader is not None:
            leader.poll()
        return False
    except PermissionError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()  # reap our child so it stops counting as a member
        if not [p for p in _group_members(pgid) if _not_zombie(p)]:
            break
        time.sleep(0.05)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leader is not None:
        try:
            leader.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return True


def _not_zombie(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cleanup_processes(group: Optional[str] = None, registry_dir: Optional[Path | str] = None,
                      dry_run: bool = False, timeout_s: float = 10.0, force: bool = False) -> list[dict[str, Any]]:
    """Kill leftover engine process groups found in the registry (optionally one experiment group),
    except those whose harness is still alive (a run in progress) unless `force`.

    Returns one dict per registry entry acted on: pid, group, cell, argv, action (killed | gone |
    would kill | skipped …). Entries of processes that no longer exist are dropped."""
    reg = ProcessRegistry(registry_dir)
    out = []
    for e in reg.entries():
        if group is not None and e.group != group:
            continue
        alive = _entry_alive(e)
        row = {"pid": e.pid, "group": e.group, "cell": e.cell, "argv": e.argv}
        if alive and not force and harness_alive(e.labels.get(HARNESS_LABEL)):
            row["action"] = f"skipped (its harness, pid {e.harness_pid}, is running; --force)"
        elif dry_run:
            row["action"] = "would kill" if alive else "gone"
        else:
            if alive:
                kill_group(e.pgid, timeout_s=timeout_s)
            row["action"] = "killed" if alive else "gone"
            reg.remove(e.pid)
        out.append(row)
    return out


class ProcessRuntime(Runtime):
    name = "process"

    def __init__(self, registry_dir: Optional[Path | str] = None, stop_timeout_s: float = 15.0,
                 check_port: bool = True, cwd: Optional[Path | str] = None):
        self.registry = ProcessRegistry(registry_dir)
        self.stop_timeout_s = stop_timeout_s
        self.check_port = check_port
        self.cwd = Path(cwd) if cwd else None

    @staticmethod
    def argv(spec: ResolvedSpec) -> list[str]:
        cmd = list(spec.command)
        if not cmd and not spec.args:
            raise KvtError(f"engine {spec.engine!r}: the process runtime needs a command (engine.yaml `command`)")
        if cmd and cmd[0] in ("python", "python3"):
            cmd[0] = sys.executable
        return cmd + list(spec.args)

    def start(self, spec: ResolvedSpec, labels: dict[str, str], log_path: Optional[Path]) -> Instance:
        argv = self.argv(spec)
        lbl = full_labels(labels)
        if self.check_port and port_in_use(spec.base_url):
            raise EngineStartError(f"{spec.base_url}: port already in use; another server would answer the "
                                   f"health check (stop it, pick another port, or run `kvt cleanup`)")
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"kvt-{spec.engine}-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if spec.needs_gpu and not spec.gpus:
            from kv_transition.runtime.gpus import GpuRequiredError, needs_gpu_message

            raise GpuRequiredError(f"engine.gpus: {needs_gpu_message(spec)} but the spec has no GPU ids; "
                                   f"set engine.gpus (or --gpus), or engine.device: cpu")
        gpu_uuids: list[str] = []
        if spec.gpu and spec.gpus:  # the process analogue of the container's DeviceRequest
            from kv_transition.runtime.gpus import uuids_for

            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.gpus)
            gpu_uuids = uuids_for(spec.gpus)
        env.update(spec.env)
        env["KVT_ENGINE_OWNER"] = lbl[next(k for k in lbl if k.endswith(".owner"))]
        env["PYTHONUNBUFFERED"] = env.get("PYTHONUNBUFFERED", "1")
        logf = open(log_path, "ab", buffering=0)
        inst = Instance(runtime=self.name, base_url=spec.base_url, spec=spec, log_path=log_path, started_at=now_iso(),
                        gpu_uuids=gpu_uuids)
        with deferred_signals():  # Popen + registry entry + tracking happen together or not at all
            try:
                proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True, cwd=self.cwd, close_fds=True)
            except OSError as e:
                logf.close()
                raise EngineStartError(f"cannot start {argv[0]!r}: {e}") from None
            self.registry.add(proc, argv, lbl, spec.base_url, log_path)
            inst.ident = str(proc.pid)
            inst.pids = [proc.pid]
            inst.handle = {"proc": proc, "logf": logf, "labels": lbl}
            self._track(inst)
        return inst

    def _proc(self, inst: Instance) -> subprocess.Popen:
        return inst.handle["proc"]

    def wait_ready(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        spec = inst.spec
        proc = self._proc(inst)
        wait_healthy(spec.base_url + spec.health_path,
                     timeout_s=timeout_s if timeout_s is not None else spec.readiness_timeout_s,
                     interval_s=spec.health_interval_s, alive=proc.poll,
                     log_tail=lambda: self.log_tail(inst), what=f"engine {spec.engine} (pid {proc.pid})",
                     fallback_urls=[spec.base_url + p for p in spec.health_fallback_paths])
        inst.ready_at = now_iso()

    def is_running(self, inst: Instance) -> bool:
        return inst.handle is not None and self._proc(inst).poll() is None

    def stop(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        if inst.handle is None or inst.stopped_at is not None or inst.handle.get("stopping"):
            return
        inst.handle["stopping"] = True
        with deferred_signals():
            proc = self._proc(inst)
            kill_group(proc.pid, timeout_s=self.stop_timeout_s if timeout_s is None else timeout_s, leader=proc)
            inst.exit_code = proc.poll()
            inst.stopped_at = now_iso()
            self.registry.remove(proc.pid)
            try:
                inst.handle["logf"].close()
            except OSError:
                pass
            self._untrack(inst)
