"""LongBench v2 scoring: the answer letter pulled out of a response like its ``pred.py`` does, judged
against the gold letter (accuracy), and the per-category accuracy table of its ``result.py``.

Extraction (``pred.py`` ``extract_answer``): drop every ``*`` (markdown bold), then the first
``The correct answer is (X)``, else the first ``The correct answer is X``, X one of A-D, case-sensitive;
nothing found is no answer (wrong, flagged ``no_answer_extracted``).

Empty responses (:func:`left_out`): pred.py writes no result for an example whose model output is
exactly ``''`` (``if output == '': continue``, checked before stripping; with ``--cot`` for the
reasoning and for the answer request alike), so result.py's accuracy has it in neither numerator nor
denominator. Here too: such a request gets no score row (``kvt score`` counts it as left out); a
whitespace-only response is not empty — it is scored, as no answer (0). ``result.py`` reports
``round(100 * mean, 1)`` overall, per difficulty and per length split; here also per domain and
sub-domain, and per token-length bin of the manifest like every other dataset.
"""

from __future__ import annotations

import re
import sqlite3
from collections import defaultdict
from typing import Any, Iterable, Mapping, Optional, Sequence

from kv_transition.errors import DataError

METRIC = "accuracy"
FLAG_NO_ANSWER = "no_answer_extracted"

_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_BARE = re.compile(r"The correct answer is ([A-D])")

#: the breakdowns of the accuracy table, in display order (meta key → dimension name)
DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("difficulty", "difficulty"),
    ("length_split", "length"),
    ("domain", "domain"),
    ("sub_domain", "sub_domain"),
)


def extract_answer(response: str) -> Optional[str]:
    """The answer letter of a response, or None (LongBench v2 pred.py's rule)."""
    text = response.replace("*", "")
    m = _PAREN.search(text) or _BARE.search(text)
    return m.group(1) if m else None


def left_out(response: str) -> bool:
    """True for a response pred.py drops instead of judging: exactly empty (an empty reasoning
    response of the chain-of-thought mode included: no answer request follows it)."""
    return response == ""


def score_v2(prediction: str, answers: Sequence[str]) -> tuple[float, tuple[str, ...]]:
    """1.0 when the extracted letter is the gold one, else 0.0; flags for no extractable answer."""
    if not isinstance(prediction, str):
        raise DataError(f"prediction must be a string, got {type(prediction).__name__}")
    gold = list(answers)
    if len(gold) != 1 or gold[0] not in ("A", "B", "C", "D"):
        raise DataError(f"a LongBench v2 example has one answer letter A-D, got {gold!r}")
    pred = extract_answer(prediction)
    if pred is None:
        return 0.0, (FLAG_NO_ANSWER,)
    return (1.0 if pred == gold[0] else 0.0), ()


def is_v2(meta: Optional[Mapping[str, Any]]) -> bool:
    return bool(meta) and meta.get("source") == "longbench_v2"


def accuracy_table(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy per (cell, bin, dimension, value) from rows with cell_id, bin_id, score and the v2 meta
    keys. ``bin_id`` None is all bins; dimension ``overall`` (value ``all``) is every example."""
    acc: dict[tuple[str, Optional[int], str, str], list[float]] = defaultdict(list)
    for r in rows:
        for b in (None, int(r["bin_id"])):
            acc[(r["cell_id"], b, "overall", "all")].append(float(r["score"]))
            for key, dim in DIMENSIONS:
                acc[(r["cell_id"], b, dim, str(r[key]))].append(float(r["score"]))
    order = {name: i for i, name in enumerate(["overall"] + [d for _k, d in DIMENSIONS])}
    out = [
        {"cell_id": c, "bin_id": b, "dimension": dim, "value": v, "n": len(s), "correct": sum(s),
         "accuracy": round(100 * sum(s) / len(s), 1)}
        for (c, b, dim, v), s in acc.items()
    ]
    out.sort(key=lambda r: (r["cell_id"], -1 if r["bin_id"] is None else r["bin_id"], order[r["dimension"]],
                            r["value"]))
    return out


def load_example_rows(conn: sqlite3.Connection, cells: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """One row per LongBench v2 score in an experiment DB: cell_id, example_id, repeat, bin_id, score and
    the v2 meta keys of :data:`DIMENSIONS`."""
    import json

    q = conn.execute(
        """SELECT s.cell_id, s.example_id, s.repeat, s.score, m.bin_id, e.meta_json
           FROM scores s JOIN requests r USING (request_id)
           JOIN manifest_entries m ON m.dataset_id = r.dataset_id AND m.example_id = r.example_id
           JOIN examples e ON e.dataset_id = r.dataset_id AND e.example_id = r.example_id
           WHERE s.metric = ?""", (METRIC,)).fetchall()
    rows = []
    for r in q:
        if cells and r["cell_id"] not in cells:
            continue
        meta = json.loads(r["meta_json"])
        if not is_v2(meta):
            continue
        rows.append({"cell_id": r["cell_id"], "example_id": r["example_id"], "repeat": r["repeat"],
                     "bin_id": r["bin_id"], "score": r["score"], **{k: meta.get(k) for k, _d in DIMENSIONS}})
    return rows


def load_accuracy_table(conn: sqlite3.Connection, cells: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """:func:`accuracy_table` over the LongBench v2 scores in an experiment DB."""
    return accuracy_table(load_example_rows(conn, cells))
