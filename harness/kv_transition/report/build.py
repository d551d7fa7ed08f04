"""`kvt report`: runs/<exp>/report/{index.html, report.md, *.png, *.csv[, *.parquet]} and a rich summary."""

from __future__ import annotations

import base64
import csv
import html
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kv_transition.report import plots
from kv_transition.report.data import ReportData, bin_value

BIN_COLUMNS = ("cell", "engine", "method", "compression_ratio", "budget", "kv_scope", "bin", "bin_label", "n", "mean",
               "ci_lo", "ci_hi", "mean_tokens", "n_paired", "baseline_mean", "rel", "rel_ci_lo", "rel_ci_hi",
               "kv_tokens_before", "kv_tokens_after", "kv_bytes_after", "kv_saved_frac", "peak_gpu_mem",
               "peak_kv_usage", "peak_rss", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "output_tok_s",
               "prefill_tok_s")
TRANSITION_COLUMNS = ("cell", "engine", "method", "compression_ratio", "budget", "kv_scope", "baseline",
                      "threshold", "transition_bin", "transition_tokens", "max_tokens_tested", "label", "reason")


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


def bin_table_rows(data: ReportData) -> list[dict[str, Any]]:
    labels = {b["bin_id"]: b["label"] for b in data.bins}
    out = []
    for c in data.ordered_cells():
        for r in data.stats.get(c["cell_id"], []):
            out.append({"cell": c["cell_id"], "engine": c["engine"], "method": c["method"],
                        "compression_ratio": c["compression_ratio"], "budget": c["budget"], "kv_scope": c["kv_scope"],
                        "bin": r["bin_id"], "bin_label": labels.get(r["bin_id"], ""),
                        **{k: r.get(k) for k in BIN_COLUMNS[8:]}})
    return out


def transition_rows(data: ReportData) -> list[dict[str, Any]]:
    out = []
    for c in data.ordered_cells():
        t = data.transitions.get(c["cell_id"])
        if not t:
            continue
        out.append({"cell": c["cell_id"], "engine": c["engine"], "method": c["method"],
                    "compression_ratio": c["compression_ratio"], "budget": c["budget"], "kv_scope": c["kv_scope"],
                    "baseline": t["baseline_cell"], "threshold": t["threshold"], "transition_bin": t["bin_id"],
                    "transition_tokens": t["tokens"], "max_tokens_tested": t["max_tokens_tested"],
                    "label": "baseline" if c["is_baseline"] else t["label"], "reason": t["reason"]})
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
                    "status": c["status"]})
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


