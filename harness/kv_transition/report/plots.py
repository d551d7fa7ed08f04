"""The report's figures (matplotlib, Agg; deterministic: no timestamps, fixed SVG ids).

Every figure takes its colours and line styles from one `Style` (report/style.py): one colour per method,
one line style + marker per ratio / budget / KV dtype, one marker per engine, the baseline black.
The headline heatmap is also rendered as SVG with one `<title>` tooltip per cell for the HTML page.
"""

from __future__ import annotations

import io
import math
import re
from html import escape
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kv_transition.report.data import ReportData
from kv_transition.report.style import BASELINE_COLOUR, Style, make_style

_META = {"Software": None}
_SVG_META = {"Date": None, "Creator": None}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "axes.grid": True, "grid.alpha": 0.3,
                         "font.size": 9, "svg.hashsalt": "kvt", "svg.fonttype": "none",
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def style_of(data: ReportData) -> Style:
    return make_style(data.cells)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, metadata=_META)
    plt.close(fig)
    return path


def _tok(v: float) -> str:
    if v >= 1024 and float(v).is_integer() and (int(v) & (int(v) - 1)) == 0:
        return f"{int(v) // 1024}k"        # powers of two read as context sizes: 4096 → 4k
    if v >= 1000:
        s = f"{v / 1000:.1f}".rstrip("0").rstrip(".")
        return f"{s}k"
    return f"{v:.0f}"


def _bin_tokens(data: ReportData) -> dict[int, float]:
    """Mean prompt tokens per bin over the cells that have it (the x position of a bin)."""
    acc: dict[int, list[float]] = {}
    for rs in data.stats.values():
        for r in rs:
            if r.get("mean_tokens") is not None:
                acc.setdefault(r["bin_id"], []).append(float(r["mean_tokens"]))
    return {b: sum(v) / len(v) for b, v in acc.items()}


def _stat(data: ReportData, cell_id: str, bin_id: int) -> Optional[dict[str, Any]]:
    return next((r for r in data.stats.get(cell_id, []) if r["bin_id"] == bin_id), None)


def _log_tokens_axis(ax: Any, xs: Sequence[float]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    xs = sorted(x for x in xs if x and x > 0)
    if not xs:
        return
    ax.set_xscale("log", base=2)
    lo, hi = xs[0] / 1.25, xs[-1] * 1.25
    ax.set_xlim(lo, hi)
    ticks = [2 ** k for k in range(int(math.floor(math.log2(lo))), int(math.ceil(math.log2(hi))) + 1)
             if lo <= 2 ** k <= hi]
    if len(ticks) < 2:
        ticks = xs
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tok(v)))


# --------------------------------------------------------------------------------------------------
# 1. the headline heatmap
# --------------------------------------------------------------------------------------------------

ROW_H = 0.27          # inches per row: 8 pt text + CI text with air; 40 rows ≈ 11 in
COL_W = 1.05          # inches per length bin
HEAT_FONT = 8.0


def _rows(data: ReportData) -> list[dict[str, Any]]:
    """Heatmap rows: an engine header row before each engine, then its cells (baseline first)."""
    out: list[dict[str, Any]] = []
    prev_engine, prev_method = None, None
    for c in data.ordered_cells():
        if c["engine"] != prev_engine:
            out.append({"kind": "engine", "engine": c["engine"]})
            prev_engine, prev_method = c["engine"], None
        out.append({"kind": "cell", "cell": c, "first_of_method": c["method"] != prev_method})
        prev_method = c["method"]
    return out


def _cell_text(rel: Optional[float], lo: Optional[float], hi: Optional[float]) -> tuple[str, str]:
    if rel is None:
        return "–", ""
    ci = f"{100 * lo:.0f}–{100 * hi:.0f}" if lo is not None and hi is not None else ""
    return f"{100 * rel:.0f}%", ci


def transition_short(data: ReportData, c: dict[str, Any], t: Optional[dict[str, Any]] = None) -> str:
    """A transition in a few characters: "~2.1k tok", "≤ 1.1k (1st bin)", "> 7.7k →" (beyond the longest bin)."""
    t = (data.transitions.get(c["cell_id"]) or {}) if t is None else t
    if c["is_baseline"]:
        return "baseline"
    if not t:
        return "–"
    if t.get("bin_id") is None:
        return f"> {_tok(float(t['max_tokens_tested']))} →" if t.get("max_tokens_tested") else "none"
    tok = t.get("tokens")
    if tok is None:
        return f"bin {t['bin_id']}"
    if str(t.get("reason", "")).startswith("shortest bin"):
        return f"≤ {_tok(tok)} (1st bin)"
    return f"~{_tok(tok)} tok"


