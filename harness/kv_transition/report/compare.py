"""`kvt report --compare G1 G2`: a before/after view of two experiment groups (two DBs).

Cells are matched by what they measure (engine, method, ratio, budget, KV scope, KV dtype, model); for each
match the page shows the change of the relative score per length bin (and of the absolute score for the
baselines), the two transitions, and which provenance fields differ (image digest, args, attention backend,
model revision, dtype, git sha, config hash)."""

from __future__ import annotations

import base64
import csv
import html
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kv_transition.report.build import _CSS, _atomic_text, _table, _td
from kv_transition.report.data import ReportData, match_key
from kv_transition.report.plots import _META, _plt, _stat, transition_short

PROVENANCE_FIELDS = ("image", "runtime", "args", "attention_backend", "model_revision", "dtype", "kv_dtype", "scope",
                     "git_sha", "config_hash")
COMPARE_COLUMNS = ("label", "cell_a", "cell_b", "bin", "bin_label", "value", "a", "b", "delta", "a_ci_lo", "a_ci_hi",
                   "b_ci_lo", "b_ci_hi", "ci_disjoint", "transition_a", "transition_b", "provenance_changed")


@dataclass
class Pair:
    label: str
    a: dict[str, Any]
    b: dict[str, Any]
    changed: list[str]


@dataclass
class Comparison:
    a: ReportData
    b: ReportData
    pairs: list[Pair]
    only_a: list[dict[str, Any]]
    only_b: list[dict[str, Any]]
    bins: list[dict[str, Any]]          # bins present in both (by label)


def compare(a: ReportData, b: ReportData) -> Comparison:
    ka = {match_key(c): c for c in a.ordered_cells()}
    kb = {match_key(c): c for c in b.ordered_cells()}
    pairs = []
    for c in b.ordered_cells():
        k = match_key(c)
        if k in ka:
            pa, pb = ka[k]["provenance"], c["provenance"]
            changed = [f for f in PROVENANCE_FIELDS if pa.get(f) != pb.get(f)]
            pairs.append(Pair(c["label"], ka[k], c, changed))
    labels_b = {x["label"] for x in b.bins}
    bins = [x for x in a.bins if x["label"] in labels_b]
    return Comparison(a, b, pairs, [c for k, c in ka.items() if k not in kb], [c for k, c in kb.items() if k not in ka],
                      bins)


def _bin_id(data: ReportData, label: str) -> Optional[int]:
    return next((x["bin_id"] for x in data.bins if x["label"] == label), None)


def _vals(data: ReportData, c: dict[str, Any], label: str) -> tuple[Optional[float], Optional[float], Optional[float]]:
    bid = _bin_id(data, label)
    st = _stat(data, c["cell_id"], bid) if bid is not None else None
    if not st:
        return None, None, None
    if c["is_baseline"]:
        return st.get("mean"), st.get("ci_lo"), st.get("ci_hi")
    return st.get("rel"), st.get("rel_ci_lo"), st.get("rel_ci_hi")


def rows(cmp: Comparison) -> list[dict[str, Any]]:
    out = []
    for p in cmp.pairs:
        for x in cmp.bins:
            va, la, ha = _vals(cmp.a, p.a, x["label"])
            vb, lb, hb = _vals(cmp.b, p.b, x["label"])
            disjoint = None
            if None not in (la, ha, lb, hb):
                disjoint = bool(hb < la or ha < lb)
            out.append({"label": p.label, "cell_a": p.a["cell_id"], "cell_b": p.b["cell_id"], "bin": x["bin_id"],
                        "bin_label": x["label"], "value": "score" if p.b["is_baseline"] else "relative score",
                        "a": va, "b": vb, "delta": (vb - va) if va is not None and vb is not None else None,
                        "a_ci_lo": la, "a_ci_hi": ha, "b_ci_lo": lb, "b_ci_hi": hb, "ci_disjoint": disjoint,
                        "transition_a": transition_short(cmp.a, p.a), "transition_b": transition_short(cmp.b, p.b),
                        "provenance_changed": " ".join(p.changed)})
    return out


