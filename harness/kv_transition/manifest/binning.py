"""Token-length bins: explicit edges or quantile edges; half-open [lo, hi), the last bin unbounded,
so every example lands in exactly one bin. Seeded, deterministic selection of up to n per bin."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from kv_transition.config.schema import BinningCfg


@dataclass(frozen=True)
class Bin:
    bin_id: int
    lo: int
    hi: Optional[int]  # None = unbounded

    @property
    def label(self) -> str:
        return f"{_k(self.lo)}-{_k(self.hi)}" if self.hi is not None else f"{_k(self.lo)}+"

    def contains(self, n: int) -> bool:
        return n >= self.lo and (self.hi is None or n < self.hi)


def _k(n: int) -> str:
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    if n >= 1000:
        return f"{n / 1000:.1f}k".replace(".0k", "k")
    return str(n)


def quantile_edges(lengths: Sequence[int], n_bins: int) -> list[int]:
    """Edges at the 1/n … (n-1)/n quantiles (integer tokens, deduplicated), starting at 0."""
    if not lengths:
        return [0]
    qs = np.quantile(np.asarray(lengths, dtype=float), [i / n_bins for i in range(1, n_bins)], method="linear")
    edges = [0]
    for q in qs:
        e = int(np.ceil(q))
        if e > edges[-1]:
            edges.append(e)
    return edges


def make_bins(cfg: BinningCfg, lengths: Sequence[int]) -> list[Bin]:
    edges = list(cfg.edges) if cfg.strategy == "explicit" else quantile_edges(lengths, cfg.n_bins)
    return [Bin(i, lo, edges[i + 1] if i + 1 < len(edges) else None) for i, lo in enumerate(edges)]


def assign(bins: Sequence[Bin], n: int) -> int:
    """The bin id of a token length (bins start at 0, so every n >= 0 has exactly one)."""
    if n < 0:
        raise ValueError(f"negative token length {n}")
    los = [b.lo for b in bins]
    return bins[bisect.bisect_right(los, n) - 1].bin_id


def select(ids_by_bin: dict[int, list[str]], n_per_bin: Optional[int], seed: int) -> dict[int, list[str]]:
    """Up to n_per_bin ids per bin, chosen by a seeded RNG over the sorted ids; result sorted."""
    out: dict[int, list[str]] = {}
    for b, ids in sorted(ids_by_bin.items()):
        pool = sorted(ids)
        if n_per_bin is not None and len(pool) > n_per_bin:
            rng = random.Random(f"{seed}:{b}")
            pool = sorted(rng.sample(pool, n_per_bin))
        out[b] = pool
    return out
