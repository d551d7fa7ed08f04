"""psutil: host CPU/RAM and the engine's process tree (roots = Instance.pids, plus descendants)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import psutil


class HostSampler:
    """Keeps psutil.Process objects across samples so cpu_percent measures the interval since the
    previous sample (the first sample of a new process reads 0)."""

    def __init__(self, pids: Iterable[int] = ()):
        self.roots = [int(p) for p in pids]
        self._procs: dict[int, psutil.Process] = {}
        psutil.cpu_percent(None)  # prime the host counter

    def _tree(self) -> list[psutil.Process]:
        seen: dict[int, psutil.Process] = {}
        for pid in self.roots:
            try:
                root = self._procs.get(pid) or psutil.Process(pid)
                if not root.is_running():
                    continue
                seen[pid] = root
                for ch in root.children(recursive=True):
                    seen.setdefault(ch.pid, self._procs.get(ch.pid) or ch)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self._procs = seen
        return list(seen.values())

    def sample(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        out: dict[str, Any] = {"cpu_percent": psutil.cpu_percent(None), "ram_used": int(vm.total - vm.available),
                               "ram_total": int(vm.total), "proc_cpu_percent": None, "proc_rss": None,
                               "proc_count": None}
        if self.roots:
            cpu = 0.0
            rss = 0
            count = 0
            for p in self._tree():
                try:
                    with p.oneshot():
                        cpu += p.cpu_percent(None)
                        rss += p.memory_info().rss
                    count += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            out.update(proc_cpu_percent=cpu, proc_rss=rss, proc_count=count)
        return out


def alive(pids: Iterable[int]) -> Optional[bool]:
    pids = list(pids)
    if not pids:
        return None
    return any(psutil.pid_exists(p) for p in pids)
