"""A synthetic recorded study for report tests (a test double of a real GPU study, named as such): one group DB
with 40 cells — vLLM and SGLang KV dtypes, kvpress presses × compression ratios and token budgets, a press that
masks without freeing, a context_only-scope cell, an incomplete cell — on 7 LongBench tasks × 4 length bins.

Scores follow a known model (each cell has a chosen transition length; the score decays past it), written
straight into `scores`; then the real `analyze()` computes analysis_bins and transitions, so the report reads
exactly what the product path would store.

    python -m tests.report.synth_study OUT.sqlite [--cells 40] [--group synth40]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kv_transition.analysis.compute import analyze
from kv_transition.db import connect, insert_many, transaction

NOW = "2026-12-01T12:00:00.000+00:00"
BYTES_PER_TOKEN = 131072          # Llama-3.1-8B, bf16: 32 layers × 8 KV heads × 128 dims × 2 (K, V) × 2 bytes
TASKS = (  # name, language, category, base score of the full cache
    ("qasper", "en", "single_doc_qa", 0.45), ("multifieldqa_zh", "zh", "single_doc_qa", 0.55),
    ("hotpotqa", "en", "multi_doc_qa", 0.50), ("gov_report", "en", "summarization", 0.30),
    ("trec", "en", "few_shot", 0.70), ("passage_retrieval_en", "en", "synthetic", 0.85), ("lcc", "code", "code", 0.60))
BINS = ((0, "0-4k", 0, 4096, 2600), (1, "4k-8k", 4096, 8192, 6000), (2, "8k-16k", 8192, 16384, 12000),
        (3, "16k+", 16384, None, 22000))


def study_cells(n: int = 40) -> list[dict[str, Any]]:
    """Cells with their scoring model: `T` = transition length in tokens (None = never within the study)."""
    cells: list[dict[str, Any]] = []

    def add(engine: str, method: str, T: Optional[float], ratio: Optional[float] = None,
            budget: Optional[int] = None, kv_dtype: Optional[str] = None, scope: str = "query_aware",
            masked: bool = False, incomplete: bool = False) -> None:
        cells.append({"engine": engine, "method": method, "ratio": ratio, "budget": budget, "kv_dtype": kv_dtype,
                      "scope": scope, "T": T, "masked": masked, "incomplete": incomplete})

    add("vllm", "full", None)
    for dt, T in (("fp8_e4m3", None), ("fp8_e5m2", 60000.0), ("fp8", None), ("int4_per_token_head", 11000.0),
                  ("nvfp4", 14000.0)):
        add("vllm", dt, T, kv_dtype=dt)
    add("sglang", "full", None)
    for dt, T in (("fp8_e4m3", None), ("fp8_e5m2", 50000.0)):
        add("sglang", dt, T, kv_dtype=dt)
    add("kvpress", "full", None)
    strength = {"snapkv": 1.6, "pyramidkv": 1.4, "expected_attention": 1.8, "tova": 1.1, "knorm": 0.6,
                "streamingllm": 0.8}
    for m, s in strength.items():
        for r in (0.25, 0.5, 0.75, 0.9):
            if m == "knorm" and r == 0.9:
                continue
            add("kvpress", m, 9000.0 * s * (1 - r) / 0.5, ratio=r)
    for b in (512, 1024, 4096):
        add("kvpress", "snapkv", 9000.0 * b / 1024, budget=b)
    add("kvpress", "adakv_masked", 15000.0, ratio=0.5, masked=True)
    add("kvpress", "adakv_masked", 8000.0, ratio=0.75, masked=True)
    add("kvpress", "tova", 9000.0 * 2.2, budget=2048)
    add("kvpress", "snapkv", 5000.0, ratio=0.5, scope="context_only", incomplete=True)
    return cells[:n]


def _cell_id(c: dict[str, Any], group: str) -> str:
    knob = f".r{c['ratio']:g}" if c["ratio"] is not None else f".b{c['budget']}" if c["budget"] is not None else ""
    h = hashlib.sha256(json.dumps([group, c], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{c['engine']}.{c['method']}{knob}-{h}"


def make_study_db(path: Path, *, n_cells: int = 40, group: str = "synth40", per_task_bin: int = 5, seed: int = 0,
                  n_boot: int = 200, git_sha: str = "0123abcd", shift: float = 1.0,
                  attention_backend: Optional[str] = None, tasks: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """Write the study DB; `shift` scales every transition length (a second group for --compare)."""
    rng = np.random.default_rng(seed)
    conn = connect(path)
    ds = f"longbench-{group}"
    cells = study_cells(n_cells)
    with transaction(conn):
        insert_many(conn, "experiments", [{"group_id": group, "name": f"synthetic study ({len(cells)} cells)",
                                           "created_at": NOW, "updated_at": NOW, "config_json": "{}",
                                           "config_hash": "sha256:" + "c" * 64}])
        insert_many(conn, "datasets", [{"dataset_id": ds, "group_id": group, "source": "longbench",
                                        "header_json": json.dumps({"model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
                                                                   "tokenizer": {"name": "llama-3.1"}}),
                                        "content_hash": "sha256:" + "d" * 64, "manifest_path": "/dev/null",
                                        "n_examples": 0, "n_entries": 0, "created_at": NOW}])
        insert_many(conn, "bins", [{"dataset_id": ds, "bin_id": b, "label": lab, "lo": lo, "hi": hi,
                                    "n_candidates": per_task_bin * len(TASKS), "n_selected": per_task_bin * len(TASKS)}
                                   for b, lab, lo, hi, _ in BINS])
        examples, entries = [], []
        for task, lang, cat, _ in TASKS:
            if tasks is not None and task not in tasks:
                continue
            for b, _, lo, hi, mid in BINS:
                for k in range(per_task_bin):
                    ex_id = f"{task}-{b}-{k}"
                    toks = int(mid * (0.8 + 0.4 * (k + 0.5) / per_task_bin))
                    examples.append({"dataset_id": ds, "example_id": ex_id, "task": task, "question": "q",
                                     "context": "c", "answers_json": json.dumps(["a"]),
                                     "meta_json": json.dumps({"source": "longbench", "task": task, "language": lang,
                                                              "category": cat, "length": int(toks * 0.72),
                                                              "metric": "qa_f1_score"})})
                    entries.append({"dataset_id": ds, "example_id": ex_id, "ordinal": len(entries), "task": task,
                                    "bin_id": b, "prompt": "p", "chat": 1, "add_special_tokens": 0,
                                    "original_tokens": toks, "final_tokens": toks, "truncated": 0,
                                    "max_new_tokens": 64, "question_start": None})
        insert_many(conn, "examples", examples)
        insert_many(conn, "manifest_entries", entries)
        if attention_backend is not None:
            cols = {r[1] for r in conn.execute("PRAGMA table_info(engine_instances)").fetchall()}
            if "attention_backend" not in cols:
                conn.execute("ALTER TABLE engine_instances ADD COLUMN attention_backend TEXT")
        for c in cells:
            cid = _cell_id(c, group)
            c["cell_id"] = cid
            todo = entries if not c["incomplete"] else entries[: len(entries) // 3]
            status = "incomplete" if c["incomplete"] else "completed"
            args = ["--model", "/models/llama", "--dtype", "bfloat16"]
            if c["engine"] in ("vllm", "sglang"):
                args += ["--kv-cache-dtype", c["kv_dtype"] or "auto"]
            spec = {"args": args, "image_ref": f"{c['engine']}/image:1.0", "digest": None}
            inputs = {"model": {"id": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f", "source": "/models"},
                      "engine_cfg": {"dtype": "bfloat16"}, "kv_params": {}}
            conn.execute(
                "INSERT INTO cells(cell_id, group_id, dataset_id, engine, method, compression_ratio, budget, kv_scope,"
                " model_id, repeats, inputs_json, config_json, config_hash, spec_json, status, n_requests, n_ok,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (cid, group, ds, c["engine"], c["method"], c["ratio"], c["budget"], c["scope"],
                 "meta-llama/Llama-3.1-8B-Instruct", 1, json.dumps(inputs), "{}", "sha256:" + "e" * 64,
                 json.dumps(spec), status, len(entries), len(todo), NOW, NOW))
            run_id = conn.execute(
                "INSERT INTO runs(cell_id, runtime, config_hash, host, pid, harness_version, status, started_at, git_sha)"
                " VALUES (?,?,?,?,?,?,?,?,?)", (cid, "docker", "sha256:" + "e" * 64, "h", 1, "0.1.0", status, NOW,
                                                git_sha)).lastrowid
            inst = {"run_id": run_id, "cell_id": cid, "runtime": "docker", "image": f"{c['engine']}/image:1.0",
                    "image_digest": "sha256:" + hashlib.sha256(c["engine"].encode()).hexdigest(),
                    "command_json": "[]", "args_json": json.dumps(args), "env_json": "{}", "gpus_json": "[0]",
                    "gpu_uuids_json": "[]", "pids_json": "[]"}
            if attention_backend is not None:
                inst["attention_backend"] = attention_backend
            insert_many(conn, "engine_instances", [inst])
            base_scores = {}
            resp, scores = [], []
            for e in todo:
                task = e["task"]
                base_p = next(t[3] for t in TASKS if t[0] == task)
                toks = e["final_tokens"]
                p_full = base_p * (1.0 - 0.15 * math.log2(max(toks, 2600) / 2600) / 3)
                T = c["T"] * shift if c["T"] is not None else None
                factor = 1.0 if T is None else 1.0 / (1.0 + math.exp((toks - T) / (0.18 * T)))
                # the same example noise for every cell (paired), plus a little per-cell noise
                u = (int(hashlib.sha256(e["example_id"].encode()).hexdigest()[:8], 16) / 2 ** 32)
                s = float(np.clip(p_full * factor + 0.25 * (u - 0.5) + rng.normal(0, 0.03), 0.0, 1.0))
                base_scores[e["example_id"]] = s
                rid = conn.execute(
                    "INSERT INTO requests(cell_id, dataset_id, example_id, repeat, status, n_attempts, created_at,"
                    " updated_at) VALUES (?,?,?,?,?,?,?,?)", (cid, ds, e["example_id"], 0, "ok", 1, NOW, NOW)).lastrowid
                kv = None
                if c["engine"] == "kvpress":
                    keep = toks if c["method"] == "full" else (
                        int(toks * (1 - c["ratio"])) if c["ratio"] is not None else min(toks, c["budget"]))
                    kv = {"method": c["method"], "kv_tokens_before": toks, "kv_tokens_after": keep,
                          "kv_bytes_before": toks * BYTES_PER_TOKEN,
                          "kv_bytes_after": (toks if c["masked"] else keep) * BYTES_PER_TOKEN,
                          "attn_implementation": "sdpa"}
                    if c["masked"]:
                        kv["freed"] = False
                resp.append({"request_id": rid, "attempt_no": 1, "run_id": run_id, "text": "x", "finish_reason": "stop",
                             "prompt_tokens": toks, "completion_tokens": 16, "total_tokens": toks + 16,
                             "ttft_s": toks / 8000, "tpot_s": 0.012, "e2e_s": toks / 8000 + 0.2, "itl_json": "[]",
                             "n_chunks": 16, "kv_applied_json": json.dumps(kv) if kv else None, "streamed": 1,
                             "created_at": NOW})
                scores.append({"request_id": rid, "cell_id": cid, "example_id": e["example_id"], "repeat": 0,
                               "task": task, "metric": "qa_f1_score", "score": s, "flags_json": "[]",
                               "scorer_version": "synthetic", "scored_at": NOW})
            insert_many(conn, "responses", resp)
            insert_many(conn, "scores", scores)
    analyze(conn, threshold=0.95, n_boot=n_boot, seed=0, scorer_version="synthetic")
    conn.close()
    return {"group": group, "cells": cells, "dataset_id": ds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--cells", type=int, default=40)
    ap.add_argument("--group", default="synth40")
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--git-sha", default="0123abcd")
    a = ap.parse_args()
    make_study_db(Path(a.out), n_cells=a.cells, group=a.group, shift=a.shift, git_sha=a.git_sha)


if __name__ == "__main__":
    main()
