"""`docker` runtime, through the Docker SDK only (no docker CLI).

start: image present? else build (spec.build) or pull with progress → record RepoDigests (or the image
id) → create with labels (owner, group, cell, …), GPU DeviceRequest, ipc_mode or shm_size, host network,
env (secrets only ever travel here) → start → a thread streams the container's logs to the log file.
wait_ready: GET base_url+health_path until 200 while the container keeps running; an exit ends the wait
at once with EngineStartError(exit code, last log lines). stop: stop (SIGTERM, then SIGKILL after the
timeout), record the exit code, remove. `cleanup_containers()` removes leftovers by label.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from kv_transition.engines.spec import ResolvedSpec, engines_root
from kv_transition.errors import KvtError
from kv_transition.runtime.base import (
    CELL_LABEL,
    GROUP_LABEL,
    HARNESS_LABEL,
    OWNER,
    OWNER_LABEL,
    EngineStartError,
    Instance,
    Runtime,
    full_labels,
    harness_alive,
    now_iso,
)
from kv_transition.runtime.health import port_in_use, wait_healthy
from kv_transition.runtime.signals import deferred_signals

#: progress callback for pulls: (status line, bytes done, bytes total or 0 when unknown)
ProgressFn = Callable[[str, int, int], None]


class DockerUnavailableError(KvtError):
    """The Docker daemon cannot be reached (one line, exit 2)."""


class ImageUnavailableError(EngineStartError):
    """The image is not present locally and could not be pulled or built."""


def _one_line(e: BaseException, limit: int = 220) -> str:
    s = " ".join(str(e).split())
    return (s[: limit - 1] + "…") if len(s) > limit else s


def docker_client(timeout_s: int = 60) -> Any:
    """A connected `docker.DockerClient` (API version negotiated), or DockerUnavailableError."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError as e:  # pragma: no cover - docker is a hard dependency
        raise DockerUnavailableError(f"docker: the Docker SDK is not installed ({e})") from None
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
        return client
    except DockerException as e:
        raise DockerUnavailableError(
            f"docker: cannot reach the Docker daemon at {where} ({_one_line(e)}); start dockerd, set "
            f"DOCKER_HOST, or use --runtime process") from None
    except Exception as e:  # noqa: BLE001 - requests/urllib3 errors from ping
        raise DockerUnavailableError(f"docker: cannot reach the Docker daemon at {where} ({_one_line(e)})") from None


def _container_name(labels: dict[str, str]) -> str:
    parts = ["kvt", labels.get(GROUP_LABEL, ""), labels.get(CELL_LABEL, ""), uuid.uuid4().hex[:6]]
    name = "-".join(p for p in parts if p)
    name = re.sub(r"[^a-zA-Z0-9_.-]+", "-", name).strip("-.")
    return name[:40].rstrip("-.") + "-" + parts[-1] if len(name) > 48 else name


def _digest_of(image: Any, repo: str) -> str:
    digests = image.attrs.get("RepoDigests") or []
    for d in digests:
        if d.split("@", 1)[0] == repo:
            return d
    return digests[0] if digests else image.id


def build_context(spec: ResolvedSpec) -> Path:
    """spec.build.context: absolute, or relative to the repo root (the dir above engines/), or to
    engines/<engine>/ — the first that exists."""
    ctx = Path(spec.build["context"]) if spec.build else Path(".")
    if ctx.is_absolute():
        return ctx
    root = engines_root()
    for cand in (root.parent / ctx, root / spec.engine / ctx):
        if cand.is_dir():
            return cand.resolve()
    return (root.parent / ctx).resolve()


