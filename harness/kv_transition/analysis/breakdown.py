"""Finer cuts of the scored rows that the report shows but `kvt analyze` does not store: per task × bin
statistics and transitions, LongBench's own averages (per task, LongBench-E length ranges, categories,
languages) and a bootstrap interval for each cell's transition length. Pure functions over rows read once
from the DB; nothing is written back."""

from __future__ import annotations

import json
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from kv_transition.analysis.stats import BinStat, ScoreRow, Transition, bin_stats, find_transition

# LongBench eval.py scorer_e: `length` (words for English, characters for Chinese) < 4000 / < 8000 / else
LONGBENCH_E_RANGES = ("0-4k", "4-8k", "8k+")
_SEP = "\x1f"


def longbench_e_range(length: Optional[int]) -> Optional[str]:
    if length is None:
        return None
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


@dataclass(frozen=True)
class ExampleScore:
    """One example of one cell: its score with repeats averaged (as `bin_stats` does), where it sits."""

    cell_id: str
    example_id: str
    task: str
    bin_id: int
    tokens: int
    score: float
    source: str = ""
    length: Optional[int] = None      # the dataset's own length field (LongBench: words / characters)
    category: Optional[str] = None
    language: Optional[str] = None


def load_example_scores(conn: sqlite3.Connection) -> list[ExampleScore]:
    q = conn.execute(
        """SELECT s.cell_id, s.example_id, s.task, AVG(s.score) AS score, m.bin_id, m.final_tokens, e.meta_json
           FROM scores s JOIN requests r USING (request_id)
           JOIN manifest_entries m ON m.dataset_id = r.dataset_id AND m.example_id = r.example_id
           JOIN examples e ON e.dataset_id = r.dataset_id AND e.example_id = r.example_id
           GROUP BY s.cell_id, s.example_id ORDER BY s.cell_id, s.example_id""").fetchall()
    out = []
    for r in q:
        meta = json.loads(r["meta_json"] or "{}")
        length = meta.get("length")
        out.append(ExampleScore(r["cell_id"], r["example_id"], r["task"], int(r["bin_id"]), int(r["final_tokens"]),
                                float(r["score"]), str(meta.get("source") or ""),
                                int(length) if isinstance(length, (int, float)) else None,
                                meta.get("category"), meta.get("language")))
    return out


def tasks_of(ex: Sequence[ExampleScore]) -> list[str]:
    return sorted({e.task for e in ex})


def task_bin_stats(ex: Sequence[ExampleScore], baseline_of: dict[str, Optional[str]], n_boot: int = 1000,
                   seed: int = 0) -> dict[tuple[str, str], list[BinStat]]:
    """(cell, task) → per-bin stats, paired against the cell's baseline on the same task."""
    rows = [ScoreRow(f"{e.cell_id}{_SEP}{e.task}", e.example_id, e.bin_id, e.score, e.tokens) for e in ex]
    base = {}
    for e in ex:
        b = baseline_of.get(e.cell_id)
        base[f"{e.cell_id}{_SEP}{e.task}"] = f"{b}{_SEP}{e.task}" if b else None
    out: dict[tuple[str, str], list[BinStat]] = defaultdict(list)
    for s in bin_stats(rows, base, n_boot=n_boot, seed=seed):
        cell, task = s.cell_id.split(_SEP, 1)
        s.cell_id = cell
        if s.baseline_cell:
            s.baseline_cell = s.baseline_cell.split(_SEP, 1)[0]
        out[(cell, task)].append(s)
    return dict(out)


def task_transitions(stats: dict[tuple[str, str], list[BinStat]], threshold: float,
                     ex: Sequence[ExampleScore]) -> dict[tuple[str, str], Transition]:
    top: dict[tuple[str, str], int] = defaultdict(int)
    for e in ex:
        top[(e.cell_id, e.task)] = max(top[(e.cell_id, e.task)], e.tokens)
    return {k: find_transition(v, threshold, max_tokens=top[k]) for k, v in stats.items()}


def _mean100(v: Sequence[float]) -> Optional[float]:
    return round(100 * float(np.mean(v)), 2) if len(v) else None


