"""Packing engine groups onto disjoint GPU sets — pure functions, shared by `kvt matrix plan` (a
simulation with estimated durations) and the runner (the same choice, made whenever GPUs free up).

Policy: list scheduling with backfill. Pending groups are ordered baseline-first, then by estimated
GPU-time (tp × work, largest first: big jobs do not get stuck behind a tail of small ones); whenever
GPUs are free, every pending group that fits is placed, in that order. A group of tp=n takes an
aligned block of n GPUs when one is free (0-1, 2-3, … for n=2 — the NVLink/PCIe-switch pairs on
common hosts), else the n lowest free ones.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

from kv_transition.errors import ConfigError


@dataclass(frozen=True)
class Job:
    key: str
    n_gpus: int
    work: float = 1.0          # estimated duration (any unit; the plan uses startup + cells)
    baseline: bool = False
    order: int = 0             # position in the matrix (tie-break: stable)


@dataclass(frozen=True)
class Placement:
    key: str
    gpus: tuple[int, ...]
    start: float
    end: float


def priority(jobs: Sequence[Job]) -> list[Job]:
    return sorted(jobs, key=lambda j: (not j.baseline, -(j.n_gpus * j.work), j.order))


def choose_gpus(free: Sequence[int], n: int, inventory: Sequence[int]) -> Optional[tuple[int, ...]]:
    """n GPUs from `free`: an aligned block of the inventory when one is wholly free, else the first n free
    (inventory order); None when fewer than n are free."""
    fs = set(free)
    if n <= 0:
        return ()
    if len(fs) < n:
        return None
    inv = list(inventory)
    if n > 1:
        for i in range(0, len(inv) - n + 1, n):
            block = inv[i:i + n]
            if all(g in fs for g in block):
                return tuple(block)
    return tuple([g for g in inv if g in fs][:n])


def check_fits(jobs: Sequence[Job], inventory: Sequence[int]) -> None:
    for j in jobs:
        if j.n_gpus > len(inventory):
            raise ConfigError(f"{j.key}: needs {j.n_gpus} GPUs (tp) but the inventory has {len(inventory)} "
                              f"({','.join(map(str, inventory)) or 'none'})")


def assign(pending: Sequence[Job], free: Sequence[int], inventory: Sequence[int]) -> list[tuple[Job, tuple[int, ...]]]:
    """What to start now: each pending job (priority order) that fits the free GPUs, with its GPUs."""
    out = []
    left = list(free)
    for j in priority(pending):
        got = choose_gpus(left, j.n_gpus, inventory)
        if got is None:
            continue
        out.append((j, got))
        left = [g for g in left if g not in got]
        if not left:
            break
    return out


def simulate(jobs: Sequence[Job], inventory: Sequence[int]) -> list[Placement]:
    """Event-driven run of `assign` with each job taking `work` time → placements (start order)."""
    check_fits(jobs, inventory)
    pending = list(jobs)
    free = list(inventory)
    running: list[tuple[float, int, Job, tuple[int, ...]]] = []
    out: list[Placement] = []
    t, seq = 0.0, 0
    while pending or running:
        for j, gpus in assign(pending, free, inventory):
            pending.remove(j)
            free = [g for g in free if g not in gpus]
            heapq.heappush(running, (t + j.work, seq, j, gpus))
            seq += 1
            out.append(Placement(j.key, gpus, t, t + j.work))
        if not running:
            break  # nothing fits an empty inventory (check_fits prevents this)
        t, _, j, gpus = heapq.heappop(running)
        free = sorted(set(free) | set(gpus), key=list(inventory).index)
        while running and running[0][0] <= t:
            _, _, _, g2 = heapq.heappop(running)
            free = sorted(set(free) | set(g2), key=list(inventory).index)
    return out


def makespan(placements: Sequence[Placement]) -> float:
    return max((p.end for p in placements), default=0.0)