def delta_heatmap(cmp: Comparison, path: Path) -> Optional[Path]:
    if not cmp.pairs or not cmp.bins:
        return None
    plt = _plt()
    import matplotlib.colors as mcolors
    from matplotlib.patches import Rectangle

    nr, nb = len(cmp.pairs), len(cmp.bins)
    label_w = 0.3 + 0.072 * max(len(p.label) for p in cmp.pairs)
    cw, rh, tw = 1.0, 0.27, 2.4
    width, height = label_w + nb * cw + tw + 0.3, 1.1 + nr * rh + 0.5
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((label_w / width, 0.5 / height, nb * cw / width, nr * rh / height))
    ax.set_xlim(0, nb)
    ax.set_ylim(nr, 0)
    ax.axis("off")
    cmap = plt.get_cmap("PuOr")
    norm = mcolors.TwoSlopeNorm(vmin=-0.5, vcenter=0.0, vmax=0.5)
    by = {(r["label"], r["bin_label"]): r for r in rows(cmp)}
    for i, p in enumerate(cmp.pairs):
        y = i + 0.5
        ax.text(-0.08, y, p.label + (" (baseline)" if p.b["is_baseline"] else ""), ha="right", va="center",
                fontsize=8, fontweight="bold" if p.b["is_baseline"] else "normal")
        for j, x in enumerate(cmp.bins):
            r = by[(p.label, x["label"])]
            d = r["delta"]
            face = "#f2f2f2" if d is None else cmap(norm(max(-0.5, min(0.5, d))))
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=face, edgecolor="white", lw=1))
            if d is not None:
                txt = f"{100 * d:+.0f}" + ("*" if r["ci_disjoint"] else "")
                ax.text(j + 0.5, y, txt, ha="center", va="center", fontsize=8,
                        color="white" if abs(d) > 0.33 else "#111111")
        ta, tb = transition_short(cmp.a, p.a), transition_short(cmp.b, p.b)
        ax.text(nb + 0.08, y, f"{ta}  →  {tb}" if ta != tb else ta, ha="left", va="center", fontsize=7.5)
    for j, x in enumerate(cmp.bins):
        ax.text(j + 0.5, -0.2, x["label"], ha="center", va="bottom", fontsize=8.5, fontweight="bold")
    ax.text(nb + 0.08, -0.2, "transition before → after", ha="left", va="bottom", fontsize=8, fontweight="bold")
    fig.text(0.01, 1 - 0.1 / height, f"Change {cmp.a.group_id} → {cmp.b.group_id}: relative score "
             "(baselines: absolute score), percentage points; * = 95% CIs do not overlap", ha="left", va="top",
             fontsize=9.5, fontweight="bold")
    fig.savefig(path, metadata=_META)
    plt.close(fig)
    return path


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f}"


