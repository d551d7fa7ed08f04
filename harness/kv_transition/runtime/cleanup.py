"""`kvt cleanup`: remove leftover engines — containers labelled owner=kv-transition, and engine process
groups in the process runtime's pidfile registry — optionally only one experiment group."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class CleanupReport:
    containers: list[dict[str, Any]] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per runtime that could not be checked

    def lines(self) -> list[str]:
        out = []
        for c in self.containers:
            out.append(f"container {c['name']} ({c['id']}, {c['status']}, group={c['group']}, cell={c['cell']}): "
                       f"{c['action']}")
        for p in self.processes:
            out.append(f"process group {p['pid']} (group={p['group']}, cell={p['cell']}, "
                       f"{' '.join(p['argv'][:3])}…): {p['action']}")
        return out


def cleanup(group: Optional[str] = None, runtime: str = "all", registry_dir: Optional[Path | str] = None,
            dry_run: bool = False, client: Any = None, force: bool = False) -> CleanupReport:
    """runtime: all | docker | process. With `all`, an unreachable Docker daemon is noted in
    `skipped` and the processes are still cleaned; with `docker` it raises DockerUnavailableError.
    Engines whose harness is still running are left alone unless `force`."""
    rep = CleanupReport()
    if runtime in ("all", "docker"):
        from kv_transition.runtime.docker import DockerUnavailableError, cleanup_containers

        try:
            rep.containers = cleanup_containers(group=group, client=client, dry_run=dry_run, force=force)
        except DockerUnavailableError as e:
            if runtime == "docker":
                raise
            rep.skipped.append(str(e))
    if runtime in ("all", "process"):
        from kv_transition.runtime.process import cleanup_processes

        rep.processes = cleanup_processes(group=group, registry_dir=registry_dir, dry_run=dry_run, force=force)
    return rep