class _RichPull:
    """Default pull progress: a rich bar on stderr summing all layers (transient)."""

    def __init__(self, ref: str):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        from kv_transition.ui import err_console

        self.p = Progress(TextColumn(f"pull {ref}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                          console=err_console, transient=True)
        self.task = self.p.add_task("pull", total=None)
        self.p.start()

    def __call__(self, status: str, done: int, total: int) -> None:
        self.p.update(self.task, completed=done, total=total or None)

    def close(self) -> None:
        self.p.stop()


class DockerRuntime(Runtime):
    name = "docker"

    def __init__(self, client: Any = None, *, pull: bool = True, build: bool = True,
                 progress: Optional[ProgressFn] = None, stop_timeout_s: float = 20.0, init: bool = True,
                 check_port: bool = True, extra_create_kwargs: Optional[dict[str, Any]] = None):
        self._client = client
        self.pull = pull
        self.build = build
        self.progress = progress
        self.stop_timeout_s = stop_timeout_s
        self.init = init  # docker-init as PID 1: forwards SIGTERM, reaps zombies
        self.check_port = check_port
        self.extra_create_kwargs = dict(extra_create_kwargs or {})

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = docker_client()
        return self._client

    # ---- images
    def ensure_image(self, spec: ResolvedSpec) -> Any:
        """The image object for spec.image_ref: local, else built (spec.build) or pulled (with progress)."""
        from docker.errors import APIError, ImageNotFound

        ref = spec.image_ref
        try:
            return self.client.images.get(ref)
        except ImageNotFound:
            pass
        except APIError as e:
            raise ImageUnavailableError(f"image {ref}: {_one_line(e)}") from None
        if spec.build and self.build and not spec.digest:
            return self._build(spec)
        if not self.pull:
            raise ImageUnavailableError(f"image {ref}: not present locally and pulling is disabled")
        return self._pull(spec)

    def _build(self, spec: ResolvedSpec) -> Any:
        """Build spec.image:tag from spec.build (engines that ship a Dockerfile), streaming the build
        output to the progress callback (or stderr on a terminal)."""
        from docker.errors import APIError, ImageNotFound

        ref = spec.image_ref
        ctx = build_context(spec)
        progress = self.progress
        if progress is None:
            from kv_transition.ui import err_console

            if err_console.is_terminal:
                def progress(status: str, done: int, total: int) -> None:
                    err_console.print(f"[dim]build {ref}:[/dim] {status}", markup=True, highlight=False)
        try:
            for ev in self.client.api.build(path=str(ctx), dockerfile=spec.build.get("dockerfile", "Dockerfile"),
                                            buildargs=spec.build.get("args") or None, tag=ref, rm=True,
                                            network_mode="host",  # dockerd may run without a bridge
                                            decode=True):
                if "error" in ev:
                    raise ImageUnavailableError(f"image {ref}: not present locally and the build from {ctx} "
                                                f"failed: {_one_line(Exception(ev['error']))}")
                line = str(ev.get("stream", "")).strip()
                if line and progress is not None:
                    progress(line, 0, 0)
            return self.client.images.get(ref)
        except (APIError, ImageNotFound, OSError, TypeError) as e:
            raise ImageUnavailableError(f"image {ref}: not present locally and the build from {ctx} failed: "
                                        f"{_one_line(e)}") from None

    def _pull(self, spec: ResolvedSpec) -> Any:
        from docker.errors import APIError, ImageNotFound

        ref = spec.image_ref
        tag = spec.digest or spec.tag
        progress: Optional[ProgressFn] = self.progress
        rich_bar = None
        if progress is None:
            from kv_transition.ui import err_console

            if err_console.is_terminal:
                rich_bar = _RichPull(ref)
                progress = rich_bar
        layers: dict[str, tuple[int, int]] = {}
        try:
            for ev in self.client.api.pull(spec.image, tag=tag, stream=True, decode=True):
                if "error" in ev:
                    raise ImageUnavailableError(f"image {ref}: not present locally and the pull failed: "
                                                f"{_one_line(Exception(ev['error']))}")
                pd = ev.get("progressDetail") or {}
                if ev.get("id") and pd.get("total"):
                    layers[ev["id"]] = (int(pd.get("current", 0)), int(pd["total"]))
                if progress is not None:
                    progress(str(ev.get("status", "")), sum(c for c, _ in layers.values()),
                             sum(t for _, t in layers.values()))
        except (APIError, OSError) as e:
            raise ImageUnavailableError(f"image {ref}: not present locally and the pull failed: {_one_line(e)}") from None
        finally:
            if rich_bar is not None:
                rich_bar.close()
        try:
            return self.client.images.get(ref)
        except ImageNotFound:
            raise ImageUnavailableError(f"image {ref}: pull finished but the image is not present") from None

    # ---- lifecycle
    def create_kwargs(self, spec: ResolvedSpec, labels: dict[str, str]) -> dict[str, Any]:
        """The containers.create() arguments for a spec (without the image)."""
        from docker.types import DeviceRequest

        kw: dict[str, Any] = {
            "command": list(spec.args) if spec.command or spec.args else None,
            "environment": dict(spec.env),
            "labels": labels,
            "name": _container_name(labels),
            "network_mode": "host",
            "init": self.init,
            "detach": True,
        }
        if spec.command:
            kw["entrypoint"] = list(spec.command)
        if spec.needs_gpu and not spec.gpus:  # never a GPU engine in a container without GPUs
            from kv_transition.runtime.gpus import GpuRequiredError, needs_gpu_message

            raise GpuRequiredError(f"engine.gpus: {needs_gpu_message(spec)} but the spec has no GPU ids; "
                                   f"set engine.gpus (or --gpus), or engine.device: cpu")
        if spec.gpu and spec.gpus:
            kw["device_requests"] = [DeviceRequest(device_ids=[str(g) for g in spec.gpus], capabilities=[["gpu"]])]
        if spec.mounts:
            from docker.types import Mount as DockerMount

            kw["mounts"] = [DockerMount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
                            for m in spec.mounts]
        if spec.ipc_mode:
            kw["ipc_mode"] = spec.ipc_mode
        if spec.shm_size and spec.ipc_mode != "host":  # with the host's IPC namespace /dev/shm is the host's
            kw["shm_size"] = spec.shm_size
        kw.update(self.extra_create_kwargs)
        return kw

    def start(self, spec: ResolvedSpec, labels: dict[str, str], log_path: Optional[Path]) -> Instance:
        from docker.errors import APIError

        lbl = full_labels(labels)
        kw = self.create_kwargs(spec, lbl)  # a GPU engine without GPUs fails here, before any pull
        for m in spec.mounts:
            if not m.read_only:  # the shared HF cache: created by us, not as root by dockerd
                Path(m.source).mkdir(parents=True, exist_ok=True)
            elif not Path(m.source).exists():
                raise EngineStartError(f"mount {m.source} → {m.target}: the host path does not exist")
        image = self.ensure_image(spec)
        if self.check_port and port_in_use(spec.base_url):
            raise EngineStartError(f"{spec.base_url}: port already in use; another server would answer the "
                                   f"health check (stop it, pick another port, or run `kvt cleanup`)")
        inst = Instance(runtime=self.name, base_url=spec.base_url, spec=spec, log_path=Path(log_path) if log_path else None,
                        image_digest=_digest_of(image, spec.image), started_at=now_iso())
        if spec.gpu and spec.gpus:
            from kv_transition.runtime.gpus import uuids_for

            inst.gpu_uuids = uuids_for(spec.gpus)
        with deferred_signals():  # create + start + tracking together: a Ctrl-C here is handled after
            try:
                container = self.client.containers.create(image.id, **kw)
            except APIError as e:
                raise EngineStartError(f"docker: cannot create the {spec.engine} container from {spec.image_ref}: "
                                       f"{_one_line(e)}") from None
            inst.ident = container.id
            inst.handle = {"container": container, "labels": lbl, "log_thread": None}
            self._track(inst)
            try:
                container.start()
            except APIError as e:
                self.stop(inst)
                raise EngineStartError(f"docker: cannot start container {container.name}: {_one_line(e)}") from None
        try:
            container.reload()
            pid = int(container.attrs.get("State", {}).get("Pid") or 0)
            inst.pids = [pid] if pid else []
        except APIError:
            pass
        if inst.log_path is not None:
            inst.handle["log_thread"] = self._stream_logs(container, inst.log_path)
        return inst

    @staticmethod
    def _stream_logs(container: Any, log_path: Path) -> threading.Thread:
        log_path.parent.mkdir(parents=True, exist_ok=True)

        def pump() -> None:
            try:
                with open(log_path, "ab", buffering=0) as f:
                    for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
                        f.write(chunk)
            except Exception:  # noqa: BLE001 - the container went away; the log ends here
                pass

        t = threading.Thread(target=pump, name=f"kvt-logs-{container.short_id}", daemon=True)
        t.start()
        return t

    def _container(self, inst: Instance) -> Any:
        return inst.handle["container"]

    def _exit_code_if_exited(self, inst: Instance) -> Optional[int]:
        from docker.errors import NotFound

        c = self._container(inst)
        try:
            c.reload()
        except NotFound:
            return inst.exit_code if inst.exit_code is not None else -1
        state = c.attrs.get("State", {})
        if c.status in ("exited", "dead") or (state.get("Status") in ("exited", "dead")):
            inst.exit_code = int(state.get("ExitCode", -1))
            t = inst.handle.get("log_thread")
            if t is not None:
                t.join(timeout=3)  # let the last lines reach the log file
            return inst.exit_code
        return None

    def wait_ready(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        spec = inst.spec
        wait_healthy(spec.base_url + spec.health_path,
                     timeout_s=timeout_s if timeout_s is not None else spec.readiness_timeout_s,
                     interval_s=spec.health_interval_s, alive=lambda: self._exit_code_if_exited(inst),
                     log_tail=lambda: self.log_tail(inst),
                     what=f"engine {spec.engine} (container {self._container(inst).name})")
        inst.ready_at = now_iso()

    def is_running(self, inst: Instance) -> bool:
        return inst.handle is not None and inst.stopped_at is None and self._exit_code_if_exited(inst) is None

    def log_tail(self, inst: Instance, n: int = 40) -> str:
        if inst.log_path is not None:
            return super().log_tail(inst, n)
        try:
            return self._container(inst).logs(tail=n).decode(errors="replace").rstrip("\n")
        except Exception:  # noqa: BLE001
            return ""

    def stop(self, inst: Instance, timeout_s: Optional[float] = None) -> None:
        from docker.errors import APIError, NotFound

        if inst.handle is None or inst.stopped_at is not None or inst.handle.get("stopping"):
            return
        inst.handle["stopping"] = True
        timeout = self.stop_timeout_s if timeout_s is None else timeout_s
        with deferred_signals():
            c = self._container(inst)
            try:
                c.stop(timeout=max(0, int(timeout)))
                res = c.wait(timeout=max(5, int(timeout) + 5))
                inst.exit_code = int(res.get("StatusCode", -1))
            except NotFound:
                pass
            except Exception:  # noqa: BLE001 - a stop that fails still has to end in a removal
                pass
            try:
                c.remove(force=True)
            except NotFound:
                pass
            except APIError as e:
                if "already in progress" not in str(e):
                    raise
            t = inst.handle.get("log_thread")
            if t is not None:
                t.join(timeout=5)
            inst.stopped_at = now_iso()
            self._untrack(inst)


def cleanup_containers(group: Optional[str] = None, client: Any = None, dry_run: bool = False,
                       extra_labels: Optional[dict[str, str]] = None, force: bool = False) -> list[dict[str, Any]]:
    """Remove (force) every container labelled owner=kv-transition (and group=…, and extra labels),
    except those whose harness is still alive on this host (a run in progress) unless `force`.

    Returns one dict per container: id, name, status, group, cell, action
    (removed | would remove | skipped (harness pid N alive) | gone)."""
    from docker.errors import APIError, NotFound

    client = client or docker_client()
    filters = [f"{OWNER_LABEL}={OWNER}"]
    if group is not None:
        filters.append(f"{GROUP_LABEL}={group}")
    filters += [f"{k}={v}" for k, v in (extra_labels or {}).items()]
    out = []
    for c in client.containers.list(all=True, filters={"label": filters}):
        lb = c.labels or {}
        row = {"id": c.short_id, "name": c.name, "status": c.status, "group": lb.get(GROUP_LABEL),
               "cell": lb.get(CELL_LABEL), "action": "would remove" if dry_run else "removed"}
        if not force and harness_alive(lb.get(HARNESS_LABEL)):
            row["action"] = f"skipped (its harness, pid {lb[HARNESS_LABEL].rsplit(':', 2)[1]}, is running; --force)"
        elif not dry_run:
            try:
                c.remove(force=True)
            except NotFound:
                row["action"] = "gone"
            except APIError as e:
                if "already in progress" not in str(e):
                    raise
        out.append(row)
    return out


def wait_removed(client: Any, container_id: str, timeout_s: float = 10.0) -> bool:
    """True once the container no longer exists (a test/CLI convenience)."""
    from docker.errors import NotFound

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client.containers.get(container_id)
        except NotFound:
            return True
        time.sleep(0.1)
    return False
