"""`kvt analyze`: scores + telemetry in the DB → per cell × bin statistics and transition lengths,
stored back in the DB (analysis_bins, transitions) with the inputs they were computed from."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

import numpy as np

from kv_transition.analysis.stats import BinStat, ScoreRow, Transition, bin_stats, find_transition, percentile
from kv_transition.db import dumps, insert_many, rows, transaction, utcnow


@dataclass
class AnalysisResult:
    bins: list[dict[str, Any]]
    transitions: list[dict[str, Any]]
    cells: list[dict[str, Any]]


def _baseline_method(engine: str) -> str:
    try:
        from kv_transition.engines.spec import load_engine

        eng = load_engine(engine)
        for name, m in eng.methods.items():
            if m.baseline:
                return name
    except Exception:
        pass
    return "full"


def baselines(cells: list[dict[str, Any]]) -> dict[str, Optional[str]]:
    """cell → the full-cache cell of the same engine, model and dataset (latest if several)."""
    out: dict[str, Optional[str]] = {}
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        by_key[(c["engine"], c["model_id"], c["dataset_id"])].append(c)
    for key, group in by_key.items():
        bm = _baseline_method(key[0])
        cands = [c for c in group if c["method"] == bm and c["compression_ratio"] is None and c["budget"] is None]
        cands.sort(key=lambda c: (c["status"] == "completed", c["updated_at"]))
        base = cands[-1]["cell_id"] if cands else None
        for c in group:
            out[c["cell_id"]] = base
    return out


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def load_score_rows(conn: sqlite3.Connection) -> list[ScoreRow]:
    q = conn.execute(
        """SELECT s.cell_id, s.example_id, s.score, m.bin_id, m.final_tokens
           FROM scores s JOIN requests r USING (request_id)
           JOIN manifest_entries m ON m.dataset_id = r.dataset_id AND m.example_id = r.example_id""").fetchall()
    return [ScoreRow(r["cell_id"], r["example_id"], int(r["bin_id"]), float(r["score"]), int(r["final_tokens"]))
            for r in q]


def _resource_stats(conn: sqlite3.Connection, cell_id: str) -> dict[int, dict[str, Optional[float]]]:
    """Per bin: KV accounting from the engine's reports, latency, throughput, and telemetry peaks in
    the time window of that bin's requests."""
    resp = conn.execute(
        """SELECT m.bin_id, p.run_id, p.ttft_s, p.tpot_s, p.e2e_s, p.prompt_tokens, p.completion_tokens,
                  p.kv_applied_json, p.created_at, p.cache_flag
           FROM responses p JOIN requests r USING (request_id)
           JOIN manifest_entries m ON m.dataset_id = r.dataset_id AND m.example_id = r.example_id
           WHERE r.cell_id = ?""", (cell_id,)).fetchall()
    per: dict[int, list[sqlite3.Row]] = defaultdict(list)
    for r in resp:
        per[int(r["bin_id"])].append(r)
    out: dict[int, dict[str, Optional[float]]] = {}
    for b, rs in per.items():
        kv = [json.loads(r["kv_applied_json"]) for r in rs if r["kv_applied_json"]]

        def kmean(key: str) -> Optional[float]:
            v = [float(k[key]) for k in kv if k.get(key) is not None]
            return float(np.mean(v)) if v else None

        comp = sum(r["completion_tokens"] or 0 for r in rs)
        e2e = sum(r["e2e_s"] or 0 for r in rs)
        lat = [r for r in rs if not r["cache_flag"]]  # a cache-served timing is no prefill measurement
        prefill = [r["prompt_tokens"] / r["ttft_s"] for r in lat if r["ttft_s"] and r["prompt_tokens"]]
        d: dict[str, Optional[float]] = {
            "kv_tokens_before": kmean("kv_tokens_before"), "kv_tokens_after": kmean("kv_tokens_after"),
            "kv_bytes_after": kmean("kv_bytes_after"),
            "ttft_p50": percentile([r["ttft_s"] for r in lat], 50), "ttft_p90": percentile([r["ttft_s"] for r in lat], 90),
            "tpot_p50": percentile([r["tpot_s"] for r in lat], 50), "tpot_p90": percentile([r["tpot_s"] for r in lat], 90),
            "output_tok_s": comp / e2e if e2e > 0 else None,
            "prefill_tok_s": float(np.median(prefill)) if prefill else None,
            "peak_gpu_mem": None, "peak_kv_usage": None, "peak_kv_bytes": None, "peak_rss": None,
        }
        # telemetry peaks inside [first request start, last request end] of this bin, per run
        windows: dict[int, list[float]] = defaultdict(lambda: [float("inf"), float("-inf")])
        for r in rs:
            end = _ts(r["created_at"])
            w = windows[r["run_id"]]
            w[0] = min(w[0], end - (r["e2e_s"] or 0))
            w[1] = max(w[1], end)
        for run_id, (t0, t1) in windows.items():
            g = conn.execute("SELECT t, SUM(mem_used) FROM telemetry_gpu WHERE run_id=? AND t BETWEEN ? AND ?"
                             " GROUP BY t ORDER BY 2 DESC LIMIT 1", (run_id, t0, t1)).fetchone()
            if g and g[1] is not None:
                d["peak_gpu_mem"] = max(d["peak_gpu_mem"] or 0, float(g[1]))
            # the engine's KV gauges: a usage fraction (0..1) and, where exported, bytes — Prometheus names carry
            # the unit, so a name ending in _bytes is bytes and the rest are fractions
            for m, v in conn.execute(
                    "SELECT metric, MAX(value) FROM telemetry_engine_metric WHERE run_id=? AND t BETWEEN ? AND ?"
                    " GROUP BY metric", (run_id, t0, t1)):
                if v is None:
                    continue
                key = "peak_kv_bytes" if str(m).endswith("_bytes") else "peak_kv_usage"
                d[key] = max(d[key] or 0, float(v))
            h = conn.execute("SELECT MAX(proc_rss) FROM telemetry_host WHERE run_id=? AND t BETWEEN ? AND ?",
                             (run_id, t0, t1)).fetchone()
            if h and h[0] is not None:
                d["peak_rss"] = max(d["peak_rss"] or 0, float(h[0]))
        out[b] = d
    return out