def heatmap_figure(data: ReportData, style: Optional[Style] = None) -> tuple[Any, list[dict[str, Any]]]:
    """Rows = cells grouped engine → method → ratio/budget/dtype; columns = length bins; colour = score
    relative to the full cache; text = relative score and its 95% CI; the transition bin outlined.
    Returns the figure and per-cell tooltip records (gid → text) for the SVG."""
    plt = _plt()
    import matplotlib.colors as mcolors
    from matplotlib.patches import Rectangle

    style = style or style_of(data)
    rows = _rows(data)
    bins = data.bins
    nb, nr = max(1, len(bins)), max(1, len(rows))
    btok = _bin_tokens(data)
    meth_chars = max([len(r["cell"]["method"]) + (11 if r["cell"]["is_baseline"] else 0)
                      for r in rows if r["kind"] == "cell"] + [8])
    knob_chars = max([len(r["cell"]["knob"]) + 2 + (len(r["cell"]["kv_scope"]) + 3 if r["cell"].get("kv_scope") not in
                      (None, "query_aware") else 0) for r in rows if r["kind"] == "cell"] + [6])
    label_w = 0.30 + 0.075 * meth_chars + 0.068 * knob_chars
    trans_w = 1.25
    cbar_w = 0.75
    top, bottom = 0.75, 0.55
    width = label_w + nb * COL_W + trans_w + cbar_w
    height = top + nr * ROW_H + bottom
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((label_w / width, bottom / height, nb * COL_W / width, nr * ROW_H / height))
    ax.set_xlim(0, nb)
    ax.set_ylim(nr, 0)
    ax.axis("off")
    cmap = plt.get_cmap("RdBu")
    norm = mcolors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=1.25)
    tips: list[dict[str, Any]] = []
    fs_small = HEAT_FONT - 1.5
    x_meth = -(label_w - 0.18) / COL_W      # in data units (one column = COL_W inches)
    x_knob = -0.08
    for i, row in enumerate(rows):
        y = i + 0.5
        if row["kind"] == "engine":
            ax.text(x_meth, y + 0.12, row["engine"], ha="left", va="center", fontsize=HEAT_FONT + 0.5,
                    fontweight="bold", gid=f"hm-engine-{i}")
            ax.plot([x_meth, nb + trans_w / COL_W - 0.05], [i + 0.98, i + 0.98], color="#999999", lw=0.6,
                    clip_on=False)
            continue
        c = row["cell"]
        if row["first_of_method"] and i > 0 and rows[i - 1]["kind"] == "cell":
            ax.plot([x_meth, nb], [i, i], color="#dddddd", lw=0.6, clip_on=False)
        if row["first_of_method"]:
            name = c["method"] + (" (baseline)" if c["is_baseline"] else "")
            ax.text(x_meth, y, name, ha="left", va="center", fontsize=HEAT_FONT,
                    color=style.colour(c["method"], c["is_baseline"]), fontweight="bold",
                    gid=f"hm-method-{i}")
        knob = "" if c.get("kv_dtype") and c["kv_dtype"] == c["method"] else c["knob"]
        if c.get("kv_scope") and c["kv_scope"] != "query_aware":
            knob = f"{knob} · {c['kv_scope']}".strip(" ·")
        knob += "†" if c.get("status") not in (None, "completed") else ""
        ax.text(x_knob, y, knob, ha="right", va="center", fontsize=HEAT_FONT, gid=f"hm-rowlabel-{i}")
        t = data.transitions.get(c["cell_id"]) or {}
        for j, b in enumerate(bins):
            st = _stat(data, c["cell_id"], b["bin_id"])
            gid = f"hm-cell-{i}-{j}"
            if st is None:
                ax.add_patch(Rectangle((j, i), 1, 1, facecolor="#f2f2f2", edgecolor="white", lw=1.0, gid=gid))
                ax.text(j + 0.5, y, "no data", ha="center", va="center", fontsize=fs_small, color="#888888")
                tips.append({"gid": gid, "text": f"{c['label']} · bin {b['label']}: no data"})
                continue
            if c["is_baseline"]:
                face = "#e8e8e8"
                main = f"{st['mean']:.2f}" if st.get("mean") is not None else "–"
                ci = (f"{st['ci_lo']:.2f}–{st['ci_hi']:.2f}" if st.get("ci_lo") is not None else "")
            else:
                rel = st.get("rel")
                face = cmap(norm(min(max(rel, 0.0), 1.25))) if rel is not None else "#f2f2f2"
                main, ci = _cell_text(rel, st.get("rel_ci_lo"), st.get("rel_ci_hi"))
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=face, edgecolor="white", lw=1.0, gid=gid))
            lum = 0.2126 * mcolors.to_rgb(face)[0] + 0.7152 * mcolors.to_rgb(face)[1] + 0.0722 * mcolors.to_rgb(face)[2]
            tc = "white" if lum < 0.45 else "#111111"
            ax.text(j + 0.36, y, main, ha="center", va="center", fontsize=HEAT_FONT, color=tc,
                    fontweight="bold" if (not c["is_baseline"] and st.get("rel") is not None
                                          and st["rel"] < data.threshold) else "normal")
            if ci:
                ax.text(j + 0.78, y, ci, ha="center", va="center", fontsize=fs_small, color=tc)
            if t.get("bin_id") == b["bin_id"] and not c["is_baseline"]:
                ax.add_patch(Rectangle((j + 0.03, i + 0.06), 0.94, 0.88, fill=False, edgecolor="black", lw=2.0,
                                       gid=f"hm-transition-{i}"))
            tip = [f"{c['label']} — bin {b['label']} (mean {st['mean_tokens']:,.0f} tokens, n={st['n']})"]
            if st.get("mean") is not None:
                tip.append(f"score {st['mean']:.3f} [95% CI {st['ci_lo']:.3f}, {st['ci_hi']:.3f}]")
            if not c["is_baseline"] and st.get("rel") is not None:
                lo, hi = st.get("rel_ci_lo"), st.get("rel_ci_hi")
                tip.append(f"relative to full cache {st['rel']:.3f}"
                           + (f" [95% CI {lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")
                           + f", {st.get('n_paired') or 0} paired; baseline {st.get('baseline_mean') or 0:.3f}")
            if t.get("bin_id") == b["bin_id"] and not c["is_baseline"]:
                tip.append(f"transition: {t.get('label')}")
            tips.append({"gid": gid, "text": "\n".join(tip)})
        ax.text(nb + 0.1, y, transition_short(data, c), ha="left", va="center", fontsize=HEAT_FONT,
                color="#555555" if c["is_baseline"] else "#111111", gid=f"hm-trans-{i}")
    for j, b in enumerate(bins):
        ax.text(j + 0.5, -0.55, b["label"], ha="center", va="bottom", fontsize=HEAT_FONT + 0.5, fontweight="bold")
        if b["bin_id"] in btok:
            ax.text(j + 0.5, -0.12, f"~{btok[b['bin_id']]:,.0f} tok", ha="center", va="bottom", fontsize=fs_small,
                    color="#555555")
    ax.text(nb + 0.1, -0.12, "transition", ha="left", va="bottom", fontsize=HEAT_FONT, fontweight="bold")
    fig.text(0.01, 1 - 0.12 / height, f"Score kept vs the full cache, per length bin — {data.group_id}",
             ha="left", va="top", fontsize=HEAT_FONT + 3, fontweight="bold")
    # colour bar (relative score) on the right, out of the row labels' way
    cb_h = min(nr * ROW_H, 3.2)
    cax = fig.add_axes(((label_w + nb * COL_W + trans_w + 0.12) / width, (bottom + nr * ROW_H - cb_h) / height,
                        0.14 / width, cb_h / height))
    import matplotlib.cm as cm

    cb = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.set_ticks([0, 0.25, 0.5, 0.75, 1.0, 1.25])
    cb.set_ticklabels(["0%", "25%", "50%", "75%", "100%", "≥125%"])
    cb.ax.axhline(data.threshold, color="black", lw=1.2)
    cb.ax.text(-0.25, data.threshold, f"{data.threshold:.0%}", transform=cb.ax.get_yaxis_transform(), ha="right",
               va="center", fontsize=fs_small)
    cb.ax.tick_params(labelsize=fs_small)
    fig.text(0.01, 0.30 / height,
             "cell: relative score [95% paired bootstrap CI] · baseline rows: absolute score [CI] · "
             f"▭ transition bin (first below {data.threshold:.0%} with CI < 100%) · † incomplete cell",
             ha="left", va="center", fontsize=fs_small, color="#444444")
    return fig, tips


