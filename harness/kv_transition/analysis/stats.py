"""Pure statistics over scored rows: per-bin means with seeded bootstrap CIs, paired relative
scores against the full-cache baseline, and the transition length. No I/O."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class ScoreRow:
    """One scored response (repeats already averaged per example by the caller or not)."""

    cell_id: str
    example_id: str
    bin_id: int
    score: float
    tokens: int  # the prompt's final token count


@dataclass
class BinStat:
    cell_id: str
    bin_id: int
    n: int
    mean: float
    ci_lo: float
    ci_hi: float
    mean_tokens: float
    baseline_cell: Optional[str] = None
    n_paired: int = 0
    baseline_mean: Optional[float] = None
    rel: Optional[float] = None          # mean(method) / mean(baseline) on paired examples
    rel_ci_lo: Optional[float] = None
    rel_ci_hi: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Transition:
    cell_id: str
    threshold: float
    bin_id: Optional[int]                 # first bin below threshold with CI excluding 1.0; None = none
    tokens: Optional[float]               # interpolated token length of the crossing
    max_tokens_tested: int
    reason: str
    inputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.bin_id is None:
            return f"no transition up to {self.max_tokens_tested:,} tokens"
        if self.tokens is None:
            return f"bin {self.bin_id}"
        if self.reason.startswith("shortest bin"):
            return f"≤ ~{self.tokens:,.0f} tokens (shortest bin)"
        return f"~{self.tokens:,.0f} tokens"


def bootstrap_mean_ci(values: Sequence[float], n_boot: int, seed: int, alpha: float = 0.05) -> tuple[float, float]:
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan)
    if len(x) == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0])) if len(x) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_ratio_ci(method: Sequence[float], base: Sequence[float], n_boot: int, seed: int,
                    alpha: float = 0.05) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """mean(method)/mean(base) over paired examples, with a paired bootstrap CI (resampling examples)."""
    m = np.asarray(method, dtype=float)
    b = np.asarray(base, dtype=float)
    if len(m) == 0 or b.mean() == 0:
        return (None, None, None)
    rel = float(m.mean() / b.mean())
    if len(m) == 1:
        return (rel, rel, rel)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), size=(n_boot, len(m)))
    bm = b[idx].mean(axis=1)
    mm = m[idx].mean(axis=1)
    ok = bm > 0
    ratios = mm[ok] / bm[ok]
    if len(ratios) == 0:
        return (rel, None, None)
    return rel, float(np.quantile(ratios, alpha / 2)), float(np.quantile(ratios, 1 - alpha / 2))


def _by(rows: Iterable[ScoreRow]) -> dict[tuple[str, int], dict[str, list[ScoreRow]]]:
    out: dict[tuple[str, int], dict[str, list[ScoreRow]]] = {}
    for r in rows:
        out.setdefault((r.cell_id, r.bin_id), {}).setdefault(r.example_id, []).append(r)
    return out


def bin_stats(rows: Sequence[ScoreRow], baseline_of: dict[str, Optional[str]], n_boot: int = 1000,
              seed: int = 0) -> list[BinStat]:
    """Per cell × bin: n, mean, bootstrap CI; relative to the cell's baseline paired by example.

    Repeats of one example are averaged first, so n counts examples.
    """
    grouped = _by(rows)
    per_example = {k: {eid: float(np.mean([r.score for r in rs])) for eid, rs in v.items()} for k, v in grouped.items()}
    tokens = {k: float(np.mean([rs[0].tokens for rs in v.values()])) for k, v in grouped.items()}
    out: list[BinStat] = []
    for (cell, b), scores in sorted(per_example.items()):
        vals = [scores[e] for e in sorted(scores)]
        lo, hi = bootstrap_mean_ci(vals, n_boot, seed)
        st = BinStat(cell, b, len(vals), float(np.mean(vals)), lo, hi, tokens[(cell, b)])
        base = baseline_of.get(cell)
        if base is not None and (base, b) in per_example:
            bscores = per_example[(base, b)]
            common = sorted(set(scores) & set(bscores))
            st.baseline_cell = base
            st.n_paired = len(common)
            if common:
                st.baseline_mean = float(np.mean([bscores[e] for e in common]))
                st.rel, st.rel_ci_lo, st.rel_ci_hi = paired_ratio_ci(
                    [scores[e] for e in common], [bscores[e] for e in common], n_boot, seed)
        out.append(st)
    return out


def find_transition(stats: Sequence[BinStat], threshold: float = 0.95, max_tokens: Optional[int] = None) -> Transition:
    """The first bin (by length) whose relative score is below `threshold` with its CI excluding 1.0.

    The interpolated length is where the relative-score curve (by mean tokens per bin) crosses the
    threshold between the last bin at/above it and that first failing bin.
    """
    ss = sorted((s for s in stats if s.rel is not None), key=lambda s: s.mean_tokens)
    cell = stats[0].cell_id if stats else ""
    top = max_tokens if max_tokens is not None else int(max((s.mean_tokens for s in stats), default=0))
    inputs = [{"bin_id": s.bin_id, "mean_tokens": s.mean_tokens, "rel": s.rel, "rel_ci_lo": s.rel_ci_lo,
               "rel_ci_hi": s.rel_ci_hi, "n_paired": s.n_paired} for s in ss]
    if not ss:
        return Transition(cell, threshold, None, None, top, "no paired baseline scores", inputs)
    prev: Optional[BinStat] = None
    for s in ss:
        assert s.rel is not None
        below = s.rel < threshold and s.rel_ci_hi is not None and s.rel_ci_hi < 1.0
        if below:
            first = s is ss[0]
            if prev is None or prev.rel is None or prev.rel == s.rel:
                tok = s.mean_tokens
            else:
                f = (prev.rel - threshold) / (prev.rel - s.rel)
                tok = prev.mean_tokens + max(0.0, min(1.0, f)) * (s.mean_tokens - prev.mean_tokens)
            why = f"relative score {s.rel:.3f} < {threshold} (95% CI upper {s.rel_ci_hi:.3f} < 1)"
            return Transition(cell, threshold, s.bin_id, float(tok), top,
                              ("shortest bin already below: " if first else "") + why, inputs)
        if s.rel >= threshold:
            prev = s
    return Transition(cell, threshold, None, None, top, "every bin at or above the threshold (or CI includes 1)", inputs)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.percentile(v, q)) if v else None
