"""`kvt report`: runs/<exp>/report/{index.html, report.md, *.png, *.csv[, *.parquet]} and a rich summary.

The HTML page is self-contained (figures inlined: the headline heatmap as SVG with a tooltip per cell, the
others as base64 PNG; no script, no external reference)."""

from __future__ import annotations

import base64
import csv
import html
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from kv_transition.report import longbench_v2 as lbv2
from kv_transition.report import plots
from kv_transition.report.data import ReportData, bin_value

BIN_COLUMNS = ("cell", "engine", "method", "compression_ratio", "budget", "kv_dtype", "kv_scope", "bin", "bin_label",
               "n", "mean", "ci_lo", "ci_hi", "mean_tokens", "n_paired", "baseline_mean", "rel", "rel_ci_lo",
               "rel_ci_hi", "kv_tokens_before", "kv_tokens_after", "kv_bytes_after", "kv_bytes_held",
               "kv_bytes_source", "masked_not_freed", "kv_saved_frac", "peak_gpu_mem", "peak_kv_usage", "peak_rss",
               "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "output_tok_s", "prefill_tok_s")
_STAT_KEYS = ("n", "mean", "ci_lo", "ci_hi", "mean_tokens", "n_paired", "baseline_mean", "rel", "rel_ci_lo",
              "rel_ci_hi", "kv_tokens_before", "kv_tokens_after", "kv_bytes_after", "kv_saved_frac", "peak_gpu_mem",
              "peak_kv_usage", "peak_rss", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "output_tok_s",
              "prefill_tok_s")
TRANSITION_COLUMNS = ("cell", "engine", "method", "compression_ratio", "budget", "kv_dtype", "kv_scope", "baseline",
                      "threshold", "transition_bin", "transition_tokens", "interval_lo", "interval_hi",
                      "p_no_crossing", "max_tokens_tested", "label", "reason")
TASK_COLUMNS = ("cell", "engine", "method", "compression_ratio", "budget", "kv_dtype", "task", "bin", "bin_label", "n",
                "mean", "ci_lo", "ci_hi", "rel", "rel_ci_lo", "rel_ci_hi", "transition_bin", "transition_tokens",
                "transition_label")
PROVENANCE_COLUMNS = ("cell", "status", "n_ok", "n_requests", "image", "runtime", "args", "attention_backend", "model",
                      "model_revision", "scope", "dtype", "kv_dtype", "git_sha", "config_hash", "prefill_share")
FIGURE_NAMES = ("heatmap.png", "transition_vs_budget.png", "score_small_multiples.png", "memory_pareto.png",
                "task_heatmap.png", "latency_vs_length.png", "longbench_v2_breakdown.png",
                # names of the first report's figures, removed when a report is rewritten
                "score_vs_length.png", "relative_vs_length.png", "memory_vs_accuracy.png")


@dataclass
class ReportFiles:
    dir: Path
    html: Path
    markdown: Path
    pngs: list[Path]
    csvs: list[Path]


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _num(v: Optional[float], fmt: str = "{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


def _cell_cols(c: dict[str, Any]) -> dict[str, Any]:
    return {"cell": c["cell_id"], "engine": c["engine"], "method": c["method"],
            "compression_ratio": c["compression_ratio"], "budget": c["budget"], "kv_dtype": c.get("kv_dtype"),
            "kv_scope": c["kv_scope"]}


def bin_table_rows(data: ReportData) -> list[dict[str, Any]]:
    labels = {b["bin_id"]: b["label"] for b in data.bins}
    out = []
    for c in data.ordered_cells():
        for r in data.stats.get(c["cell_id"], []):
            m = data.memory.get(c["cell_id"], {}).get(r["bin_id"], {})
            out.append({**_cell_cols(c), "bin": r["bin_id"], "bin_label": labels.get(r["bin_id"], ""),
                        **{k: r.get(k) for k in _STAT_KEYS}, "kv_bytes_held": m.get("held"),
                        "kv_bytes_source": m.get("source"), "masked_not_freed": m.get("masked")})
    return out


def transition_rows(data: ReportData) -> list[dict[str, Any]]:
    out = []
    for c in data.ordered_cells():
        t = data.transitions.get(c["cell_id"])
        if not t:
            continue
        iv = data.intervals.get(c["cell_id"])
        out.append({**_cell_cols(c), "baseline": t["baseline_cell"], "threshold": t["threshold"],
                    "transition_bin": t["bin_id"], "transition_tokens": t["tokens"],
                    "interval_lo": iv[0] if iv else None,
                    "interval_hi": iv[1] if iv else None,
                    "p_no_crossing": iv[2] if iv else None, "max_tokens_tested": t["max_tokens_tested"],
                    "label": "baseline" if c["is_baseline"] else t["label"], "reason": t["reason"]})
    return out


def task_rows(data: ReportData) -> list[dict[str, Any]]:
    out = []
    for c in data.ordered_cells():
        for task in data.tasks:
            tt = data.task_transitions.get((c["cell_id"], task)) or {}
            for s in data.task_stats.get((c["cell_id"], task), []):
                out.append({**_cell_cols(c), "task": task, "bin": s["bin_id"], "bin_label": data.bin_label(s["bin_id"]),
                            **{k: s.get(k) for k in ("n", "mean", "ci_lo", "ci_hi", "rel", "rel_ci_lo", "rel_ci_hi")},
                            "transition_bin": tt.get("bin_id"), "transition_tokens": tt.get("tokens"),
                            "transition_label": "baseline" if c["is_baseline"] else tt.get("label")})
    return out


def provenance_rows(data: ReportData) -> list[dict[str, Any]]:
    out = []
    for c in data.ordered_cells():
        p = c["provenance"]
        out.append({"cell": c["cell_id"], "label": c["label"], **{k: p.get(k) for k in PROVENANCE_COLUMNS[1:]
                                                                  if k != "args"},
                    "args": " ".join(str(a) for a in p.get("args") or [])})
    return out


def summary_rows(data: ReportData) -> list[dict[str, Any]]:
    """One row per cell: transition, score kept per bin, memory saved (mean over bins)."""
    out = []
    for c in data.ordered_cells():
        t = data.transitions.get(c["cell_id"]) or {}
        kept = {b["label"]: bin_value(data, c["cell_id"], b["bin_id"], "rel") for b in data.bins}
        score = {b["label"]: bin_value(data, c["cell_id"], b["bin_id"], "mean") for b in data.bins}
        saved = [r["kv_saved_frac"] for r in data.stats.get(c["cell_id"], []) if r.get("kv_saved_frac") is not None]
        out.append({"label": c["label"], "is_baseline": c["is_baseline"],
                    "transition": "baseline" if c["is_baseline"] else t.get("label", "–"),
                    "kept": kept, "score": score, "mem_saved": sum(saved) / len(saved) if saved else None,
                    "status": c["status"], "masked": c.get("masked")})
    return out


def _write_csv(path: Path, cols: tuple[str, ...], rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(cols))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
    return path


def _write_parquet(path: Path, rows: list[dict[str, Any]], cols: tuple[str, ...]) -> Optional[Path]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    table = pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in rows])
    pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------------------------- text parts


