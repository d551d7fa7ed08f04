"""What a report shows, read from the DB into plain rows (no plotting, no HTML)."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from kv_transition.analysis import breakdown
from kv_transition.db import rows


def _fmt_ratio(r: float) -> str:
    return f"{r:g}"


def knob_of(c: dict[str, Any]) -> tuple[str, tuple[str, Any]]:
    """The cell's compression knob as a short label and a sort key: r=0.5 | b=512 | kv=fp8_e4m3 | ''."""
    if c.get("compression_ratio") is not None:
        return f"r={_fmt_ratio(c['compression_ratio'])}", ("r", float(c["compression_ratio"]))
    if c.get("budget") is not None:
        return f"b={c['budget']}", ("b", int(c["budget"]))
    if c.get("kv_dtype"):
        return f"kv={c['kv_dtype']}", ("d", str(c["kv_dtype"]))
    return "", ("", "")


def cell_label(c: dict[str, Any]) -> str:
    s = f"{c['engine']}/{c['method']}"
    if c.get("compression_ratio") is not None:
        s += f" r={c['compression_ratio']:g}"
    if c.get("budget") is not None:
        s += f" b={c['budget']}"
    if c.get("kv_dtype") and c["kv_dtype"] != c["method"]:
        s += f" kv={c['kv_dtype']}"
    if c.get("kv_scope") and c["kv_scope"] != "query_aware":
        s += f" ({c['kv_scope']})"
    return s