def analyze(conn: sqlite3.Connection, *, threshold: float = 0.95, n_boot: int = 1000, seed: int = 0,
            scorer_version: str = "") -> AnalysisResult:
    cells = rows(conn, "SELECT * FROM cells ORDER BY cell_id")
    base_of = baselines(cells)
    score_rows = load_score_rows(conn)
    stats = bin_stats(score_rows, base_of, n_boot=n_boot, seed=seed)
    params = {"threshold": threshold, "bootstrap": n_boot, "seed": seed, "scorer_version": scorer_version}
    now = utcnow()
    by_cell: dict[str, list[BinStat]] = defaultdict(list)
    for s in stats:
        by_cell[s.cell_id].append(s)
    max_tok: dict[str, int] = defaultdict(int)
    for r in score_rows:
        max_tok[r.cell_id] = max(max_tok[r.cell_id], r.tokens)
    bin_rows: list[dict[str, Any]] = []
    res_cache = {c: _resource_stats(conn, c) for c in by_cell}
    for s in stats:
        res = res_cache[s.cell_id].get(s.bin_id, {})
        base = base_of.get(s.cell_id)
        base_res = res_cache.get(base, {}).get(s.bin_id, {}) if base else {}
        saved = None
        for key in ("kv_bytes_after", "kv_tokens_after"):
            if res.get(key) is not None and base_res.get(key):
                saved = 1.0 - float(res[key]) / float(base_res[key])
                break
        bin_rows.append({**s.to_dict(), **res, "kv_saved_frac": saved, "params_json": dumps(params), "computed_at": now})
    trans_rows: list[dict[str, Any]] = []
    for cell, ss in by_cell.items():
        t: Transition = find_transition(ss, threshold, max_tokens=max_tok[cell])
        trans_rows.append({"cell_id": cell, "baseline_cell": base_of.get(cell), "threshold": threshold,
                           "bin_id": t.bin_id, "tokens": t.tokens, "max_tokens_tested": t.max_tokens_tested,
                           "label": t.label, "reason": t.reason, "inputs_json": dumps(t.inputs),
                           "params_json": dumps(params), "computed_at": now})
    with transaction(conn):
        conn.execute("DELETE FROM analysis_bins")
        conn.execute("DELETE FROM transitions")
        insert_many(conn, "analysis_bins", bin_rows)
        insert_many(conn, "transitions", trans_rows)
    return AnalysisResult(bins=bin_rows, transitions=trans_rows, cells=cells)