def _markdown(data: ReportData, summ: list[dict[str, Any]], pngs: list[Path]) -> str:
    bl = [b["label"] for b in data.bins]
    lines = [f"# kv-transition report — {data.group_id}", "", data.experiment_name, "",
             f"Dataset `{data.dataset.get('dataset_id', '')}` ({data.dataset.get('source', '')}), "
             f"model {data.dataset.get('model', {}).get('id', '')}, tokenizer "
             f"{data.dataset.get('tokenizer', {}).get('name', '')}; transition = first length bin whose score "
             f"relative to the full cache is below {data.threshold:.0%} with its 95% CI excluding 100%.", "",
             "| method | transition | " + " | ".join(f"kept {b}" for b in bl) + " | KV saved |",
             "|---|---|" + "---|" * len(bl) + "---|"]
    for r in summ:
        lines.append(f"| {r['label']} | {r['transition']} | " + " | ".join(_pct(r["kept"][b]) for b in bl)
                     + f" | {_pct(r['mem_saved'])} |")
    lines += ["", "| method | " + " | ".join(f"score {b}" for b in bl) + " |", "|---|" + "---|" * len(bl)]
    for r in summ:
        lines.append(f"| {r['label']} | " + " | ".join(_num(r["score"][b], "{:.2f}") for b in bl) + " |")
    lines.append("")
    for p in pngs:
        lines += [f"![{p.stem}]({p.name})", ""]
    lines += ["Tables: `bins.csv`, `transitions.csv` (and `.parquet`).", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.base{color:#666;font-style:italic}
.bad{background:#fde2e2}.ok{background:#e6f4ea}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.muted{color:#666;font-size:12px}"""


def _html(data: ReportData, summ: list[dict[str, Any]], bins_rows: list[dict[str, Any]], pngs: list[Path]) -> str:
    e = html.escape
    bl = [b["label"] for b in data.bins]
    head = "".join(f"<th>kept {e(b)}</th>" for b in bl)
    body = []
    for r in summ:
        cells = "".join(
            f"<td class='{'bad' if r['kept'][b] is not None and r['kept'][b] < data.threshold and not r['is_baseline'] else ''}'>"
            f"{_pct(r['kept'][b])}</td>" for b in bl)
        body.append(f"<tr class='{'base' if r['is_baseline'] else ''}'><td>{e(r['label'])}</td>"
                    f"<td>{e(r['transition'])}</td>{cells}<td>{_pct(r['mem_saved'])}</td></tr>")
    imgs = "".join(
        f"<figure><img alt='{e(p.stem)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        f"<figcaption class='muted'>{e(p.name)}</figcaption></figure>" for p in pngs)
    cols = ("bin_label", "n", "mean", "ci_lo", "ci_hi", "mean_tokens", "rel", "kv_saved_frac", "ttft_p50", "tpot_p50",
            "output_tok_s")
    detail = "".join(
        "<tr>" + f"<td>{e(str(r['engine']))}/{e(str(r['method']))}"
        + (f" r={r['compression_ratio']:g}" if r["compression_ratio"] is not None else "")
        + (f" b={r['budget']}" if r["budget"] is not None else "") + "</td>"
        + "".join(f"<td>{e(_num(r[k]) if isinstance(r[k], float) else str(r[k] if r[k] is not None else '–'))}</td>"
                  for k in cols) + "</tr>" for r in bins_rows)
    ds = data.dataset
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kv-transition report — {e(data.group_id)}</title>
<style>{_CSS}</style></head><body>
<h1>kv-transition report — {e(data.group_id)}</h1>
<p>{e(data.experiment_name)}</p>
<p class="muted">dataset {e(str(ds.get('dataset_id', '')))} ({e(str(ds.get('source', '')))}) · model
{e(str(ds.get('model', {}).get('id', '')))} · manifest {e(str(ds.get('content_hash', ''))[:23])}… ·
transition = first length bin whose score relative to the full cache is below {data.threshold:.0%} with its 95% CI
excluding 100%.</p>
<h2>Where compression starts to cost accuracy</h2>
<table id="summary"><thead><tr><th>method</th><th>transition</th>{head}<th>KV saved</th></tr></thead>
<tbody>{''.join(body)}</tbody></table>
<h2>Plots</h2>
{imgs}
<h2>Per cell and length bin</h2>
<table id="bins"><thead><tr><th>cell</th>{''.join(f'<th>{e(c)}</th>' for c in cols)}</tr></thead>
<tbody>{detail}</tbody></table>
<p class="muted">Exports beside this file: bins.csv, transitions.csv (+ .parquet), report.md.</p>
</body></html>
"""


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(data: ReportData, out: Path) -> ReportFiles:
    out.mkdir(parents=True, exist_ok=True)
    pngs = [fn(data, out) for fn in plots.ALL]
    brow = bin_table_rows(data)
    trow = transition_rows(data)
    csvs = [_write_csv(out / "bins.csv", BIN_COLUMNS, brow), _write_csv(out / "transitions.csv", TRANSITION_COLUMNS, trow)]
    for name, rows, cols in (("bins", brow, BIN_COLUMNS), ("transitions", trow, TRANSITION_COLUMNS)):
        p = _write_parquet(out / f"{name}.parquet", rows, cols)
        if p:
            csvs.append(p)
    summ = summary_rows(data)
    md = out / "report.md"
    _atomic_text(md, _markdown(data, summ, pngs))
    page = out / "index.html"
    _atomic_text(page, _html(data, summ, brow, pngs))
    return ReportFiles(out, page, md, pngs, csvs)


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
