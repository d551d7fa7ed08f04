"""`kvt preflight`: everything that would make a matrix fail in its first minutes, checked in seconds
before any engine starts.

Per distinct engine image and argv (one target = one engine group of the plan, or the config's one cell):

* argcheck   the engine's own parser on the exact argv (engine.yaml `argcheck:`; contract in
             docs/config.md): docker runtime = a throwaway container of the pinned image, entrypoint
             overridden, the engine dir mounted read-only at /kvt-engine (and the read-only model mount
             where the engine would see it), no GPU, no network; process
             runtime = the harness's python. Exit 0 accepted (an optional JSON line on stdout is shown),
             exit 2 rejected (its one stderr line is the message), anything else = the check broke.
* image      present locally, or buildable (engine.yaml build), or pullable (registry answers) — with
             `pull=True` (what `kvt matrix run` does) missing images are pulled/built here, with progress.
* mounts     every mount source (the model dir, the HF cache, engine.mounts) exists and is readable
             (the HF cache: writable).
* port       the planned port is free (a matrix falls back to a free port: a warning there).
* gpus       the GPUs the plan gives GPU engines are visible to NVML with enough free memory
             (`min_gpu_free`, a fraction of total); without NVML and without GPU engines: skipped, saying why.
* disk       free space where the logs go (`min_disk_gib`).

Any `fail` → PreflightError (exit 2) naming the first failing check, its cells and the message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kv_transition.runtime.health import port_free
from kv_transition.engines.spec import SECRET_ENV, ResolvedSpec
from kv_transition.errors import KvtError

ARGCHECK_DIR = "/kvt-engine"   # where the engine dir is mounted in the argcheck container


class PreflightError(KvtError):
    """A preflight check failed (exit 2): the message names the check, the cells and the reason."""


@dataclass
class Target:
    label: str                  # the engine group (or cell) the check is about
    spec: ResolvedSpec          # with the port and GPUs the run would use
    runtime: str
    cells: list[str] = field(default_factory=list)
    port_fallback: bool = False  # the matrix picks a free port when the planned one is busy


@dataclass
class Check:
    check: str                  # argcheck | image | mounts | port | gpus | disk
    subject: str
    status: str                 # ok | fail | warn | skip
    detail: str
    cells: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "subject": self.subject, "status": self.status, "detail": self.detail,
                "cells": self.cells}


@dataclass
class PreflightReport:
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def error(self) -> PreflightError:
        f = self.failed[0]
        cells = (f" (cell {', '.join(f.cells[:3])}{' …' if len(f.cells) > 3 else ''})" if f.cells else "")
        more = f"; {len(self.failed) - 1} more check(s) failed (table above)" if len(self.failed) > 1 else ""
        return PreflightError(f"preflight: {f.check} {f.subject}{cells}: {f.detail}{more}")


def _one_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    s = lines[-1] if lines else ""
    return (s[: limit - 1] + "…") if len(s) > limit else s


def _safe_env(spec: ResolvedSpec) -> dict[str, str]:
    """The engine env without secrets (a parser needs no token)."""
    return {k: v for k, v in spec.env.items() if not SECRET_ENV.search(k)}


# --- argcheck -----------------------------------------------------------------------------------

def _verdict(code: Optional[int], out: str, err: str) -> tuple[str, str]:
    if code == 0:
        extra = ""
        for ln in reversed([x for x in out.splitlines() if x.strip()]):
            try:
                d = json.loads(ln)
            except ValueError:
                continue
            if isinstance(d, dict):
                extra = " " + ", ".join(f"{k}={v}" for k, v in d.items())
            break
        return "ok", "accepted by the engine's parser" + extra
    if code == 2:
        return "fail", _one_line(err) or "rejected (exit 2, no message)"
    return "fail", f"the argcheck itself broke (exit {code}): {_one_line(err) or _one_line(out) or 'no output'}"


def argcheck_process(spec: ResolvedSpec, timeout_s: float = 120.0) -> tuple[str, str]:
    ac = spec.argcheck or {}
    script = Path(ac["engine_dir"]) / ac["script"]
    py = ac.get("python") or "python3"
    if py in ("python", "python3"):
        py = sys.executable  # the interpreter the process runtime starts the engine with
    env = {**os.environ, **_safe_env(spec)}
    try:
        p = subprocess.run([py, str(script), *spec.args], capture_output=True, text=True, timeout=timeout_s,
                           env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "fail", f"the argcheck did not finish in {timeout_s:.0f} s"
    except OSError as e:
        return "fail", f"cannot run the argcheck {py} {script}: {e}"
    return _verdict(p.returncode, p.stdout, p.stderr)


def argcheck_docker(client: Any, image_id: str, spec: ResolvedSpec, labels: dict[str, str],
                    timeout_s: float = 120.0) -> tuple[str, str]:
    """Run the argcheck in a throwaway container (no GPU, no network, engine dir read-only); always removed."""
    from docker.errors import APIError
    from docker.types import Mount as DockerMount

    from kv_transition.runtime.base import full_labels

    ac = spec.argcheck or {}
    script = f"{ARGCHECK_DIR}/{ac['script']}"
    c = None
    try:
        c = client.containers.create(
            image_id, entrypoint=[ac.get("python") or "python3"], command=[script, *spec.args],
            environment=_safe_env(spec), network_mode="none", detach=True,
            labels=full_labels({**labels, "argcheck": "1"}),
            mounts=[DockerMount(target=ARGCHECK_DIR, source=ac["engine_dir"], type="bind", read_only=True)]
            + [DockerMount(target=m.target, source=m.source, type="bind", read_only=True)  # the model, as the engine sees it
               for m in spec.mounts if m.read_only and Path(m.source).exists()])
        c.start()
        try:
            res = c.wait(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - requests' ReadTimeout
            return "fail", f"the argcheck did not finish in {timeout_s:.0f} s"
        out = c.logs(stdout=True, stderr=False).decode(errors="replace")
        err = c.logs(stdout=False, stderr=True).decode(errors="replace")
        return _verdict(int(res.get("StatusCode", -1)), out, err)
    except APIError as e:
        return "fail", f"cannot run the argcheck container: {_one_line(str(e))}"
    finally:
        if c is not None:
            try:
                c.remove(force=True)
            except Exception:  # noqa: BLE001
                pass


# --- the other checks ---------------------------------------------------------------------------

def check_mounts(t: Target) -> list[Check]:
    out = []
    for m in t.spec.mounts:
        p = Path(m.source)
        subj = f"{m.source} → {m.target}"
        if not m.read_only:  # the shared cache: created on first use; its nearest existing parent must be writable
            q = p
            while not q.exists() and q.parent != q:
                q = q.parent
            ok = os.access(q, os.W_OK | os.X_OK)
            out.append(Check("mounts", subj, "ok" if ok else "fail",
                             ("writable" if p.exists() else f"will be created (under {q})") if ok
                             else f"{q} is not writable by this user", t.cells))
            continue
        if not p.exists():
            out.append(Check("mounts", subj, "fail", "the host path does not exist", t.cells))
        elif not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
            out.append(Check("mounts", subj, "fail", "not readable by this user", t.cells))
        else:
            try:
                n = sum(1 for _ in p.iterdir()) if p.is_dir() else 1
                out.append(Check("mounts", subj, "ok", f"readable ({n} entr{'y' if n == 1 else 'ies'}, read-only)"
                                 if p.is_dir() else "readable file (read-only)", t.cells))
            except OSError as e:
                out.append(Check("mounts", subj, "fail", f"cannot list it: {e}", t.cells))
    return out


def check_port(t: Target) -> Check:
    subj = f"{t.spec.host}:{t.spec.port}"
    if port_free(t.spec.host, t.spec.port):
        return Check("port", subj, "ok", "free", t.cells)
    if t.port_fallback:
        return Check("port", subj, "warn", "in use; the matrix run will pick a free port", t.cells)
    return Check("port", subj, "fail", "already in use (stop what listens there or pick another engine.port)", t.cells)


def check_gpus(targets: list[Target], min_free: float, lister: Optional[Callable[[], list[Any]]] = None) -> list[Check]:
    from kv_transition.runtime.gpus import nvml_gpus

    want: dict[int, list[str]] = {}
    for t in targets:
        if t.runtime != "external" and t.spec.needs_gpu:
            for g in t.spec.gpus:
                want.setdefault(g, []).extend(t.cells)
    try:
        gpus = {g.index: g for g in (lister or nvml_gpus)()}
        why = None
    except Exception as e:  # noqa: BLE001 - NvmlUnavailable: no driver / no library
        gpus, why = {}, str(e)
    if not want:
        if why is not None:
            return [Check("gpus", "NVML", "skip", f"NVML unavailable ({why}); no GPU engine involved")]
        return [Check("gpus", "NVML", "ok", f"{len(gpus)} GPU(s) visible; no GPU engine involved")]
    if why is not None:
        return [Check("gpus", ",".join(map(str, sorted(want))), "fail",
                      f"GPU engines need GPUs {sorted(want)} but NVML is unavailable ({why})",
                      sorted({c for v in want.values() for c in v}))]
    out = []
    for idx in sorted(want):
        g = gpus.get(idx)
        if g is None:
            out.append(Check("gpus", f"GPU {idx}", "fail", f"not visible (NVML sees indices {sorted(gpus) or 'none'})",
                             want[idx]))
            continue
        frac = g.mem_free / g.mem_total if g.mem_total else 0.0
        gib = 2 ** 30
        detail = (f"{g.name} {g.uuid}: {g.mem_free / gib:.1f} of {g.mem_total / gib:.1f} GiB free ({frac:.0%}; "
                  f"need ≥ {min_free:.0%})")
        out.append(Check("gpus", f"GPU {idx}", "ok" if frac >= min_free else "fail", detail, want[idx]))
    return out


def check_disk(where: Path, min_gib: float) -> Check:
    q = Path(where).absolute()
    while not q.exists() and q.parent != q:
        q = q.parent
    free = shutil.disk_usage(q).free / 2 ** 30
    return Check("disk", str(where), "ok" if free >= min_gib else "fail",
                 f"{free:.1f} GiB free on the filesystem of {q} (need ≥ {min_gib:g} GiB for logs)")


# --- the whole preflight ------------------------------------------------------------------------

def run_preflight(targets: list[Target], *, logs_dir: Path, group: str, pull: bool = False,
                  client: Any = None, min_gpu_free: float = 0.5, min_disk_gib: float = 1.0,
                  argcheck_timeout_s: float = 120.0, gpu_lister: Optional[Callable[[], list[Any]]] = None,
                  workers: int = 4) -> PreflightReport:
    checks: list[Check] = []
    docker_targets = [t for t in targets if t.runtime == "docker"]
    images: dict[str, Any] = {}       # image ref → image id (present or fetched)
    if docker_targets:
        from kv_transition.runtime.docker import DockerRuntime, DockerUnavailableError, docker_client

        try:
            client = client or docker_client()
        except DockerUnavailableError as e:
            checks.append(Check("image", "docker daemon", "fail", str(e),
                                sorted({c for t in docker_targets for c in t.cells})))
            client = None
        if client is not None:
            rt = DockerRuntime(client=client, pull=pull, build=pull)
            seen: dict[str, list[str]] = {}
            first: dict[str, ResolvedSpec] = {}
            for t in docker_targets:
                seen.setdefault(t.spec.image_ref, []).extend(t.cells)
                first.setdefault(t.spec.image_ref, t.spec)
            for ref, cells in seen.items():
                spec = first[ref]
                checks.append(_check_image(client, rt, spec, pull, cells, images))
    # argchecks: one per distinct (runtime, image, argv)
    jobs: dict[tuple[str, str, tuple[str, ...]], list[Target]] = {}
    for t in targets:
        if t.runtime == "external":
            continue
        jobs.setdefault((t.runtime, t.spec.image_ref, tuple(t.spec.args)), []).append(t)

    def one(key: tuple[str, str, tuple[str, ...]]) -> Check:
        ts = jobs[key]
        spec, cells = ts[0].spec, [c for t in ts for c in t.cells]
        subj = spec.engine
        if not spec.argcheck:
            return Check("argcheck", subj, "skip", f"engines/{spec.engine}/engine.yaml declares no argcheck", cells)
        if key[0] == "docker":
            img = images.get(spec.image_ref)
            if img is None:
                return Check("argcheck", subj, "skip" if not pull else "fail",
                             f"image {spec.image_ref} is not present here (kvt preflight --pull fetches it)", cells)
            status, detail = argcheck_docker(client, img, spec, {"group": group, "cell": ts[0].label},
                                             argcheck_timeout_s)
        else:
            status, detail = argcheck_process(spec, argcheck_timeout_s)
        return Check("argcheck", subj, status, detail, cells)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        checks += list(ex.map(one, list(jobs)))
    for t in targets:
        if t.runtime == "external":
            continue
        checks += check_mounts(t)
        checks.append(check_port(t))
    checks += check_gpus(targets, min_gpu_free, gpu_lister)
    checks.append(check_disk(logs_dir, min_disk_gib))
    return PreflightReport(checks)


def _check_image(client: Any, rt: Any, spec: ResolvedSpec, pull: bool, cells: list[str],
                 images: dict[str, Any]) -> Check:
    from docker.errors import APIError, ImageNotFound

    from kv_transition.runtime.docker import ImageUnavailableError, build_context

    ref = spec.image_ref
    try:
        img = client.images.get(ref)
        images[ref] = img.id
        return Check("image", ref, "ok", f"present ({img.short_id})", cells)
    except ImageNotFound:
        pass
    except APIError as e:
        return Check("image", ref, "fail", _one_line(str(e)), cells)
    if pull:
        try:
            img = rt.ensure_image(spec)
            images[ref] = img.id
            return Check("image", ref, "ok", f"{'built' if spec.build and not spec.digest else 'pulled'} ({img.short_id})",
                         cells)
        except ImageUnavailableError as e:
            return Check("image", ref, "fail", _one_line(str(e)), cells)
    if spec.build and not spec.digest:
        ctx = build_context(spec)
        ok = (ctx / spec.build.get("dockerfile", "Dockerfile")).is_file()
        return Check("image", ref, "warn" if ok else "fail",
                     f"not present; will be built from {ctx}" if ok else f"not present and {ctx} has no Dockerfile",
                     cells)
    try:
        client.images.get_registry_data(ref)
        return Check("image", ref, "warn", "not present locally; pullable (the run pulls it)", cells)
    except Exception as e:  # noqa: BLE001 - registry unreachable / unknown image
        return Check("image", ref, "fail", f"not present locally and not pullable: {_one_line(str(e))}", cells)


# --- targets ------------------------------------------------------------------------------------

def targets_for_config(cfg: Any) -> list[Target]:
    """The one cell `kvt run -c CONFIG` would start (kv.method), with its GPUs resolved."""
    from kv_transition.cell import resolve_cell_spec
    from kv_transition.runtime.gpus import require_gpus

    spec, rt, _ = resolve_cell_spec(cfg)
    spec = require_gpus(spec, 1, runtime=rt)
    return [Target(f"{spec.engine}/{spec.method}", spec, rt, [f"{spec.engine}/{spec.method}"])]


def targets_for_matrix(cfg: Any, exp: Any, inv: Any) -> list[Target]:
    """One target per engine group of the plan, with the port and GPUs the plan gives it."""
    from kv_transition.matrix.cli import group_specs

    return [Target(g.group_id, spec, g.runtime, [c.cell_id for c in g.cells], port_fallback=True)
            for g, spec, _gpus, _port, _start in group_specs(cfg, exp, inv)]


def render(report: PreflightReport, console: Any) -> None:
    from rich.table import Table

    colour = {"ok": "green", "warn": "yellow", "skip": "dim", "fail": "red"}
    t = Table(title=f"preflight: {sum(c.status == 'ok' for c in report.checks)} ok · "
                    f"{len(report.failed)} failed · {sum(c.status == 'warn' for c in report.checks)} warnings · "
                    f"{sum(c.status == 'skip' for c in report.checks)} skipped")
    for col in ("check", "subject", "cells", "status", "detail"):
        t.add_column(col, overflow="fold")
    for c in report.checks:
        cells = ", ".join(c.cells[:2]) + (f" +{len(c.cells) - 2}" if len(c.cells) > 2 else "")
        t.add_row(c.check, c.subject, cells, f"[{colour[c.status]}]{c.status}[/]", c.detail)
    console.print(t)
