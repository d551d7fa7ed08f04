"""`kvt score`: score every recorded response with its task's metric, idempotently.

A score row is keyed by request_id. Rows already scored by the current scorer version are skipped;
a change to the metric code changes the version, so re-scoring after a metric change is one command.

The text scored is the request's last response: `followups.text` for a two-request example (LongBench
v2 with chain of thought), else `responses.text`. A LongBench v2 request whose last response is empty
gets no score row (left out of accuracy like pred.py leaves it out of its results; see
score/longbench_v2.py) and is counted in `ScoreReport.empty`.
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
    empty: int = 0  # LongBench v2 requests with an empty last response: left out, no score row


def _pending(conn: sqlite3.Connection, version: str, force: bool, cells: Optional[list[str]]) -> list[sqlite3.Row]:
    where = "" if force else "AND (s.request_id IS NULL OR s.scorer_version != :v)"
    cell_f = ""
    params: dict[str, object] = {"v": version}
    if cells:
        cell_f = f"AND q.cell_id IN ({','.join(':c%d' % i for i in range(len(cells)))})"
        params.update({f"c{i}": c for i, c in enumerate(cells)})
    return conn.execute(
        f"""SELECT q.request_id, q.cell_id, q.example_id, q.repeat, COALESCE(f.text, p.text) AS text, e.task,
                   e.answers_json, e.meta_json
            FROM responses p JOIN requests q USING (request_id)
            JOIN examples e ON e.dataset_id = q.dataset_id AND e.example_id = q.example_id
            LEFT JOIN followups f ON f.request_id = q.request_id
            LEFT JOIN scores s ON s.request_id = q.request_id
            WHERE q.status = 'ok' {where} {cell_f}
            ORDER BY q.request_id""", params).fetchall()


def score_db(conn: sqlite3.Connection, *, force: bool = False, cells: Optional[list[str]] = None,
             progress: Callable[[str, int, Optional[int]], None] = lambda *a: None) -> ScoreReport:
    version = scorer_version()
    total = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    todo = _pending(conn, version, force, cells)
    progress("score", 0, len(todo))
    rows, flagged, empty = [], 0, []
    now = utcnow()
    for r in todo:
        meta = json.loads(r["meta_json"])
        if longbench_v2.is_v2(meta) and longbench_v2.left_out(r["text"]):
            empty.append(r["request_id"])
            continue
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
    if empty:  # a score row from before (another scorer version) must not keep counting it
        with transaction(conn):
            for i in range(0, len(empty), 500):
                part = empty[i:i + 500]
                conn.execute(f"DELETE FROM scores WHERE request_id IN ({','.join('?' * len(part))})", part)
    return ScoreReport(scored=len(todo) - len(empty), skipped=total - len(todo), flagged=flagged, version=version,
                       empty=len(empty))


def _flush(conn: sqlite3.Connection, rows: list[dict]) -> None:
    with transaction(conn):
        insert_many(conn, "scores", rows, replace=True)