def match_key(c: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two cells of different groups 'the same experiment' for --compare."""
    return (c["engine"], c["method"], c.get("compression_ratio"), c.get("budget"), c.get("kv_scope"),
            c.get("kv_dtype"), c.get("model_id"))


def _kv_dtype(args: list[Any]) -> Optional[str]:
    for i, a in enumerate(args):
        a = str(a)
        if a == "--kv-cache-dtype" and i + 1 < len(args):
            v = str(args[i + 1])
            return None if v == "auto" else v
        if a.startswith("--kv-cache-dtype="):
            v = a.split("=", 1)[1]
            return None if v == "auto" else v
    return None


def _loads(s: Optional[str], default: Any) -> Any:
    try:
        return json.loads(s) if s else default
    except (TypeError, ValueError):
        return default


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}


@dataclass
class ReportData:
    group_id: str
    experiment_name: str
    cells: list[dict[str, Any]]                      # with "label", "is_baseline", "knob", provenance…
    bins: list[dict[str, Any]]                       # the dataset's bins (label, lo, hi)
    stats: dict[str, list[dict[str, Any]]]           # cell_id → analysis_bins rows by bin
    transitions: dict[str, dict[str, Any]]           # cell_id → transitions row
    dataset: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.95
    intervals: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # cell → (lo, hi, p_beyond)
    tasks: list[str] = field(default_factory=list)
    task_stats: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    task_transitions: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    longbench: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    db_path: str = ""
    v2: dict[str, Any] = field(default_factory=dict)  # LongBench v2 breakdown (report/longbench_v2.py); {} if none

    def ordered_cells(self) -> list[dict[str, Any]]:
        """engine → baseline first → method → ratio/budget/dtype → scope."""
        rank = {"": 0, "r": 1, "b": 2, "d": 3}
        return sorted(self.cells, key=lambda c: (c["engine"], not c["is_baseline"], c["method"],
                                                 rank[c["knob_sort"][0]], c["knob_sort"][1],
                                                 c.get("kv_scope") not in (None, "query_aware"),
                                                 c.get("kv_scope") or "", c["cell_id"]))

    def bin_label(self, bin_id: int) -> str:
        return next((b["label"] for b in self.bins if b["bin_id"] == bin_id), str(bin_id))

    def cell(self, cell_id: str) -> Optional[dict[str, Any]]:
        return next((c for c in self.cells if c["cell_id"] == cell_id), None)


def _provenance(conn: sqlite3.Connection, cells: list[dict[str, Any]]) -> None:
    inst_cols = _columns(conn, "engine_instances")
    run_cols = _columns(conn, "runs")
    attn_col = "attention_backend" in inst_cols
    for c in cells:
        spec = _loads(c.get("spec_json"), {})
        inputs = _loads(c.get("inputs_json"), {})
        cfg = _loads(c.get("config_json"), {})
        inst = conn.execute(
            "SELECT * FROM engine_instances WHERE cell_id=? ORDER BY instance_id DESC LIMIT 1", (c["cell_id"],)).fetchone()
        run = conn.execute("SELECT * FROM runs WHERE cell_id=? ORDER BY run_id DESC LIMIT 1", (c["cell_id"],)).fetchone()
        inst = dict(inst) if inst else {}
        run = dict(run) if run else {}
        args = _loads(inst.get("args_json"), None) or spec.get("args") or []
        c["kv_dtype"] = _kv_dtype(args)
        image = inst.get("image") or spec.get("image_ref") or inputs.get("image") or ""
        digest = inst.get("image_digest") or spec.get("digest")
        if digest and "@" not in str(image):
            image = f"{image}@{digest}"
        model = inputs.get("model") or {}
        eng_cfg = inputs.get("engine_cfg") or {}
        c["provenance"] = {
            "image": image or "–",
            "runtime": inst.get("runtime") or run.get("runtime") or "–",
            "args": args,
            "attention_backend": (inst.get("attention_backend") if attn_col else None),
            "model": c.get("model_id") or model.get("id") or "–",
            "model_revision": model.get("revision") or (cfg.get("model") or {}).get("revision"),
            "model_source": model.get("source"),
            "scope": c.get("kv_scope") or "–",
            "dtype": eng_cfg.get("dtype") or (cfg.get("engine") or {}).get("dtype") or "–",
            "kv_dtype": c["kv_dtype"],
            "git_sha": run.get("git_sha") if "git_sha" in run_cols else None,
            "harness_version": run.get("harness_version"),
            "config_hash": c.get("config_hash") or "–",
            "status": c.get("status"),
            "n_ok": c.get("n_ok"), "n_requests": c.get("n_requests"),
            "kv_params": inputs.get("kv_params") or {},
            "prefill_share": _prefill_share(conn, c["cell_id"]),
        }


def _prefill_share(conn: sqlite3.Connection, cell_id: str) -> Optional[float]:
    """Prefills the engine ran per answered request of this cell, as it reported them
    (kv_press_applied.shared_prefill_with: 1 = its own prefill, 1/k = one pass shared by k requests);
    None when the engine reports no fan-out (every other engine)."""
    row = conn.execute(
        "SELECT AVG(1.0 / json_extract(p.kv_applied_json, '$.shared_prefill_with')) FROM responses p"
        " JOIN requests q USING(request_id) WHERE q.cell_id = ? AND p.kv_applied_json IS NOT NULL"
        " AND json_extract(p.kv_applied_json, '$.shared_prefill_with') > 0", (cell_id,)).fetchone()
    return round(float(row[0]), 4) if row and row[0] is not None else None


#: bytes per KV element relative to a 16-bit cache, for estimating what a quantized KV cache holds
KV_DTYPE_WIDTH = {"fp8": 0.5, "fp8_e4m3": 0.5, "fp8_e5m2": 0.5, "fp8_per_token_head": 0.5, "int8_per_token_head": 0.5,
                  "int4_per_token_head": 0.25, "nvfp4": 4.5 / 16}


def _bytes_per_token(per: dict[tuple[str, int], list[dict[str, Any]]],
                     cells: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(model, engine dtype) → KV bytes per token at full precision, from engines that report both."""
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    by_id = {c["cell_id"]: c for c in cells}
    for (cid, _), kvs in per.items():
        c = by_id.get(cid)
        if not c:
            continue
        for k in kvs:
            if k.get("kv_bytes_before") and k.get("kv_tokens_before"):
                acc[(c["model_id"], c["provenance"]["dtype"])].append(k["kv_bytes_before"] / k["kv_tokens_before"])
    return {k: sorted(v)[len(v) // 2] for k, v in acc.items()}


def _memory(conn: sqlite3.Connection, data_cells: list[dict[str, Any]],
            stats: dict[str, list[dict[str, Any]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per cell × bin: the KV bytes the engine actually held, where that number came from, and whether the
    press masked tokens without freeing them (from the engine's per-response kv_press_applied report:
    an explicit `freed: false` / `masked: true`, or fewer tokens kept with no fewer bytes held)."""
    per: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in conn.execute(
            """SELECT r.cell_id, m.bin_id, p.kv_applied_json FROM responses p JOIN requests r USING (request_id)
               JOIN manifest_entries m ON m.dataset_id = r.dataset_id AND m.example_id = r.example_id
               WHERE p.kv_applied_json IS NOT NULL""").fetchall():
        kv = _loads(r["kv_applied_json"], None)
        if isinstance(kv, dict):
            per[(r["cell_id"], int(r["bin_id"]))].append(kv)
    out: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    bpt = _bytes_per_token(per, data_cells)
    for c in data_cells:
        for st in stats.get(c["cell_id"], []):
            kvs = per.get((c["cell_id"], st["bin_id"]), [])
            masked = None
            attn = sorted({str(k["attn_implementation"]) for k in kvs if k.get("attn_implementation")})
            if kvs:
                flags = []
                for k in kvs:
                    if k.get("freed") is False or k.get("masked") is True:
                        flags.append(True)
                    elif (k.get("kv_tokens_after") is not None and k.get("kv_tokens_before") is not None
                          and k["kv_tokens_after"] < k["kv_tokens_before"] and k.get("kv_bytes_after") is not None
                          and k.get("kv_bytes_before") is not None and k["kv_bytes_after"] >= k["kv_bytes_before"]):
                        flags.append(True)
                    else:
                        flags.append(False)
                masked = any(flags)
            before = [float(k["kv_bytes_before"]) for k in kvs if k.get("kv_bytes_before") is not None]
            held, source = None, None
            if masked and before:
                held, source = sum(before) / len(before), "kv_bytes_before (masked, not freed)"
            elif st.get("kv_bytes_after") is not None:
                held, source = float(st["kv_bytes_after"]), "kv_bytes_after (engine, per response)"
            elif st.get("peak_kv_bytes") is not None:
                held, source = float(st["peak_kv_bytes"]), "engine KV-bytes gauge (peak)"
            elif (not kvs and st.get("mean_tokens") and (c["model_id"], c["provenance"]["dtype"]) in bpt
                  and (c.get("kv_dtype") is None or c["kv_dtype"] in KV_DTYPE_WIDTH)):
                w = KV_DTYPE_WIDTH.get(c["kv_dtype"], 1.0) if c.get("kv_dtype") else 1.0
                held = float(st["mean_tokens"]) * bpt[(c["model_id"], c["provenance"]["dtype"])] * w
                source = "derived: prompt tokens × bytes/token of the same model × KV dtype width"
            elif st.get("peak_gpu_mem") is not None:
                held, source = float(st["peak_gpu_mem"]), "NVML peak GPU memory (weights + KV pool)"
            out[c["cell_id"]][st["bin_id"]] = {"held": held, "source": source, "masked": masked, "attn": attn,
                                               "nvml_peak": st.get("peak_gpu_mem"),
                                               "kv_usage_peak": st.get("peak_kv_usage")}
    return dict(out)


def load_report_data(conn: sqlite3.Connection, *, n_boot: int = 1000, seed: int = 0,
                     db_path: str = "") -> ReportData:
    exp = conn.execute("SELECT group_id, name FROM experiments ORDER BY updated_at DESC LIMIT 1").fetchone()
    cells = rows(conn, "SELECT * FROM cells WHERE cell_id IN (SELECT cell_id FROM analysis_bins) ORDER BY cell_id")
    trans = {r["cell_id"]: r for r in rows(conn, "SELECT * FROM transitions")}
    base_cells = {t["baseline_cell"] for t in trans.values() if t["baseline_cell"]}
    _provenance(conn, cells)
    for c in cells:
        c["label"] = cell_label(c)
        c["is_baseline"] = c["cell_id"] in base_cells
        c["knob"], c["knob_sort"] = knob_of(c)
        # head-wise masking presses (kvpress adakv, kvzip, dms, ThinK) keep the full cache: say so next to them
        c["masked"] = conn.execute(
            "SELECT 1 FROM responses p JOIN requests r USING (request_id) WHERE r.cell_id = ?"
            " AND p.kv_applied_json LIKE '%\"masked\": true%' LIMIT 1", (c["cell_id"],)).fetchone() is not None
        if c["masked"]:
            c["label"] += " [masked, not freed]"
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
    params = _loads(next((t["params_json"] for t in trans.values()), None), {})
    n_boot = int(params.get("bootstrap", n_boot))
    seed = int(params.get("seed", seed))
    base_of = {c: t["baseline_cell"] for c, t in trans.items()}
    known = {c["cell_id"] for c in cells}
    ex = [e for e in breakdown.load_example_scores(conn) if e.cell_id in known]
    tasks = breakdown.tasks_of(ex)
    task_stats: dict[tuple[str, str], list[dict[str, Any]]] = {}
    task_trans: dict[tuple[str, str], dict[str, Any]] = {}
    if len(tasks) > 1:
        ts = breakdown.task_bin_stats(ex, base_of, n_boot=n_boot, seed=seed)
        task_stats = {k: [s.to_dict() for s in v] for k, v in ts.items()}
        for k, t in breakdown.task_transitions(ts, threshold, ex).items():
            task_trans[k] = {"bin_id": t.bin_id, "tokens": t.tokens, "label": t.label, "reason": t.reason,
                             "max_tokens_tested": t.max_tokens_tested}
    data = ReportData(group_id=exp["group_id"] if exp else "", experiment_name=exp["name"] if exp else "",
                      cells=cells, bins=bins, stats=stats, transitions=trans, dataset=dataset, threshold=threshold,
                      intervals=breakdown.transition_intervals(ex, base_of, threshold, n_boot=n_boot, seed=seed),
                      tasks=tasks, task_stats=task_stats, task_transitions=task_trans,
                      longbench=breakdown.longbench_summary(ex), db_path=db_path)
    data.memory = _memory(conn, cells, stats)
    from kv_transition.report import longbench_v2

    data.v2 = longbench_v2.load(conn, sorted(known), base_of)
    for c in cells:
        if not c["provenance"]["attention_backend"]:
            attn = sorted({a for m in data.memory.get(c["cell_id"], {}).values() for a in m["attn"]})
            c["provenance"]["attention_backend"] = ", ".join(attn) + " (kv_press_applied)" if attn else None
        c["masked"] = any(m["masked"] for m in data.memory.get(c["cell_id"], {}).values())
    return data


def bin_value(data: ReportData, cell_id: str, bin_id: int, key: str) -> Optional[float]:
    for r in data.stats.get(cell_id, []):
        if r["bin_id"] == bin_id:
            return r.get(key)
    return None
