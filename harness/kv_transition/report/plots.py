"""PNG plots with matplotlib (Agg, deterministic: no timestamps in the files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kv_transition.report.data import ReportData

_META = {"Software": None}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9,
                         "svg.hashsalt": "kvt"})
    return plt


def _series(data: ReportData, cell_id: str, y: str, lo: str | None = None, hi: str | None = None):
    pts = [r for r in data.stats.get(cell_id, []) if r.get(y) is not None and r.get("mean_tokens") is not None]
    pts.sort(key=lambda r: r["mean_tokens"])
    xs = [r["mean_tokens"] for r in pts]
    ys = [r[y] for r in pts]
    los = [r[lo] if lo and r.get(lo) is not None else r[y] for r in pts]
    his = [r[hi] if hi and r.get(hi) is not None else r[y] for r in pts]
    return xs, ys, los, his


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, metadata=_META)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def score_vs_length(data: ReportData, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in data.ordered_cells():
        xs, ys, lo, hi = _series(data, c["cell_id"], "mean", "ci_lo", "ci_hi")
        if not xs:
            continue
        line, = ax.plot(xs, ys, marker="o", lw=2.2 if c["is_baseline"] else 1.4, label=c["label"],
                        ls="-" if not c["is_baseline"] else "--")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_ylim(-0.03, 1.03)
    return _finish(fig, ax, out / "score_vs_length.png", "Score vs context length (95% bootstrap CI)",
                   "prompt tokens (bin mean)", "score")


def relative_vs_length(data: ReportData, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(1.0, color="grey", lw=1)
    ax.axhline(data.threshold, color="red", lw=1, ls=":", label=f"threshold {data.threshold:.0%}")
    for c in data.ordered_cells():
        if c["is_baseline"]:
            continue
        xs, ys, lo, hi = _series(data, c["cell_id"], "rel", "rel_ci_lo", "rel_ci_hi")
        if not xs:
            continue
        line, = ax.plot(xs, ys, marker="o", label=c["label"])
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        t = data.transitions.get(c["cell_id"])
        if t and t.get("tokens") is not None:
            ax.axvline(t["tokens"], color=line.get_color(), ls="--", lw=1)
            ax.plot([t["tokens"]], [data.threshold], marker="v", ms=9, color=line.get_color())
    return _finish(fig, ax, out / "relative_vs_length.png",
                   "Score relative to the full cache (paired); ▼ = transition",
                   "prompt tokens (bin mean)", "relative score")


def memory_vs_accuracy(data: ReportData, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in data.ordered_cells():
        if c["is_baseline"]:
            continue
        pts = [r for r in data.stats.get(c["cell_id"], []) if r.get("kv_saved_frac") is not None and r.get("rel") is not None]
        if not pts:
            continue
        sc = ax.scatter([r["kv_saved_frac"] for r in pts], [r["rel"] for r in pts], label=c["label"], s=28)
        for r in pts:
            lbl = next((b["label"] for b in data.bins if b["bin_id"] == r["bin_id"]), str(r["bin_id"]))
            ax.annotate(lbl, (r["kv_saved_frac"], r["rel"]), fontsize=6, xytext=(3, 3), textcoords="offset points",
                        color=sc.get_facecolor()[0])
    ax.axhline(data.threshold, color="red", lw=1, ls=":")
    return _finish(fig, ax, out / "memory_vs_accuracy.png", "KV memory saved vs accuracy kept (per length bin)",
                   "KV cache saved vs full (fraction)", "relative score")


def latency_vs_length(data: ReportData, out: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for c in data.ordered_cells():
        xs, ys, _, _ = _series(data, c["cell_id"], "ttft_p50")
        if xs:
            a1.plot(xs, ys, marker="o", label=c["label"])
        xs, ys, _, _ = _series(data, c["cell_id"], "tpot_p50")
        if xs:
            a2.plot(xs, [y * 1000 for y in ys], marker="o", label=c["label"])
    a2.set_title("TPOT p50")
    a2.set_xlabel("prompt tokens (bin mean)")
    a2.set_ylabel("ms / output token")
    return _finish(fig, a1, out / "latency_vs_length.png", "TTFT p50", "prompt tokens (bin mean)", "seconds")


ALL = (score_vs_length, relative_vs_length, memory_vs_accuracy, latency_vs_length)
