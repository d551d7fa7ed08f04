"""The LongBench v2 breakdown of a report: accuracy per cell overall, per difficulty, per length split
(short / medium / long), per domain and per sub-domain, beside the cell's full-cache baseline.

The baseline's accuracy is taken on the same example set as the cell's (paired by example and repeat),
so a cell that lost examples (an empty response is left out, like pred.py leaves it out) is not compared
with more than it answered. One row per cell: the tables grow downwards with the study and stay a fixed
width (difficulty, length and the six domains; sub-domains in their own table), and the Δ chart is one
row per compressed cell as well."""

from __future__ import annotations

import html
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from kv_transition.datasets.longbench_v2 import DIFFICULTIES, DOMAINS, LENGTHS

CHART = "longbench_v2_breakdown.png"
CSV_COLUMNS = ("cell_id", "label", "baseline_cell", "dimension", "value", "domain", "n", "accuracy",
               "baseline_accuracy", "delta_pp")
#: short column names for the six domains (the full name is in the HTML header's title)
DOMAIN_SHORT = {
    "Single-Document QA": "single-doc QA", "Multi-Document QA": "multi-doc QA",
    "Long In-context Learning": "in-context learning", "Long-dialogue History Understanding": "dialogue history",
    "Code Repository Understanding": "code repo", "Long Structured Data Understanding": "structured data",
}


def _acc(rows: list[dict[str, Any]]) -> tuple[int, Optional[float]]:
    return len(rows), (round(100 * sum(float(r["score"]) for r in rows) / len(rows), 1) if rows else None)


def load(conn: sqlite3.Connection, cells: list[str], base_of: dict[str, Optional[str]]) -> dict[str, Any]:
    """{"columns": [(dimension, value)], "domain_of": {sub_domain: domain}, "cells": {cell_id: {(dim, value):
    {"n", "accuracy", "baseline_accuracy", "delta_pp"}}}} over all bins; {} without LongBench v2 scores."""
    from kv_transition.score.longbench_v2 import load_example_rows

    rows = load_example_rows(conn, cells)
    if not rows:
        return {}
    by_cell: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cell[r["cell_id"]].append(r)
    domains = sorted({r["domain"] for r in rows}, key=lambda d: (DOMAINS.index(d) if d in DOMAINS else 99, d))
    domain_of = {r["sub_domain"]: r["domain"] for r in rows}
    subs = sorted(domain_of, key=lambda s: (domains.index(domain_of[s]), s))
    columns = ([("overall", "all")] + [("difficulty", d) for d in DIFFICULTIES]
               + [("length", v) for v in LENGTHS] + [("domain", d) for d in domains] + [("sub_domain", s) for s in subs])
    key_of = {"difficulty": "difficulty", "length": "length_split", "domain": "domain", "sub_domain": "sub_domain"}

    def pick(rs: list[dict[str, Any]], dim: str, value: str) -> list[dict[str, Any]]:
        return rs if dim == "overall" else [r for r in rs if r[key_of[dim]] == value]

    out: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for cid, rs in by_cell.items():
        base = base_of.get(cid)
        mine = {(r["example_id"], r["repeat"]) for r in rs}
        brs = [r for r in by_cell.get(base, []) if (r["example_id"], r["repeat"]) in mine] if base and base != cid else []
        cols: dict[tuple[str, str], dict[str, Any]] = {}
        for dim, value in columns:
            n, acc = _acc(pick(rs, dim, value))
            if not n:
                continue
            _bn, bacc = _acc(pick(brs, dim, value))
            cols[(dim, value)] = {"n": n, "accuracy": acc, "baseline_accuracy": bacc,
                                  "delta_pp": None if acc is None or bacc is None else round(acc - bacc, 1)}
        out[cid] = cols
    return {"columns": columns, "domain_of": domain_of, "cells": out}


def _main_columns(v2: dict[str, Any]) -> list[tuple[str, str]]:
    return [c for c in v2["columns"] if c[0] != "sub_domain"]


def _sub_columns(v2: dict[str, Any]) -> list[tuple[str, str]]:
    return [c for c in v2["columns"] if c[0] == "sub_domain"]


def _head(col: tuple[str, str]) -> str:
    dim, value = col
    return "overall" if dim == "overall" else DOMAIN_SHORT.get(value, value) if dim == "domain" else value


def _n_of(v2: dict[str, Any], cells: list[dict[str, Any]], col: tuple[str, str]) -> int:
    return max((v2["cells"].get(c["cell_id"], {}).get(col, {}).get("n", 0) for c in cells), default=0)


def _text(v: Optional[dict[str, Any]], is_baseline: bool) -> str:
    if not v or v["accuracy"] is None:
        return "–"
    if is_baseline or v["delta_pp"] is None:
        return f"{v['accuracy']:.1f}"
    return f"{v['accuracy']:.1f} ({v['delta_pp']:+.1f})".replace("-", "−")


