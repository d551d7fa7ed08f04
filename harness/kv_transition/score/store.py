"""`kvt score`: score every recorded response with its task's metric, idempotently.

A score row is keyed by request_id. Rows already scored by the current scorer version are skipped;
a change to the metric code changes the version, so re-scoring after a metric change is one command.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from kv_transition.db import dumps, insert_many, transaction, utcnow
from kv_transition.score import longbench_v2
from kv_transition.score.metrics import TASK_METRIC, score_example

_METRICS_FILE = Path(__file__).with_name("metrics.py")
_V2_FILE = Path(__file__).with_name("longbench_v2.py")


def scorer_version() -> str:
    """A hash of the scoring code: metrics.py (LongBench v1 + synthetic) and longbench_v2.py."""
    h = hashlib.sha256(_METRICS_FILE.read_bytes())
    h.update(_V2_FILE.read_bytes())
    return "sha256:" + h.hexdigest()[:12]


def _score_one(task: str, text: str, answers: list, meta: dict) -> tuple[float, tuple[str, ...], str]:
    """(score, flags, metric name) of one response, by the example's source."""
    if longbench_v2.is_v2(meta):
        score, flags = longbench_v2.score_v2(text, answers)
        return score, flags, longbench_v2.METRIC
    score, flags = score_example(task, text, answers, meta)
    metric = meta.get("metric") if meta.get("source") == "synthetic" else TASK_METRIC.get(task, "?")
    return score, flags, str(metric)


@dataclass
class ScoreReport:
    scored: int
    skipped: int
    flagged: int
    version: str


def _pending(conn: sqlite3.Connection, version: str, force: bool, cells: Optional[list[str]]) -> list[sqlite3.Row]:
    where = "" if force else "AND (s.request_id IS NULL OR s.scorer_version != :v)"
    cell_f = ""
    params: dict[str, object] = {"v": version}
    if cells:
        cell_f = f"AND q.cell_id IN ({','.join(':c%d' % i for i in range(len(cells)))})"
        params.update({f"c{i}": c for i, c in enumerate(cells)})
    return conn.execute(
        f"""SELECT q.request_id, q.cell_id, q.example_id, q.repeat, p.text, e.task, e.answers_json, e.meta_json
            FROM responses p JOIN requests q USING (request_id)
            JOIN examples e ON e.dataset_id = q.dataset_id AND e.example_id = q.example_id
            LEFT JOIN scores s ON s.request_id = q.request_id
            WHERE q.status = 'ok' {where} {cell_f}
            ORDER BY q.request_id""", params).fetchall()


def score_db(conn: sqlite3.Connection, *, force: bool = False, cells: Optional[list[str]] = None,
             progress: Callable[[str, int, Optional[int]], None] = lambda *a: None) -> ScoreReport:
    version = scorer_version()
    total = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    todo = _pending(conn, version, force, cells)
    progress("score", 0, len(todo))
    rows, flagged = [], 0
    now = utcnow()
    for r in todo:
        meta = json.loads(r["meta_json"])
        score, flags, metric = _score_one(r["task"], r["text"], json.loads(r["answers_json"]), meta)
        flagged += bool(flags)
        rows.append({"request_id": r["request_id"], "cell_id": r["cell_id"], "example_id": r["example_id"],
                     "repeat": r["repeat"], "task": r["task"], "metric": str(metric), "score": float(score),
                     "flags_json": dumps(sorted(flags)), "scorer_version": version, "scored_at": now})
        if len(rows) >= 500:
            _flush(conn, rows)
            progress("score", len(rows), None)
            rows = []
    if rows:
        _flush(conn, rows)
        progress("score", len(rows), None)
    return ScoreReport(scored=len(todo), skipped=total - len(todo), flagged=flagged, version=version)


def _flush(conn: sqlite3.Connection, rows: list[dict]) -> None:
    with transaction(conn):
        insert_many(conn, "scores", rows, replace=True)
