"""What a report shows, read from the DB into plain rows (no plotting, no HTML)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Optional

from kv_transition.db import rows


def cell_label(c: dict[str, Any]) -> str:
    s = f"{c['engine']}/{c['method']}"
    if c.get("compression_ratio") is not None:
        s += f" r={c['compression_ratio']:g}"
    if c.get("budget") is not None:
        s += f" b={c['budget']}"
    if c.get("kv_scope") and c["kv_scope"] != "query_aware":
        s += f" ({c['kv_scope']})"
    return s


@dataclass
class ReportData:
    group_id: str
    experiment_name: str
    cells: list[dict[str, Any]]                      # with "label", "is_baseline"
    bins: list[dict[str, Any]]                       # the dataset's bins (label, lo, hi)
    stats: dict[str, list[dict[str, Any]]]           # cell_id → analysis_bins rows by bin
    transitions: dict[str, dict[str, Any]]           # cell_id → transitions row
    dataset: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.95

    def ordered_cells(self) -> list[dict[str, Any]]:
        return sorted(self.cells, key=lambda c: (c["engine"], not c["is_baseline"], c["label"]))


def load_report_data(conn: sqlite3.Connection) -> ReportData:
    exp = conn.execute("SELECT group_id, name FROM experiments ORDER BY updated_at DESC LIMIT 1").fetchone()
    cells = rows(conn, "SELECT * FROM cells WHERE cell_id IN (SELECT cell_id FROM analysis_bins) ORDER BY cell_id")
    trans = {r["cell_id"]: r for r in rows(conn, "SELECT * FROM transitions")}
    base_cells = {t["baseline_cell"] for t in trans.values() if t["baseline_cell"]}
    for c in cells:
        c["label"] = cell_label(c)
        c["is_baseline"] = c["cell_id"] in base_cells
    stats: dict[str, list[dict[str, Any]]] = {}
    for r in rows(conn, "SELECT * FROM analysis_bins ORDER BY cell_id, bin_id"):
        stats.setdefault(r["cell_id"], []).append(r)
    ds_ids = sorted({c["dataset_id"] for c in cells})
    bins: list[dict[str, Any]] = []
    dataset: dict[str, Any] = {}
    if ds_ids:
        bins = rows(conn, "SELECT bin_id, label, lo, hi, n_selected FROM bins WHERE dataset_id=? ORDER BY bin_id",
                    (ds_ids[0],))
        d = conn.execute("SELECT dataset_id, source, header_json, content_hash FROM datasets WHERE dataset_id=?",
                         (ds_ids[0],)).fetchone()
        if d:
            dataset = {"dataset_id": d["dataset_id"], "source": d["source"], "content_hash": d["content_hash"],
                       **{k: v for k, v in json.loads(d["header_json"]).items() if k in ("tokenizer", "model")}}
    threshold = next((t["threshold"] for t in trans.values()), 0.95)
    return ReportData(group_id=exp["group_id"] if exp else "", experiment_name=exp["name"] if exp else "",
                      cells=cells, bins=bins, stats=stats, transitions=trans, dataset=dataset, threshold=threshold)


def bin_value(data: ReportData, cell_id: str, bin_id: int, key: str) -> Optional[float]:
    for r in data.stats.get(cell_id, []):
        if r["bin_id"] == bin_id:
            return r.get(key)
    return None
