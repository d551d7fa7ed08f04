"""One lifecycle interface for every runtime (docker | process | external).

    rt = get_runtime("process")
    with rt.running(spec, labels, log_path) as inst:   # start → wait healthy → … → stop, always
        inst.base_url

`running` stops the engine on normal end, exception, SIGINT and SIGTERM. A runtime never knows
about KV methods, manifests or the DB: it starts a `ResolvedSpec` and reports an `Instance`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from kv_transition.engines.spec import ResolvedSpec
from kv_transition.errors import KvtError

LABEL_PREFIX = "kv-transition."
OWNER = "kv-transition"
OWNER_LABEL = "kv-transition.owner"
GROUP_LABEL = "kv-transition.group"
CELL_LABEL = "kv-transition.cell"
HARNESS_LABEL = "kv-transition.harness"  # host:pid:start-time of the harness that started the engine


class EngineStartError(KvtError):
    """The engine exited or never became healthy. Carries the exit code and the last log lines."""

    exit_code = 1

    def __init__(self, message: str, *, returncode: Optional[int] = None, log_tail: str = ""):
        super().__init__(message + (f"\n--- last log lines ---\n{log_tail}" if log_tail else ""))
        self.returncode = returncode
        self.log_tail = log_tail


@dataclass
class Instance:
    """A started engine. `info` is what gets recorded in engine_instances."""

    runtime: str
    base_url: str
    spec: ResolvedSpec
    ident: str = ""                      # container id / pid / url
    pids: list[int] = field(default_factory=list)  # host pids to sample with psutil (process tree roots)
    gpu_uuids: list[str] = field(default_factory=list)
    log_path: Optional[Path] = None
    image_digest: Optional[str] = None
    started_at: Optional[str] = None
    ready_at: Optional[str] = None
    stopped_at: Optional[str] = None
    exit_code: Optional[int] = None
    handle: Any = None                   # runtime-private (Popen, Container, …)
    ready_url: Optional[str] = None      # the readiness URL that answered (health path or a fallback)
    served_model: Optional[str] = None   # the model id requests must name (ResolvedSpec.served_model_from)
    verified: Optional[dict[str, str]] = None  # what the engine's log proved (ResolvedSpec.verify)


class Runtime(ABC):
    name: str = "base"
    #: seconds between two liveness checks during a cell (cheap: process poll, container state, TCP)
    liveness_interval_s: Optional[float] = None

    @abstractmethod
    def start(self, spec: ResolvedSpec, labels: dict[str, str], log_path: Optional[Path]) -> Instance:
        """Start the engine (non-blocking)."""

    @abstractmethod
    def wait_ready(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        """Block until health answers 200; raise EngineStartError early if the engine exits."""

    def ready(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        """wait_ready, then the engine's reported version against the spec's tag (when it declares one)."""
        from kv_transition.runtime.health import verify_version

        self.wait_ready(inst, timeout_s)
        if inst.spec is not None:
            verify_version(inst.spec)

    @abstractmethod
    def is_running(self, inst: Instance) -> bool: ...

    @abstractmethod
    def stop(self, inst: Instance, timeout_s: float = 20.0) -> None:
        """Stop and remove; idempotent (also when re-entered from a signal handler); records
        exit_code and stopped_at."""

    def log_tail(self, inst: Instance, n: int = 40) -> str:
        if inst.log_path and inst.log_path.is_file():
            return "\n".join(inst.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop_all(self) -> None:
        """Stop every instance this runtime object started and has not stopped yet."""
        for inst in list(getattr(self, "_live", {}).values()):
            self.stop(inst)

    def _track(self, inst: Instance) -> None:
        if not hasattr(self, "_live"):
            self._live: dict[int, Instance] = {}
        self._live[id(inst)] = inst

    def _untrack(self, inst: Instance) -> None:
        getattr(self, "_live", {}).pop(id(inst), None)

    @contextmanager
    def running(self, spec: ResolvedSpec, labels: dict[str, str], log_path: Optional[Path] = None) -> Iterator[Instance]:
        """start → wait_ready → yield → stop, on normal end, exception, SIGINT and SIGTERM.

        The signal handlers are installed before `start`, so a Ctrl-C during startup also stops
        whatever was started (everything this runtime tracks), then raises KeyboardInterrupt
        (SIGINT) or SystemExit(143) (SIGTERM). Leftovers from a SIGKILL'd harness: `kvt cleanup`.
        """
        from kv_transition.runtime.signals import stop_on_signals

        with stop_on_signals(self.stop_all):
            inst = self.start(spec, labels, log_path)
            try:
                self.ready(inst)
                after_ready(self, inst)
                yield inst
            finally:
                self.stop(inst)


def full_labels(labels: Optional[dict[str, str]]) -> dict[str, str]:
    """Caller labels → container/registry labels: `group`/`cell` (or any key without a dot) get the
    `kv-transition.` prefix; dotted keys are kept; the owner and harness labels are always set."""
    out = {OWNER_LABEL: OWNER}
    for k, v in (labels or {}).items():
        if v is None:
            continue
        out[k if "." in k else f"{LABEL_PREFIX}{k}"] = str(v)
    out[OWNER_LABEL] = OWNER
    out.setdefault(HARNESS_LABEL, harness_id())
    return out


def harness_id() -> str:
    """This process as `host:pid:start-time` (start time guards against pid reuse)."""
    import os
    import socket

    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{int(psutil.Process().create_time())}"


def harness_alive(hid: Optional[str]) -> bool:
    """True when `hid` (from harness_id) names a live process on this host other than this one."""
    import os
    import socket

    import psutil

    try:
        host, pid, ct = (hid or "").rsplit(":", 2)
        if host != socket.gethostname() or int(pid) == os.getpid():
            return False
        return int(psutil.Process(int(pid)).create_time()) == int(ct)
    except (ValueError, psutil.Error):
        return False


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


#: runtime name → "module:Class"; kv_transition.runtime (the package) registers the built-in three, so
#: this module never imports a concrete runtime (they import it)
_REGISTRY: dict[str, str] = {}


def register_runtime(name: str, target: str) -> None:
    _REGISTRY[name] = target


def get_runtime(name: str, **kwargs: Any) -> Runtime:
    import importlib

    target = _REGISTRY.get(name)
    if target is None:
        raise KvtError(f"engine.runtime: unknown runtime {name!r} ({', '.join(sorted(_REGISTRY))})")
    mod, _, cls = target.partition(":")
    return getattr(importlib.import_module(mod), cls)(**kwargs)


# --- after readiness: the served model name and proof of the KV method ---------------------------------

def after_ready(rt: Runtime, inst: Instance) -> None:
    """Set `inst.served_model` (asking the server when the engine says so) and check `spec.verify`
    against the engine's log. Raises EngineStartError with the reason when either does not hold."""
    spec = inst.spec
    if spec.served_model_from == "server":
        inst.served_model = discover_served_model(inst)
    elif rt.name == "external":  # someone else's server may serve model.id under another name: ask, kindly
        try:
            inst.served_model = discover_served_model(inst)
        except EngineStartError:
            inst.served_model = spec.served_model
    else:
        inst.served_model = spec.served_model
    if spec.verify:
        inst.verified = verify_from_log(rt, inst)