def _interval_text(data: ReportData, c: dict[str, Any]) -> str:
    iv = data.intervals.get(c["cell_id"])
    if not iv or c["is_baseline"]:
        return "–"
    lo, hi, _ = iv
    first = min((r["mean_tokens"] for r in data.stats.get(c["cell_id"], []) if r.get("mean_tokens")), default=None)
    if first is not None and hi <= first + 0.5:
        return f"≤ {hi:,.0f} (1st bin)"
    hi_s = "beyond the longest bin" if hi == float("inf") else f"{hi:,.0f}"
    return f"{lo:,.0f} – {hi_s}"


def _longbench_cells(data: ReportData) -> list[dict[str, Any]]:
    return [c for c in data.ordered_cells() if c["cell_id"] in data.longbench]


def _lb_tasks(data: ReportData) -> list[str]:
    return sorted({t for s in data.longbench.values() for t in s["tasks"]})


def _lb_categories(data: ReportData) -> list[str]:
    return sorted({k for s in data.longbench.values() for k in s["categories"]})


def _lb_langs(data: ReportData) -> list[str]:
    return sorted({k for s in data.longbench.values() for k in s["avg"]})


def _md_table(head: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _markdown(data: ReportData, summ: list[dict[str, Any]], pngs: list[Path], v2_chart: Optional[Path] = None) -> str:
    bl = [b["label"] for b in data.bins]
    lines = [f"# kv-transition report — {data.group_id}", "", data.experiment_name, "",
             f"Dataset `{data.dataset.get('dataset_id', '')}` ({data.dataset.get('source', '')}), "
             f"model {data.dataset.get('model', {}).get('id', '')}, tokenizer "
             f"{data.dataset.get('tokenizer', {}).get('name', '')}; transition = first length bin whose score "
             f"relative to the full cache is below {data.threshold:.0%} with its 95% CI excluding 100%.", ""]
    by_name = {p.name: p for p in pngs}
    if "heatmap.png" in by_name:
        lines += ["![heatmap](heatmap.png)", ""]
    lines += _md_table(["method", "transition", "95% interval (tokens)"] + [f"kept {b}" for b in bl] + ["KV saved"],
                       [[r["label"] + (" (masked, not freed)" if r.get("masked") else ""), r["transition"],
                         _interval_text(data, c)] + [_pct(r["kept"][b]) for b in bl] + [_pct(r["mem_saved"])]
                        for r, c in zip(summ, data.ordered_cells())])
    lines += _md_table(["method"] + [f"score {b}" for b in bl],
                       [[r["label"]] + [_num(r["score"][b], "{:.2f}") for b in bl] for r in summ])
    for p in pngs:
        if p.name != "heatmap.png":
            lines += [f"![{p.stem}]({p.name})", ""]
    if data.longbench:
        lines += ["## LongBench (×100, as LongBench's eval.py)", ""]
        lines += _longbench_md(data)
    if data.v2:
        lines += lbv2.markdown(data)
        if v2_chart is not None:
            lines += [f"![LongBench v2 breakdown]({v2_chart.name})", ""]
    if len(data.tasks) > 1:
        lines += ["## Per-task transitions", ""]
        lines += _md_table(["cell"] + data.tasks,
                           [[c["label"]] + [plots.transition_short(data, c, data.task_transitions.get(
                               (c["cell_id"], t)) or {}) for t in data.tasks] for c in data.ordered_cells()])
    lines += ["## Provenance", ""]
    lines += _md_table(["cell", "image", "attention", "model@rev", "scope", "dtype", "git sha", "config hash"],
                       [[c["cell_id"], str(c["provenance"]["image"]), str(c["provenance"]["attention_backend"] or "–"),
                         f"{c['provenance']['model']}@{c['provenance']['model_revision'] or '–'}",
                         str(c["provenance"]["scope"]), str(c["provenance"]["dtype"])
                         + (f" / kv {c['kv_dtype']}" if c.get("kv_dtype") else ""),
                         str(c["provenance"]["git_sha"] or "–"), str(c["provenance"]["config_hash"])[:19]]
                        for c in data.ordered_cells()])
    shares = [c["provenance"].get("prefill_share") for c in data.ordered_cells()]
    if any(x is not None for x in shares):
        lines += [f"Prefills per example (engine-reported, kv_press_applied.shared_prefill_with): "
                  f"{sum(x for x in shares if x is not None):.2f} for the {sum(x is not None for x in shares)} cells "
                  "served by a fan-out engine (1 per cell without sharing); per cell: `prefill_share` in "
                  "provenance.csv.", ""]
    lines += ["Tables: `bins.csv`, `transitions.csv`, `tasks.csv`, `provenance.csv`"
              + (", `longbench_v2.csv`" if data.v2 else "") + " (and `.parquet`).", ""]
    return "\n".join(lines)


def _longbench_md(data: ReportData) -> list[str]:
    tasks, cats, langs = _lb_tasks(data), _lb_categories(data), _lb_langs(data)
    cells = _longbench_cells(data)
    out = _md_table(["cell"] + [f"avg ({lang})" for lang in langs] + ["task mean"] + cats + tasks,
                    [[c["label"]] + [_num(data.longbench[c["cell_id"]]["avg"].get(lang), "{:.2f}") for lang in langs]
                     + [_num(data.longbench[c["cell_id"]]["macro"], "{:.2f}")]
                     + [_num(data.longbench[c["cell_id"]]["categories"].get(k), "{:.2f}") for k in cats]
                     + [_num(data.longbench[c["cell_id"]]["tasks"].get(t), "{:.2f}") for t in tasks] for c in cells])
    out += ["LongBench-E view (the dataset's `length` field: words, or characters for Chinese):", ""]
    from kv_transition.analysis.breakdown import LONGBENCH_E_RANGES

    out += _md_table(["cell"] + list(LONGBENCH_E_RANGES),
                     [[c["label"]] + [_num(data.longbench[c["cell_id"]]["e_avg"].get(r), "{:.2f}")
                                      for r in LONGBENCH_E_RANGES] for c in cells])
    return out


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1280px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav{font-size:13px;margin:.8em 0}nav a{margin-right:1em;color:#0a58ca;text-decoration:none}
table{border-collapse:collapse;margin:1em 0;font-size:12.5px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right;vertical-align:top}th{background:#f3f3f3;position:sticky;top:0}
td:first-child,th:first-child{text-align:left}.base{color:#555;font-style:italic}
.bad{background:#fde2e2}.ok{background:#e6f4ea}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
figure{margin:1em 0}#heatmap text{pointer-events:none}figure.svg svg{width:100%;max-width:1180px;height:auto;border:1px solid #eee}
.muted{color:#666;font-size:12px}.tag{font-size:11px;background:#fde2e2;border-radius:3px;padding:0 4px}
td.args{text-align:left;font-family:ui-monospace,monospace;font-size:11px;max-width:420px;word-break:break-all}
td.mono{font-family:ui-monospace,monospace;font-size:11px;text-align:left}.wide{overflow-x:auto}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}"""


def _img(p: Path, caption: str) -> str:
    e = html.escape
    return (f"<figure><img alt='{e(p.stem)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
            f"<figcaption class='muted'>{e(caption)} ({e(p.name)})</figcaption></figure>")


def _table(tid: str, head: list[str], rows: list[list[str]], row_cls: Optional[list[str]] = None) -> str:
    """`rows` hold HTML-safe cell strings (escape before)."""
    body = "".join(f"<tr class='{(row_cls or [''] * len(rows))[i]}'>" + "".join(r) + "</tr>" for i, r in enumerate(rows))
    return (f"<div class='wide'><table id='{tid}'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{body}</tbody></table></div>")


def _td(v: Any, cls: str = "") -> str:
    return f"<td class='{cls}'>{html.escape(str(v))}</td>" if cls else f"<td>{html.escape(str(v))}</td>"


_CAPTIONS = {
    "transition_vs_budget.png": "Transition length per method as a function of compression ratio / budget / KV dtype",
    "score_small_multiples.png": "Absolute score vs prompt length, one panel per method, the full cache in each",
    "memory_pareto.png": "Score vs KV bytes held per request, per length bin; dashed: Pareto front",
    "task_heatmap.png": "Relative score per task and length bin",
    "latency_vs_length.png": "Latency vs prompt length",
}


def _html(data: ReportData, summ: list[dict[str, Any]], bins_rows: list[dict[str, Any]], pngs: list[Path],
          heat_svg: str, v2_chart: Optional[Path] = None) -> str:
    e = html.escape
    by_name = {p.name: p for p in pngs}
    bl = [b["label"] for b in data.bins]
    cells = data.ordered_cells()
    engines = sorted({c["engine"] for c in cells})
    n_methods = len({(c["engine"], c["method"]) for c in cells if not c["is_baseline"]})
    # summary table
    head = ["method", "transition", "95% interval (tokens)"] + [f"kept {b}" for b in bl] + ["KV saved"]
    srows, scls = [], []
    for r, c in zip(summ, cells):
        kept = [f"<td class='{'bad' if r['kept'][b] is not None and r['kept'][b] < data.threshold and not r['is_baseline'] else ''}'>"
                f"{_pct(r['kept'][b])}</td>" for b in bl]
        tag = " <span class='tag'>masked, not freed</span>" if r.get("masked") else ""
        srows.append([f"<td>{e(r['label'])}{tag}</td>", _td(r["transition"]), _td(_interval_text(data, c))] + kept
                     + [_td(_pct(r["mem_saved"]))])
        scls.append("base" if r["is_baseline"] else "")
    sections = []
    sections.append(("heatmap", "Where compression starts to cost accuracy",
                     f"<figure class='svg'>{heat_svg}<figcaption class='muted'>One row per cell (engine → method → "
                     "ratio / budget / KV dtype), one column per length bin; colour and number = score relative to "
                     "the full cache with its 95% paired bootstrap CI; the transition bin is outlined. Hover a cell "
                     "for n, absolute scores and the baseline. Also as heatmap.png.</figcaption></figure>"
                     + _table("summary", head, srows, scls)))
    if "transition_vs_budget.png" in by_name:
        sections.append(("transitions", "Transition length vs ratio / budget",
                         _img(by_name["transition_vs_budget.png"], _CAPTIONS["transition_vs_budget.png"])))
    if "score_small_multiples.png" in by_name:
        sections.append(("per-method", "Score vs length, per method",
                         _img(by_name["score_small_multiples.png"], _CAPTIONS["score_small_multiples.png"])))
    if "memory_pareto.png" in by_name:
        masked = [c["label"] for c in cells if c.get("masked")]
        note = ("<p class='muted'>Masked, not freed (the engine kept fewer tokens but held as many bytes; drawn at "
                "the bytes held): " + e(", ".join(masked)) + "</p>") if masked else (
            "<p class='muted'>No cell reports a press that masks tokens without freeing them "
            "(kv_press_applied: <code>freed</code>/<code>masked</code>, or bytes after ≥ bytes before).</p>")
        sections.append(("memory", "Accuracy vs KV memory actually held",
                         _img(by_name["memory_pareto.png"], _CAPTIONS["memory_pareto.png"]) + note))
    if len(data.tasks) > 1 or data.longbench:
        sections.append(("tasks", "Per task" if len(data.tasks) > 1 else "LongBench", _tasks_html(data, by_name)))
    if data.v2:
        sections.append(("longbench-v2", "LongBench v2 by category", lbv2.html_section(data, v2_chart)))
    if "latency_vs_length.png" in by_name:
        sections.append(("latency", "Latency", _img(by_name["latency_vs_length.png"], _CAPTIONS["latency_vs_length.png"])))
    cols = ("bin_label", "n", "mean", "ci_lo", "ci_hi", "mean_tokens", "rel", "rel_ci_lo", "rel_ci_hi",
            "kv_bytes_held", "kv_saved_frac", "peak_kv_usage", "peak_gpu_mem", "ttft_p50", "tpot_p50", "output_tok_s")
    label = {c["cell_id"]: c["label"] for c in cells}
    drows = [[_td(label[r["cell"]])] + [_td(_num(r[k]) if isinstance(r[k], float) else (r[k] if r[k] is not None else "–"))
                                        for k in cols] for r in bins_rows]
    sections.append(("bins", "Per cell and length bin", _table("bins", ["cell", *cols], drows)))
    sections.append(("provenance", "Provenance", _provenance_html(data)))
    ds = data.dataset
    nav = "".join(f"<a href='#s-{sid}'>{e(title)}</a>" for sid, title, _ in sections)
    body = "".join(f"<h2 id='s-{sid}'>{e(title)}</h2>{content}" for sid, title, content in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kv-transition report — {e(data.group_id)}</title>
<style>{_CSS}</style></head><body>
<h1>kv-transition report — {e(data.group_id)}</h1>
<p>{e(data.experiment_name)}</p>
<p class="muted">{len(cells)} cells · {n_methods} methods · engines {e(', '.join(engines))} ·
{len(data.bins)} length bins · dataset {e(str(ds.get('dataset_id', '')))} ({e(str(ds.get('source', '')))}) · model
{e(str(ds.get('model', {}).get('id', '')))} · manifest {e(str(ds.get('content_hash', ''))[:23])}… ·
transition = first length bin whose score relative to the full cache is below {data.threshold:.0%} with its 95% CI
excluding 100%.</p>
<nav>{nav}</nav>
{body}
<p class="muted">Exports beside this file: heatmap.png and the other figures, bins.csv, transitions.csv, tasks.csv,
provenance.csv (+ .parquet), report.md.</p>
</body></html>
"""


def _tasks_html(data: ReportData, by_name: dict[str, Path]) -> str:
    e = html.escape
    parts = []
    if "task_heatmap.png" in by_name:
        parts.append(_img(by_name["task_heatmap.png"], _CAPTIONS["task_heatmap.png"]))
    cells = data.ordered_cells()
    if len(data.tasks) < 2:
        return "".join(parts) + (_longbench_html(data) if data.longbench else "")
    rows = []
    for c in cells:
        row = [_td(c["label"])]
        for t in data.tasks:
            tt = data.task_transitions.get((c["cell_id"], t))
            txt = plots.transition_short(data, c, tt or {})
            row.append(_td(txt, "bad" if tt and tt.get("bin_id") is not None and not c["is_baseline"] else ""))
        rows.append(row)
    parts.append("<h3>Per-task transitions</h3><p class='muted'>The same rule per task, against the full cache "
                 "on that task: ~ = interpolated crossing, ≤ … (1st bin) = already below in the shortest bin, "
                 "&gt; … → = none up to the longest prompt.</p>" + _table("task-transitions", ["cell", *data.tasks], rows,
                                                          ["base" if c["is_baseline"] else "" for c in cells]))
    if data.longbench:
        parts.append(_longbench_html(data))
    det = []
    for task in data.tasks:
        head = ["cell"] + [f"{b['label']} score" for b in data.bins] + [f"{b['label']} rel" for b in data.bins]
        trs = []
        for c in cells:
            st = {s["bin_id"]: s for s in data.task_stats.get((c["cell_id"], task), [])}
            trs.append([_td(c["label"])]
                       + [_td(_num(st[b["bin_id"]]["mean"], "{:.2f}") if b["bin_id"] in st else "–") for b in data.bins]
                       + [_td(_pct(st[b["bin_id"]]["rel"]) if b["bin_id"] in st and not c["is_baseline"] else "–")
                          for b in data.bins])
        det.append(f"<details><summary>{e(task)}: score and relative score per bin</summary>"
                   + _table(f"task-{task}", head, trs) + "</details>")
    parts.append("<h3>Per task × length bin</h3>" + "".join(det))
    return "".join(parts)


def _longbench_html(data: ReportData) -> str:
    from kv_transition.analysis.breakdown import LONGBENCH_E_RANGES

    tasks, cats, langs = _lb_tasks(data), _lb_categories(data), _lb_langs(data)
    cells = _longbench_cells(data)
    head = (["cell"] + [f"LongBench avg ({lang})" for lang in langs] + [f"vs full ({lang})" for lang in langs]
            + ["task mean"] + cats + tasks)
    base = {c["engine"]: data.longbench.get(c["cell_id"]) for c in cells if c["is_baseline"]}
    rows = []
    for c in cells:
        s = data.longbench[c["cell_id"]]
        b = base.get(c["engine"]) or {}
        vs = []
        for lang in langs:
            mine, theirs = s["avg"].get(lang), (b.get("avg") or {}).get(lang)
            vs.append(_td("–" if c["is_baseline"] or mine is None or not theirs else f"{100 * mine / theirs:.0f}%",
                          "bad" if mine is not None and theirs and not c["is_baseline"]
                          and mine / theirs < data.threshold else ""))
        rows.append([_td(c["label"])] + [_td(_num(s["avg"].get(lang), "{:.2f}")) for lang in langs] + vs
                    + [_td(_num(s["macro"], "{:.2f}"))] + [_td(_num(s["categories"].get(k), "{:.2f}")) for k in cats]
                    + [_td(_num(s["tasks"].get(t), "{:.2f}")) for t in tasks])
    e_head = ["cell"] + list(LONGBENCH_E_RANGES) + [f"{t} {r}" for t in tasks for r in LONGBENCH_E_RANGES]
    e_rows = []
    for c in cells:
        s = data.longbench[c["cell_id"]]
        e_rows.append([_td(c["label"])] + [_td(_num(s["e_avg"].get(r), "{:.2f}")) for r in LONGBENCH_E_RANGES]
                      + [_td(_num((s["e"].get(t) or {}).get(r), "{:.2f}")) for t in tasks for r in LONGBENCH_E_RANGES])
    return ("<h3>LongBench scores (×100)</h3><p class='muted'>As LongBench computes them: per task the mean over its "
            "examples of the best score over the reference answers (eval.py <code>scorer</code>); a category is the "
            "mean of its tasks (columns: all languages); <b>avg</b> is the mean of the category means per language, code tasks counted in "
            "every language (the leaderboard's Avg); task mean = the plain mean over tasks.</p>"
            + _table("longbench", head, rows)
            + "<h3>LongBench-E view</h3><p class='muted'>Examples split by the dataset's own <code>length</code> "
              "field (words; characters for Chinese) at 4,000 and 8,000 as eval.py <code>scorer_e</code> does; "
              "the first three columns average the tasks present in each range.</p>"
            + _table("longbench-e", e_head, e_rows))


def _provenance_html(data: ReportData) -> str:
    rows, cls = [], []
    for c in data.ordered_cells():
        p = c["provenance"]
        status = f"{p.get('status')} ({p.get('n_ok')}/{p.get('n_requests')})"
        rows.append([_td(c["label"]), _td(c["cell_id"], "mono"), _td(status), _td(p["image"], "mono"), _td(p["runtime"]),
                     _td(" ".join(str(a) for a in p.get("args") or []) or "–", "args"),
                     _td(p.get("attention_backend") or "–"),
                     _td(f"{p['model']}" + (f"@{p['model_revision']}" if p.get("model_revision") else " (no revision)")),
                     _td(p["scope"]), _td(p["dtype"] + (f" / KV {p['kv_dtype']}" if p.get("kv_dtype") else "")),
                     _td(p.get("git_sha") or "–", "mono"), _td(str(p["config_hash"])[:19] + "…", "mono"),
                     _td("–" if p.get("prefill_share") is None else f"{p['prefill_share']:.3g}")])
        cls.append("base" if c["is_baseline"] else "")
    return ("<p class='muted'>From the DB: the latest run and engine instance of each cell. Prefills / request: "
            "what the engine reported (kv_press_applied.shared_prefill_with): 1 = its own prefill, 1/k = one "
            "forward pass shared by k requests of the same prompt (fan-out).</p>"
            + _table("provenance", ["cell", "id", "status", "image@digest", "runtime", "args", "attention",
                                    "model@revision", "KV scope", "dtype", "git sha", "config hash",
                                    "prefills / request"], rows, cls))


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(data: ReportData, out: Path) -> ReportFiles:
    """Everything is built in a temporary folder beside `out` and moved in at the end: a failure leaves the
    previous report as it was."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        style = plots.style_of(data)
        pngs = [p for p in (fn(data, tmp, style) for fn in plots.ALL) if p is not None]
        heat_svg = plots.heatmap_svg(data, style)
        brow, trow, krow, prow = bin_table_rows(data), transition_rows(data), task_rows(data), provenance_rows(data)
        tables = (("bins", brow, BIN_COLUMNS), ("transitions", trow, TRANSITION_COLUMNS), ("tasks", krow, TASK_COLUMNS),
                  ("provenance", prow, PROVENANCE_COLUMNS))
        if data.v2:
            tables += (("longbench_v2", lbv2.csv_rows(data), lbv2.CSV_COLUMNS),)
        v2_chart = lbv2.chart(data, tmp)
        csvs = [_write_csv(tmp / f"{name}.csv", cols, rows) for name, rows, cols in tables]
        for name, rows, cols in tables:
            p = _write_parquet(tmp / f"{name}.parquet", rows, cols)
            if p:
                csvs.append(p)
        summ = summary_rows(data)
        (tmp / "report.md").write_text(_markdown(data, summ, pngs, v2_chart), encoding="utf-8")
        (tmp / "index.html").write_text(_html(data, summ, brow, pngs, heat_svg, v2_chart), encoding="utf-8")
        produced = {p.name for p in tmp.iterdir()}
        for name in FIGURE_NAMES:
            if name not in produced and (out / name).exists():
                (out / name).unlink()
        for p in sorted(tmp.iterdir()):
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if v2_chart is not None:
        pngs = [*pngs, v2_chart]
    return ReportFiles(out, out / "index.html", out / "report.md", [out / p.name for p in pngs],
                       [out / p.name for p in csvs])


def summary_table(data: ReportData) -> Any:
    from rich.table import Table

    t = Table(title=f"kv-transition — {data.group_id}: where compression starts to cost accuracy "
                    f"(threshold {data.threshold:.0%})")
    t.add_column("method")
    t.add_column("transition")
    for b in data.bins:
        t.add_column(f"kept {b['label']}", justify="right")
    t.add_column("KV saved", justify="right")
    for r in summary_rows(data):
        style = "dim" if r["is_baseline"] else None
        kept = []
        for b in data.bins:
            v = r["kept"][b["label"]]
            s = _pct(v)
            if v is not None and v < data.threshold and not r["is_baseline"]:
                s = f"[red]{s}[/red]"
            kept.append(s)
        t.add_row(r["label"], r["transition"], *kept, _pct(r["mem_saved"]), style=style)
    return t