def text_boxes(fig: Any) -> list[tuple[str, float, Any]]:
    """Every visible, non-empty text of a figure as (text, font size in pt, window extent in pixels), after a
    draw with the Agg renderer: what a legibility check measures."""
    from matplotlib.text import Text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible()):
            out.append((t.get_text(), float(t.get_fontsize()), t.get_window_extent(r)))
    return out


def overlapping_texts(fig: Any, tol_px: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of texts whose boxes overlap by more than `tol_px` in both directions."""
    boxes = text_boxes(fig)
    bad = []
    for i in range(len(boxes)):
        a = boxes[i][2]
        for j in range(i + 1, len(boxes)):
            b = boxes[j][2]
            if min(a.x1, b.x1) - max(a.x0, b.x0) > tol_px and min(a.y1, b.y1) - max(a.y0, b.y0) > tol_px:
                bad.append((boxes[i][0], boxes[j][0]))
    return bad


def heatmap(data: ReportData, out: Path, style: Optional[Style] = None) -> Path:
    fig, _ = heatmap_figure(data, style)
    return _save(fig, out / "heatmap.png")


def heatmap_svg(data: ReportData, style: Optional[Style] = None) -> str:
    """The heatmap as inline SVG (text as <text>, one <title> tooltip per cell), no external references."""
    import matplotlib.pyplot as plt

    fig, tips = heatmap_figure(data, style)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=_SVG_META)
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)   # RDF boilerplate, nothing the page needs
    by_gid = {t["gid"]: t["text"] for t in tips}

    def add_title(m: "re.Match[str]") -> str:
        gid = m.group(1)
        return m.group(0) + f"<title>{escape(by_gid[gid])}</title>" if gid in by_gid else m.group(0)

    svg = re.sub(r'<g id="(hm-cell-\d+-\d+)">', add_title, svg)
    return svg.replace("<svg ", '<svg id="heatmap" role="img" aria-label="relative score heatmap" ', 1)


# --------------------------------------------------------------------------------------------------
# 2. transition length vs ratio / budget
# --------------------------------------------------------------------------------------------------


def transition_vs_budget(data: ReportData, out: Path, style: Optional[Style] = None) -> Optional[Path]:
    plt = _plt()
    style = style or style_of(data)
    cells = [c for c in data.ordered_cells() if not c["is_baseline"] and data.transitions.get(c["cell_id"])]
    kinds = [k for k in ("r", "b", "d") if any(c["knob_sort"][0] == k for c in cells)]
    if not kinds:
        return None
    titles = {"r": "compression ratio (fraction of KV removed)", "b": "KV budget (tokens kept)", "d": "KV dtype"}
    ncols = min(2, len(kinds))
    nrows = math.ceil(len(kinds) / ncols)
    fig, axes2 = plt.subplots(nrows, ncols, figsize=(5.8 * ncols + 1.8, 4.0 * nrows + 0.5), squeeze=False)
    axes = [[a for row in axes2 for a in row]]
    for a in axes[0][len(kinds):]:
        a.set_visible(False)
    tested = [float(t["max_tokens_tested"]) for t in data.transitions.values() if t.get("max_tokens_tested")]
    btok = sorted(_bin_tokens(data).values())
    top = max(tested) if tested else (btok[-1] if btok else 1)
    shortest = btok[0] if btok else None
    handles: dict[str, Any] = {}
    for ax, kind in zip(axes[0], kinds):
        sub = [c for c in cells if c["knob_sort"][0] == kind]
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for c in sub:
            groups.setdefault((c["engine"], c["method"], c.get("kv_scope") or ""), []).append(c)
        dtypes = sorted({c["knob_sort"][1] for c in sub}) if kind == "d" else []
        n = len(groups)
        for gi, ((engine, method, scope), cs) in enumerate(sorted(groups.items())):
            col = style.colour(method)
            mk = style.engine_marker.get(engine, "o")
            pts = []
            for c in sorted(cs, key=lambda c: c["knob_sort"]):
                t = data.transitions[c["cell_id"]]
                xv = float(c["knob_sort"][1]) if kind != "d" else float(dtypes.index(c["knob_sort"][1]))
                pts.append((xv, c, t))
            # dodge methods sideways a little so error bars do not sit on top of each other
            span = (max(p[0] for p in pts) - min(p[0] for p in pts)) if len(pts) > 1 else 1.0
            unit = (span or 1.0) * 0.03 if kind != "d" else 0.06
            off = (gi - (n - 1) / 2) * unit
            xs, ys = [], []
            for xv, c, t in pts:
                x = xv + off
                iv = data.intervals.get(c["cell_id"])
                if t.get("bin_id") is None:
                    y = float(t["max_tokens_tested"] or top)
                    ax.annotate("", xy=(x, y * 1.45), xytext=(x, y), arrowprops={"arrowstyle": "-|>", "color": col,
                                                                                 "lw": 1.4})
                    ax.plot([x], [y], marker=mk, mfc="white", mec=col, ms=7, ls="none")
                else:
                    y = float(t["tokens"])
                    if iv:
                        lo, hi = iv[0], iv[1]
                        hi_draw = min(hi, top) if math.isfinite(hi) else top
                        ax.plot([x, x], [min(lo, y), max(hi_draw, y)], color=col, lw=1.2, alpha=0.8)
                        if not math.isfinite(hi):
                            ax.annotate("", xy=(x, top * 1.45), xytext=(x, top),
                                        arrowprops={"arrowstyle": "-|>", "color": col, "lw": 1.0, "ls": ":"})
                    if str(t.get("reason", "")).startswith("shortest bin"):
                        ax.annotate("", xy=(x, y / 1.45), xytext=(x, y),
                                    arrowprops={"arrowstyle": "-|>", "color": col, "lw": 1.0})
                    ax.plot([x], [y], marker=mk, color=col, ms=7, ls="none")
                xs.append(x)
                ys.append(y)
            other_scope = scope not in ("", "query_aware")
            h, = ax.plot(xs, ys, color=col, lw=1.3, alpha=0.9, marker=None, ls=":" if other_scope else "-")
            if other_scope:
                ax.annotate(scope, (xs[-1], ys[-1]), xytext=(4, -10), textcoords="offset points", fontsize=6.5,
                            color=col)
            handles.setdefault(method, h)
        ax.set_yscale("log", base=2)
        from matplotlib.ticker import FuncFormatter, NullLocator

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _tok(v)))
        ax.axhline(top, color="#888888", ls=":", lw=1)
        ax.text(1.0, top * 1.06, f"longest tested {_tok(top)}", fontsize=7, color="#666666", va="bottom",
                ha="right", transform=ax.get_yaxis_transform())
        if shortest:
            ax.axhline(shortest, color="#bbbbbb", ls=":", lw=1)
        ax.set_ylim((shortest or top / 8) / 2.2, top * 2.1)
        if kind == "d":
            ax.set_xticks(range(len(dtypes)), [str(d) for d in dtypes], rotation=20)
        elif kind == "b":
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({float(c["knob_sort"][1]) for c in sub}))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tok(v)))
            ax.xaxis.set_minor_locator(NullLocator())
        else:
            ax.set_xticks(sorted({float(c["knob_sort"][1]) for c in sub}))
        ax.set_xlabel(titles[kind])
        ax.set_ylabel("transition length (prompt tokens)")
    fig.suptitle("Where each method breaks, vs how hard it compresses\nbars: bootstrap 95% interval · ↑ beyond the "
                 "longest bin · ↓ below already in the shortest bin", fontsize=9, x=0.01, ha="left")
    engines = sorted({c["engine"] for c in cells})
    from matplotlib.lines import Line2D

    hs = [Line2D([], [], color=h.get_color(), lw=2, label=m) for m, h in sorted(handles.items())]
    if len(engines) > 1:
        hs += [Line2D([], [], color="#555555", marker=style.engine_marker[e], ls="none", label=e) for e in engines]
    fig.legend(handles=hs, loc="center left", bbox_to_anchor=(1 - 1.7 / fig.get_figwidth(), 0.5), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / fig.get_figwidth(), 1 - 0.55 / fig.get_figheight()))
    fig.subplots_adjust(top=1 - 0.62 / fig.get_figheight())
    return _save(fig, out / "transition_vs_budget.png")


# --------------------------------------------------------------------------------------------------
# 3. small multiples: score vs length per method
# --------------------------------------------------------------------------------------------------


def _series(data: ReportData, cell_id: str, y: str, lo: Optional[str] = None, hi: Optional[str] = None):
    pts = [r for r in data.stats.get(cell_id, []) if r.get(y) is not None and r.get("mean_tokens") is not None]
    pts.sort(key=lambda r: r["mean_tokens"])
    xs = [r["mean_tokens"] for r in pts]
    ys = [r[y] for r in pts]
    los = [r[lo] if lo and r.get(lo) is not None else r[y] for r in pts]
    his = [r[hi] if hi and r.get(hi) is not None else r[y] for r in pts]
    return xs, ys, los, his


def _panels(data: ReportData) -> list[tuple[str, str, list[dict[str, Any]], Optional[dict[str, Any]]]]:
    """(engine, method, its cells, that engine's baseline cell) per non-baseline method."""
    out = []
    base = {c["engine"]: c for c in data.cells if c["is_baseline"]}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in data.ordered_cells():
        if not c["is_baseline"]:
            dtype_method = bool(c.get("kv_dtype")) and c["kv_dtype"] == c["method"]
            groups.setdefault((c["engine"], "KV dtypes" if dtype_method else c["method"]), []).append(c)
    for (e, m), cs in groups.items():
        out.append((e, m, cs, base.get(e)))
    return out


def score_small_multiples(data: ReportData, out: Path, style: Optional[Style] = None) -> Optional[Path]:
    plt = _plt()
    style = style or style_of(data)
    panels = _panels(data)
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    n_leg = 1 + len({c["knob"] for p in panels for c in p[2]})
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.55 * nrows + 0.4 + 0.2 * math.ceil(n_leg / 7)),
                             sharex=True, sharey=True,
                             squeeze=False)
    all_x = [x for c in data.cells for x in _series(data, c["cell_id"], "mean")[0]]
    multi_engine = len({p[0] for p in panels}) > 1
    knobs_seen: dict[str, Any] = {}
    for k, (engine, method, cs, base) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        if base:
            xs, ys, lo, hi = _series(data, base["cell_id"], "mean", "ci_lo", "ci_hi")
            ax.fill_between(xs, lo, hi, color=BASELINE_COLOUR, alpha=0.10, lw=0)
            ax.plot(xs, ys, color=BASELINE_COLOUR, lw=1.6, ls="-", marker=None, label="full cache")
        col = style.colour(method) if method != "KV dtypes" else "#333333"
        for c in cs:
            xs, ys, lo, hi = _series(data, c["cell_id"], "mean", "ci_lo", "ci_hi")
            if not xs:
                continue
            yerr = [[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]]
            ax.errorbar(xs, ys, yerr=yerr, color=style.colour(c["method"]), ls=style.linestyle(c["knob"]),
                        marker=style.marker(c["knob"]), ms=4, lw=1.5, capsize=2, elinewidth=0.8,
                        label=c["knob"].replace("kv=", "") if method == "KV dtypes" else None)
            if method != "KV dtypes":
                knobs_seen.setdefault(c["knob"], None)
        if method == "KV dtypes":
            ax.legend(fontsize=6.5, loc="lower left", frameon=False)
        ax.set_title(f"{engine}/{method}" if multi_engine else method, fontsize=9.5, color=col, fontweight="bold")
        ax.set_ylim(-0.04, 1.06)
        _log_tokens_axis(ax, all_x)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    for r in range(nrows):
        axes[r][0].set_ylabel("score")
    for k in range(len(panels)):
        if k + ncols >= len(panels):   # the lowest visible panel of its column carries the x axis
            axes[k // ncols][k % ncols].set_xlabel("prompt tokens (bin mean)")
            axes[k // ncols][k % ncols].xaxis.set_tick_params(labelbottom=True)
    from matplotlib.lines import Line2D

    hs = [Line2D([], [], color=BASELINE_COLOUR, lw=1.6, label="full cache (band: 95% CI)")]
    hs += [Line2D([], [], color="#555555", ls=style.linestyle(kn), marker=style.marker(kn), ms=4, label=kn or "—")
           for kn in sorted(knobs_seen, key=lambda s: [x for x in style.knob_style].index(s)
                            if s in style.knob_style else 99)]
    lcols = min(len(hs), 7)
    fig.legend(handles=hs, loc="lower center", ncol=lcols, fontsize=8, frameon=False)
    fig.suptitle("Score vs context length, one panel per method (the full-cache baseline in every panel; "
                 "bars: 95% bootstrap CI)", fontsize=9.5, x=0.01, ha="left")
    fig.tight_layout(rect=(0, (0.12 + 0.2 * math.ceil(len(hs) / lcols)) / fig.get_figheight(), 1,
                           1 - 0.25 / fig.get_figheight()))
    return _save(fig, out / "score_small_multiples.png")


# --------------------------------------------------------------------------------------------------
# 4. accuracy vs KV bytes actually held, per length bin, Pareto frontier across engines
# --------------------------------------------------------------------------------------------------


def _bytes(v: float) -> str:
    for unit, f in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if v >= f:
            return f"{v / f:.3g} {unit}"
    return f"{v:.0f} B"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated (fewer-or-equal bytes and higher-or-equal score, one strictly), by bytes."""
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def memory_pareto(data: ReportData, out: Path, style: Optional[Style] = None) -> Optional[Path]:
    plt = _plt()
    style = style or style_of(data)
    bins = [b for b in data.bins if any(data.memory.get(c["cell_id"], {}).get(b["bin_id"], {}).get("held")
                                        for c in data.cells)]
    if not bins:
        return None
    ncols = min(4, len(bins))
    nrows = math.ceil(len(bins) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.9 * nrows + 0.75), sharey=True, squeeze=False)
    sources: set[str] = set()
    any_masked = False
    for k, b in enumerate(bins):
        ax = axes[k // ncols][k % ncols]
        pts = []
        for c in data.ordered_cells():
            m = data.memory.get(c["cell_id"], {}).get(b["bin_id"])
            st = _stat(data, c["cell_id"], b["bin_id"])
            if not m or not m.get("held") or not st or st.get("mean") is None:
                continue
            sources.add(str(m["source"]))
            col = style.colour(c["method"], c["is_baseline"])
            mk = "*" if c["is_baseline"] else style.engine_marker.get(c["engine"], "o")
            hollow = not str(m["source"]).startswith("kv_bytes")
            ax.errorbar([m["held"]], [st["mean"]], yerr=[[st["mean"] - st["ci_lo"]], [st["ci_hi"] - st["mean"]]],
                        color=col, marker=mk, ms=9 if c["is_baseline"] else 6, mfc="white" if hollow else col,
                        ls="none", elinewidth=0.7, capsize=1.5, alpha=0.9)
            if m.get("masked"):
                any_masked = True
                ax.plot([m["held"]], [st["mean"]], marker="x", color="#d00000", ms=11, mew=1.6, ls="none")
            pts.append((float(m["held"]), float(st["mean"])))
        front = pareto_front(pts)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#777777", lw=1, ls="--",
                    zorder=0)
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _bytes(v)))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"bin {b['label']}", fontsize=9.5)
        ax.set_ylim(-0.04, 1.06)
        ax.set_xlabel("KV bytes held per request")
    for k in range(len(bins), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    for r in range(nrows):
        axes[r][0].set_ylabel("score")
    from matplotlib.lines import Line2D

    methods = sorted({c["method"] for c in data.cells if not c["is_baseline"]})
    hs = [Line2D([], [], color=BASELINE_COLOUR, marker="*", ms=9, ls="none", label="full cache")]
    hs += [Line2D([], [], color=style.colour(m), marker="o", ls="none", label=m) for m in methods]
    engines = sorted({c["engine"] for c in data.cells})
    if len(engines) > 1:
        hs += [Line2D([], [], color="#555555", marker=style.engine_marker[e], ls="none", label=e) for e in engines]
    if any_masked:
        hs.append(Line2D([], [], color="#d00000", marker="x", ms=9, mew=1.6, ls="none", label="masked, not freed"))
    hs.append(Line2D([], [], color="#777777", ls="--", label="Pareto front"))
    fig.legend(handles=hs, loc="lower center", ncol=min(len(hs), 7), fontsize=7.5, frameon=False)
    src = "; ".join(sorted(sources))
    fig.suptitle("Accuracy vs KV memory actually held, per length bin (filled: engine-reported bytes; hollow: "
                 f"derived or telemetry)\nsource: {src}", fontsize=8.5, x=0.01, ha="left")
    fig.tight_layout(rect=(0, (0.1 + 0.2 * math.ceil(len(hs) / 7)) / fig.get_figheight(), 1,
                           1 - 0.3 / fig.get_figheight()))
    return _save(fig, out / "memory_pareto.png")


# --------------------------------------------------------------------------------------------------
# 5. per task × bin heatmap (LongBench, or several synthetic tasks)
# --------------------------------------------------------------------------------------------------


def task_heatmap(data: ReportData, out: Path, style: Optional[Style] = None) -> Optional[Path]:
    if len(data.tasks) < 2 or not data.task_stats:
        return None
    plt = _plt()
    import matplotlib.colors as mcolors

    style = style or style_of(data)
    cells = [c for c in data.ordered_cells() if not c["is_baseline"]]
    if not cells:
        return None
    bins = data.bins
    ncol = len(data.tasks) * len(bins)
    import numpy as np

    m = np.full((len(cells), ncol), np.nan)
    for i, c in enumerate(cells):
        for ti, task in enumerate(data.tasks):
            for st in data.task_stats.get((c["cell_id"], task), []):
                bj = next((j for j, b in enumerate(bins) if b["bin_id"] == st["bin_id"]), None)
                if bj is not None and st.get("rel") is not None:
                    m[i, ti * len(bins) + bj] = st["rel"]
    annotate = ncol <= 16
    cw = 0.55 if annotate else 0.3
    label_w = 0.2 + 0.075 * max(len(c["label"]) for c in cells)
    width = label_w + ncol * cw + 1.2
    bottom = 0.45 if annotate else 0.75
    height = bottom + 1.0 + len(cells) * 0.24
    fig = plt.figure(figsize=(max(width, 6.0), height))
    ax = fig.add_axes((label_w / max(width, 6.0), bottom / height, ncol * cw / max(width, 6.0),
                       len(cells) * 0.24 / height))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#eeeeee")
    norm = mcolors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=1.25)
    ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.grid(False)
    ax.set_yticks(range(len(cells)), [c["label"] for c in cells], fontsize=7.5)
    for i, c in enumerate(cells):
        ax.get_yticklabels()[i].set_color(style.colour(c["method"]))
    ax.set_xticks(range(ncol), [b["label"] for _ in data.tasks for b in bins], fontsize=6.5,
                  rotation=0 if annotate else 90)
    for ti in range(1, len(data.tasks)):
        ax.axvline(ti * len(bins) - 0.5, color="black", lw=1.2)
    for ti, task in enumerate(data.tasks):
        name = task if len(task) <= 12 else task.replace("_", "_\n", 1)
        ax.text((ti + 0.5) * len(bins) - 0.5, -0.7, name, ha="center", va="bottom", fontsize=7,
                fontweight="bold", linespacing=1.0)
    for (ti, task) in enumerate(data.tasks):
        for i, c in enumerate(cells):
            tt = data.task_transitions.get((c["cell_id"], task)) or {}
            bj = next((j for j, b in enumerate(bins) if b["bin_id"] == tt.get("bin_id")), None)
            if bj is not None:
                from matplotlib.patches import Rectangle

                ax.add_patch(Rectangle((ti * len(bins) + bj - 0.46, i - 0.42), 0.92, 0.84, fill=False,
                                       edgecolor="black", lw=1.3))
    if annotate:
        for i in range(len(cells)):
            for j in range(ncol):
                if not np.isnan(m[i, j]):
                    v = m[i, j]
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6.5,
                            color="white" if (v < 0.3 or v > 1.2) else "#111111")
    cax = fig.add_axes(((label_w + ncol * cw + 0.25) / max(width, 6.0), bottom / height, 0.14 / max(width, 6.0),
                        min(len(cells) * 0.24, 2.5) / height))
    import matplotlib.cm as cm

    cb = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.ax.tick_params(labelsize=7)
    fig.text(0.01, 1 - 0.15 / height, "Per task × length bin: score relative to the full cache on the same task "
             "(▭ per-task transition bin)", fontsize=9.5, fontweight="bold", va="top")
    return _save(fig, out / "task_heatmap.png")


# --------------------------------------------------------------------------------------------------
# latency (kept from the first report, with the shared style)
# --------------------------------------------------------------------------------------------------


def latency_vs_length(data: ReportData, out: Path, style: Optional[Style] = None) -> Optional[Path]:
    plt = _plt()
    style = style or style_of(data)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    drew = False
    for c in data.ordered_cells():
        kw = {"color": style.colour(c["method"], c["is_baseline"]), "ls": style.linestyle(c["knob"]),
              "marker": style.marker(c["knob"]), "ms": 3.5, "lw": 1.8 if c["is_baseline"] else 1.1,
              "label": c["label"]}
        xs, ys, _, _ = _series(data, c["cell_id"], "ttft_p50")
        if xs:
            a1.plot(xs, ys, **kw)
            drew = True
        xs, ys, _, _ = _series(data, c["cell_id"], "tpot_p50")
        if xs:
            a2.plot(xs, [y * 1000 for y in ys], **kw)
    if not drew:
        plt.close(fig)
        return None
    all_x = [x for c in data.cells for x in _series(data, c["cell_id"], "mean")[0]]
    for ax in (a1, a2):
        _log_tokens_axis(ax, all_x)
        ax.set_xlabel("prompt tokens (bin mean)")
    a1.set_title("TTFT p50")
    a1.set_ylabel("seconds")
    a2.set_title("TPOT p50")
    a2.set_ylabel("ms / output token")
    n = len(data.cells)
    a2.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, ncol=1 if n <= 20 else 2)
    fig.tight_layout()
    return _save(fig, out / "latency_vs_length.png")


FigureFn = Callable[[ReportData, Path, Optional[Style]], Optional[Path]]
#: PNG figures in the order the report shows them (the heatmap is first and also inline SVG)
ALL: tuple[FigureFn, ...] = (heatmap, transition_vs_budget, score_small_multiples, memory_pareto, task_heatmap,
                             latency_vs_length)