def discover_served_model(inst: Instance) -> str:
    import httpx

    url = inst.base_url + inst.spec.models_path
    try:
        r = httpx.get(url, timeout=10)
        r.raise_for_status()
        ids = [m.get("id") for m in r.json().get("data", []) if isinstance(m, dict) and m.get("id")]
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise EngineStartError(f"GET {url}: cannot read the served model names ({type(e).__name__}: {e})") from None
    if inst.spec.served_model in ids:
        return inst.spec.served_model
    if len(ids) == 1:
        return str(ids[0])
    raise EngineStartError(f"GET {url}: the server lists {ids or 'no models'}; none is model.id "
                           f"{inst.spec.served_model!r} (set model.id to the one to use)")


def verify_from_log(rt: Runtime, inst: Instance) -> Optional[dict[str, str]]:
    """The engine's own report (its log) must show what the cell claims, e.g. llama.cpp's
    `llama_kv_cache: … K (q8_0): … V (q8_0)` for method q8_0. None when the runtime has no log
    (external): nothing to check, the caller records that."""
    import re
    import time

    v = inst.spec.verify or {}
    if inst.log_path is None and rt.name == "external":
        return None
    rx = re.compile(v["log_regex"], re.M)
    deadline = time.monotonic() + float(v.get("timeout_s", 10.0))
    while True:
        text = rt.log_tail(inst, n=100000)
        m = None
        for m in rx.finditer(text):  # the last match: an appended log holds earlier starts of this cell
            pass
        if m or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    claim = f"{inst.spec.engine}/{inst.spec.method}"
    if not m:
        raise EngineStartError(f"{claim}: cannot verify the KV method: the engine log has no line matching "
                               f"{v['log_regex']!r}", log_tail=rt.log_tail(inst))
    got = {k: m.group(k) for k in v.get("expect", {})}
    bad = {k: (got[k], want) for k, want in v.get("expect", {}).items() if got[k] != want}
    if bad:
        what = ", ".join(f"{k} is {g!r}, the cell needs {w!r}" for k, (g, w) in bad.items())
        raise EngineStartError(f"{claim}: refused: the engine does not run the cell's KV method ({what}; "
                               f"log: {m.group(0).strip()!r})")
    return got