def longbench_summary(ex: Sequence[ExampleScore]) -> dict[str, dict[str, Any]]:
    """Per cell, LongBench's numbers as its eval.py and README compute them (×100, 2 decimals):
    `tasks` (mean over the task's examples), `e` (per task, by LongBench-E length range of the dataset's
    `length` field), `e_avg` (per range, mean over tasks that have examples there), `categories` (mean of
    the category's task scores), `avg` (per language: mean of the category means, code counted in every
    language, as the leaderboard's Avg) and `macro` (plain mean over tasks)."""
    by_cell: dict[str, list[ExampleScore]] = defaultdict(list)
    for e in ex:
        if e.source == "longbench":
            by_cell[e.cell_id].append(e)
    out: dict[str, dict[str, Any]] = {}
    for cell, rows in by_cell.items():
        per_task: dict[str, list[float]] = defaultdict(list)
        per_e: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        info: dict[str, tuple[Optional[str], Optional[str]]] = {}
        for e in rows:
            per_task[e.task].append(e.score)
            rng = longbench_e_range(e.length)
            if rng:
                per_e[e.task][rng].append(e.score)
            info[e.task] = (e.category, e.language)
        tasks = {t: _mean100(v) for t, v in sorted(per_task.items())}
        e_scores = {t: {r: _mean100(per_e[t][r]) for r in LONGBENCH_E_RANGES} for t in sorted(per_e)}
        e_avg = {}
        for r in LONGBENCH_E_RANGES:
            vals = [e_scores[t][r] for t in e_scores if e_scores[t][r] is not None]
            e_avg[r] = round(float(np.mean(vals)), 2) if vals else None
        cats: dict[str, list[float]] = defaultdict(list)
        for t, s in tasks.items():
            if s is not None and info[t][0]:
                cats[str(info[t][0])].append(s)
        categories = {c: round(float(np.mean(v)), 2) for c, v in sorted(cats.items())}
        langs = sorted({str(info[t][1]) for t in tasks if info[t][1] and info[t][1] != "code"}) or (
            ["code"] if any(info[t][1] == "code" for t in tasks) else [])
        avg = {}
        for lang in langs:
            cv: dict[str, list[float]] = defaultdict(list)
            for t, s in tasks.items():
                if s is not None and info[t][0] and info[t][1] in (lang, "code"):
                    cv[str(info[t][0])].append(s)
            if cv:
                avg[lang] = round(float(np.mean([np.mean(v) for v in cv.values()])), 2)
        vals = [s for s in tasks.values() if s is not None]
        out[cell] = {"tasks": tasks, "e": e_scores, "e_avg": e_avg, "categories": categories, "avg": avg,
                     "macro": round(float(np.mean(vals)), 2) if vals else None, "category_of": {
                         t: info[t][0] for t in tasks}}
    return out


def transition_interval(bins: Sequence[tuple[float, Sequence[float], Sequence[float]]], threshold: float,
                        n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Optional[tuple[float, float, float]]:
    """Bootstrap interval of the threshold crossing of the relative-score curve.

    `bins`: (mean tokens, method scores, baseline scores paired by example) per length bin. Each replicate
    resamples the examples of every bin (paired), recomputes the relative score per bin and takes the first
    bin below `threshold`, interpolated from the bin before it as `find_transition` does. Returns
    (lo, hi, fraction of replicates with no crossing); hi is +inf when more than alpha/2 of the replicates
    never cross (the transition may lie beyond the longest bin). None when there is nothing to pair.
    """
    bs = sorted((b for b in bins if len(b[1]) and len(b[1]) == len(b[2])), key=lambda b: b[0])
    if not bs:
        return None
    rng = np.random.default_rng(seed)
    toks = np.array([b[0] for b in bs], dtype=float)
    rel = np.full((n_boot, len(bs)), np.nan)
    for j, (_, m, base) in enumerate(bs):
        m_ = np.asarray(m, dtype=float)
        b_ = np.asarray(base, dtype=float)
        idx = rng.integers(0, len(m_), size=(n_boot, len(m_)))
        bm = b_[idx].mean(axis=1)
        mm = m_[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel[:, j] = np.where(bm > 0, mm / bm, np.nan)
    below = np.nan_to_num(rel, nan=np.inf) < threshold
    cross = np.full(n_boot, np.inf)
    any_below = below.any(axis=1)
    first = np.argmax(below, axis=1)
    for i in np.nonzero(any_below)[0]:
        j = first[i]
        if j == 0 or math.isnan(rel[i, j - 1]) or rel[i, j - 1] == rel[i, j]:
            cross[i] = toks[j]
        else:
            f = (rel[i, j - 1] - threshold) / (rel[i, j - 1] - rel[i, j])
            cross[i] = toks[j - 1] + min(1.0, max(0.0, f)) * (toks[j] - toks[j - 1])
    s = np.sort(cross)
    lo = float(s[int(math.floor(alpha / 2 * (n_boot - 1)))])
    hi = float(s[int(math.ceil((1 - alpha / 2) * (n_boot - 1)))])
    return lo, hi, float(1 - any_below.mean())


def transition_intervals(ex: Sequence[ExampleScore], baseline_of: dict[str, Optional[str]], threshold: float,
                         n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    by: dict[tuple[str, int], dict[str, ExampleScore]] = defaultdict(dict)
    for e in ex:
        by[(e.cell_id, e.bin_id)][e.example_id] = e
    out = {}
    for cell in sorted({e.cell_id for e in ex}):
        base = baseline_of.get(cell)
        if not base or base == cell:
            continue
        bins = []
        for (c, b), mine in by.items():
            if c != cell or (base, b) not in by:
                continue
            theirs = by[(base, b)]
            common = sorted(set(mine) & set(theirs))
            if common:
                bins.append((float(np.mean([mine[e].tokens for e in mine])), [mine[e].score for e in common],
                             [theirs[e].score for e in common]))
        iv = transition_interval(bins, threshold, n_boot=n_boot, seed=seed)
        if iv:
            out[cell] = iv
    return out