def _html(cmp: Comparison, png: Optional[Path]) -> str:
    e = html.escape
    head = ["cell"] + [f"{x['label']} before → after (Δ)" for x in cmp.bins] + ["transition before", "transition after",
                                                                                  "provenance changed"]
    rs = rows(cmp)
    by = {(r["label"], r["bin_label"]): r for r in rs}
    trs, cls = [], []
    for p in cmp.pairs:
        cells = [_td(p.label)]
        for x in cmp.bins:
            r = by[(p.label, x["label"])]
            d = r["delta"]
            txt = f"{_fmt(r['a'])} → {_fmt(r['b'])} ({'–' if d is None else f'{100 * d:+.0f}'})"
            klass = "bad" if r["ci_disjoint"] and d is not None and d < 0 else "ok" if r["ci_disjoint"] else ""
            cells.append(_td(txt + (" *" if r["ci_disjoint"] else ""), klass))
        cells += [_td(transition_short(cmp.a, p.a)), _td(transition_short(cmp.b, p.b)),
                  _td(", ".join(p.changed) or "–")]
        trs.append(cells)
        cls.append("base" if p.b["is_baseline"] else "")
    prov = []
    for p in cmp.pairs:
        for f in p.changed:
            prov.append([_td(p.label), _td(f), _td(str(p.a["provenance"].get(f)), "args"),
                         _td(str(p.b["provenance"].get(f)), "args")])
    img = (f"<figure><img alt='delta heatmap' src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>"
           "</figure>") if png else ""
    only = ""
    if cmp.only_a or cmp.only_b:
        only = ("<h2 id='s-unmatched'>Cells in only one group</h2>"
                + _table("unmatched", ["group", "cell"],
                         [[_td(cmp.a.group_id), _td(c["label"])] for c in cmp.only_a]
                         + [[_td(cmp.b.group_id), _td(c["label"])] for c in cmp.only_b]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kv-transition compare — {e(cmp.a.group_id)} vs {e(cmp.b.group_id)}</title>
<style>{_CSS}</style></head><body>
<h1>kv-transition compare — {e(cmp.a.group_id)} → {e(cmp.b.group_id)}</h1>
<p class="muted">before: {e(cmp.a.experiment_name)} ({e(cmp.a.db_path)}) · after: {e(cmp.b.experiment_name)}
({e(cmp.b.db_path)}) · {len(cmp.pairs)} matched cells (same engine, method, ratio, budget, KV scope, KV dtype, model);
values: relative score vs each group's own full cache (baselines: absolute score), ×100.</p>
<h2 id="s-delta">What changed</h2>{img}
{_table("compare", head, trs, cls)}
<h2 id="s-provenance">Provenance differences</h2>
{_table("provenance-diff", ["cell", "field", "before", "after"], prov) if prov else "<p>None: same images, args, "
     "model revision, dtype, git sha and config hash.</p>"}
{only}
</body></html>
"""


def _markdown(cmp: Comparison, png: Optional[Path]) -> str:
    lines = [f"# kv-transition compare — {cmp.a.group_id} → {cmp.b.group_id}", ""]
    if png:
        lines += [f"![delta]({png.name})", ""]
    head = ["cell"] + [x["label"] for x in cmp.bins] + ["transition before", "transition after", "provenance changed"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(r["label"], r["bin_label"]): r for r in rows(cmp)}
    for p in cmp.pairs:
        cells = []
        for x in cmp.bins:
            r = by[(p.label, x["label"])]
            d = r["delta"]
            cells.append(f"{_fmt(r['a'])}→{_fmt(r['b'])} ({'–' if d is None else f'{100 * d:+.0f}'})"
                         + ("*" if r["ci_disjoint"] else ""))
        lines.append(f"| {p.label} | " + " | ".join(cells) + f" | {transition_short(cmp.a, p.a)} | "
                     f"{transition_short(cmp.b, p.b)} | {', '.join(p.changed) or '–'} |")
    lines += ["", f"Only in {cmp.a.group_id}: {', '.join(c['label'] for c in cmp.only_a) or '–'}",
              f"Only in {cmp.b.group_id}: {', '.join(c['label'] for c in cmp.only_b) or '–'}", ""]
    return "\n".join(lines)


def write_compare(a: ReportData, b: ReportData, out: Path) -> tuple[Path, Comparison]:
    """index.html, compare.md, compare.csv, delta_heatmap.png under `out`, moved in when all are built."""
    cmp = compare(a, b)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        png = delta_heatmap(cmp, tmp / "delta_heatmap.png")
        with (tmp / "compare.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(COMPARE_COLUMNS))
            w.writeheader()
            for r in rows(cmp):
                w.writerow(r)
        (tmp / "compare.md").write_text(_markdown(cmp, png), encoding="utf-8")
        _atomic_text(tmp / "index.html", _html(cmp, png))
        for p in sorted(tmp.iterdir()):
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html", cmp