def csv_rows(data: Any) -> list[dict[str, Any]]:
    v2 = data.v2
    if not v2:
        return []
    out = []
    for c in data.ordered_cells():
        base = (data.transitions.get(c["cell_id"]) or {}).get("baseline_cell")
        for col in v2["columns"]:
            v = v2["cells"].get(c["cell_id"], {}).get(col)
            if v is None:
                continue
            out.append({"cell_id": c["cell_id"], "label": c["label"], "baseline_cell": base, "dimension": col[0],
                        "value": col[1], "domain": v2["domain_of"].get(col[1]) if col[0] == "sub_domain" else None,
                        **v})
    return out


def _cells(data: Any) -> list[dict[str, Any]]:
    return [c for c in data.ordered_cells() if c["cell_id"] in data.v2["cells"]]


def markdown(data: Any) -> list[str]:
    if not data.v2:
        return []
    from kv_transition.report.build import _md_table

    cells = _cells(data)
    out = ["## LongBench v2 accuracy (%, over all bins)", "",
           "Per difficulty, length split and domain, as LongBench v2's result.py; in parentheses the difference in "
           "points from the full cache on the same examples.", ""]
    for cols in (_main_columns(data.v2), _sub_columns(data.v2)):
        out += _md_table(["cell"] + [f"{_head(c)} (n={_n_of(data.v2, cells, c)})" for c in cols],
                         [[c["label"]] + [_text(data.v2["cells"][c["cell_id"]].get(col), c["is_baseline"])
                                          for col in cols] for c in cells])
    return out


def html_section(data: Any, chart: Optional[Path]) -> str:
    from kv_transition.report.build import _img, _table

    e = html.escape
    cells = _cells(data)

    def table(tid: str, cols: list[tuple[str, str]]) -> str:
        head = "".join(f"<th title='{e(c[1] if c[0] != 'overall' else 'all examples')}'>{e(_head(c))}<br>"
                       f"<span class='muted'>n={_n_of(data.v2, cells, c)}</span></th>" for c in cols)
        body = []
        for c in cells:
            tds = []
            for col in cols:
                v = data.v2["cells"][c["cell_id"]].get(col)
                bad = (v and not c["is_baseline"] and v["baseline_accuracy"] and v["accuracy"] is not None
                       and v["accuracy"] / v["baseline_accuracy"] < data.threshold)
                tds.append(f"<td class='{'bad' if bad else ''}'>{e(_text(v, c['is_baseline']))}</td>")
            body.append(f"<tr class='{'base' if c['is_baseline'] else ''}'><td>{e(c['label'])}</td>{''.join(tds)}</tr>")
        return (f"<div class='wide'><table id='{tid}'><thead><tr><th>cell</th>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table></div>")

    subs = _sub_columns(data.v2)
    return ("<p class='muted'>Accuracy (%) over all length bins, as LongBench v2's result.py computes it (the share of "
            "answers whose extracted letter is the gold one; an empty response is left out, as pred.py leaves it out). "
            "In parentheses: the difference in points from the cell's full-cache baseline on the same examples; red: "
            f"below {data.threshold:.0%} of the baseline. Column headers give n (examples × repeats).</p>"
            + table("longbench-v2", _main_columns(data.v2))
            + (_img(chart, "Accuracy difference from the full cache (points), per cell × category") if chart else "")
            + (f"<details><summary>Per sub-domain ({len(subs)})</summary>{table('longbench-v2-sub', subs)}</details>"
               if subs else ""))


def chart(data: Any, out: Path) -> Optional[Path]:
    """The Δ heatmap as ``longbench_v2_breakdown.png`` in ``out``, or None (nothing to draw)."""
    fig = chart_figure(data)
    if fig is None:
        return None
    from kv_transition.report.plots import _save

    return _save(fig, out / CHART)


def chart_figure(data: Any) -> Any:
    """Heatmap of the difference from the full cache (points): one row per compressed cell, one column per
    difficulty / length split / domain; the number is printed in each square. None: nothing to draw."""
    if not data.v2:
        return None
    cells = [c for c in _cells(data) if not c["is_baseline"]]
    cols = _main_columns(data.v2)
    grid = [[(data.v2["cells"][c["cell_id"]].get(col) or {}).get("delta_pp") for col in cols] for c in cells]
    if not cells or all(v is None for row in grid for v in row):
        return None
    from kv_transition.report.plots import _plt

    plt = _plt()
    import numpy as np

    arr = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    lim = max(5.0, float(np.nanmax(np.abs(arr))))
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * len(cols) + 2.2, 1.2 + 0.32 * len(cells)))
    im = ax.imshow(arr, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.grid(False)
    ax.set_xticks(range(len(cols)), [_head(c) for c in cols], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(cells)), [c["label"] for c in cells], fontsize=8)
    for i in range(len(cells)):
        for j in range(len(cols)):
            if not np.isnan(arr[i, j]):
                ax.text(j, i, f"{arr[i, j]:+.0f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(arr[i, j]) > 0.6 * lim else "black")
    for j in range(1, len(cols)):  # a line between overall | difficulty | length split | domains
        if cols[j][0] != cols[j - 1][0]:
            ax.axvline(j - 0.5, color="#333333", lw=1.2)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="points vs full cache")
    ax.set_title("LongBench v2: accuracy difference from the full cache", fontsize=10)
    fig.tight_layout()
    return fig
