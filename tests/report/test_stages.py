"""score → analyze → report on a real prepared manifest with recorded responses written directly
into the DB (two cells: a full-cache baseline that always answers, and a method that fails on the
longest bin), through the CLI."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.db import connect, utcnow
from kv_transition.manifest.prepare import prepare


def _record_cell(conn: sqlite3.Connection, cell_id: str, method: str, dataset_id: str, answer_for,
                 masked: bool = False) -> None:
    now = utcnow()
    conn.execute("INSERT INTO cells(cell_id, group_id, dataset_id, engine, method, compression_ratio, kv_scope, model_id,"
                 " repeats, inputs_json, config_json, config_hash, spec_json, status, created_at, updated_at)"
                 " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                 (cell_id, "rep", dataset_id, "kvpress", method, None if method == "full" else 0.5, "query_aware",
                  "SmolLM2-135M-Instruct", 1, "{}", "{}", "h", "{}", "completed", now, now))
    run_id = conn.execute("INSERT INTO runs(cell_id, runtime, config_hash, host, pid, harness_version, status, started_at)"
                          " VALUES (?,?,?,?,?,?,?,?)", (cell_id, "process", "h", "h", 1, "0", "completed", now)).lastrowid
    entries = conn.execute("SELECT m.example_id, m.bin_id, m.final_tokens, e.answers_json FROM manifest_entries m"
                           " JOIN examples e USING(dataset_id, example_id) WHERE m.dataset_id=?", (dataset_id,)).fetchall()
    for ex_id, bin_id, toks, answers in entries:
        rid = conn.execute("INSERT INTO requests(cell_id, dataset_id, example_id, repeat, status, n_attempts, created_at,"
                           " updated_at) VALUES (?,?,?,?,?,?,?,?)", (cell_id, dataset_id, ex_id, 0, "ok", 1, now, now)).lastrowid
        text = answer_for(bin_id, json.loads(answers)[0])
        kept = toks if method == "full" else toks // 2
        kv = {"method": method, "kv_tokens_before": toks, "kv_tokens_after": kept, "kv_bytes_after": kept * 9216}
        if masked:  # what the kvpress engine reports for head-wise masking: the full tensors are held
            kv.update(masked=True, memory="masks", kv_tokens_held=toks, kv_bytes_after=toks * 9216)
        conn.execute("INSERT INTO responses(request_id, attempt_no, run_id, text, finish_reason, prompt_tokens,"
                     " completion_tokens, total_tokens, ttft_s, tpot_s, e2e_s, itl_json, n_chunks, kv_applied_json,"
                     " streamed, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     (rid, 1, run_id, text, "stop", toks, 8, toks + 8, toks / 500, 0.08, toks / 500 + 0.6, "[]", 8,
                      json.dumps(kv), 1, now))


@pytest.fixture
def recorded(small_synthetic: Path):
    cfg = load_config(small_synthetic, ["dataset.synthetic.depths=[0.1, 0.3, 0.5, 0.7, 0.9]"])
    paths = resolve_paths(cfg)
    prepare(cfg, paths)
    conn = connect(paths.db)
    _record_cell(conn, "kvpress.full-aaaa", "full", paths.dataset_id, lambda b, a: f"The pass key is {a}.")
    _record_cell(conn, "kvpress.snapkv.r0.5-bbbb", "snapkv", paths.dataset_id,
                 lambda b, a: f"The pass key is {a}." if b < 2 else "I do not know.")
    conn.close()
    return cfg, paths, small_synthetic


def test_score_analyze_report(recorded, capsys: pytest.CaptureFixture):
    cfg, paths, cfg_file = recorded
    c = ["-c", str(cfg_file), "-o", "dataset.synthetic.depths=[0.1, 0.3, 0.5, 0.7, 0.9]"]
    assert main(["score", "-q", *c]) == 0
    assert "scored 30 response(s)" in capsys.readouterr().out
    assert main(["score", "-q", *c]) == 0  # idempotent: nothing new to score
    assert "scored 0 response(s), 30 already scored" in capsys.readouterr().out
    conn = connect(paths.db)
    per = dict(conn.execute("SELECT cell_id, AVG(score) FROM scores GROUP BY cell_id").fetchall())
    assert per == {"kvpress.full-aaaa": 1.0, "kvpress.snapkv.r0.5-bbbb": pytest.approx(10 / 15)}
    assert {r[0] for r in conn.execute("SELECT DISTINCT metric FROM scores")} == {"exact"}
    conn.close()

    assert main(["analyze", *c]) == 0
    out = capsys.readouterr().out
    assert "kvpress.snapkv.r0.5-bbbb: ~" in out and "kvpress.full-aaaa: no transition" in out
    conn = connect(paths.db)
    t = conn.execute("SELECT bin_id, tokens, baseline_cell FROM transitions WHERE cell_id LIKE '%snapkv%'").fetchone()
    assert t[0] == 2 and t[2] == "kvpress.full-aaaa"
    lo, hi = conn.execute("SELECT mean_tokens FROM analysis_bins WHERE cell_id LIKE '%snapkv%' AND bin_id IN (1, 2)"
                          " ORDER BY bin_id").fetchall()
    assert lo[0] < t[1] <= hi[0]  # interpolated between the last good bin and the failing one
    saved = conn.execute("SELECT kv_saved_frac FROM analysis_bins WHERE cell_id LIKE '%snapkv%'").fetchall()
    assert all(0.45 < s[0] < 0.55 for s in saved)
    conn.close()

    assert main(["report", *c]) == 0
    out = capsys.readouterr().out
    assert "kept 900+" in out and "report:" in out
    rep = paths.report_dir
    names = {p.name for p in rep.iterdir()}
    figures = {"heatmap.png", "transition_vs_budget.png", "score_small_multiples.png", "memory_pareto.png",
               "latency_vs_length.png"}
    assert figures | {"index.html", "report.md", "bins.csv", "transitions.csv", "tasks.csv", "provenance.csv"} <= names
    assert not any(n.startswith(".") for n in names), "temporary files left behind"
    html = (rep / "index.html").read_text()
    # every PNG but the heatmap is inlined as an image; the heatmap is inline SVG with a tooltip per cell × bin
    assert html.count("<img ") == len(figures) - 1 and "data:image/png;base64," in html and "id='summary'" in html
    assert html.count('<svg id="heatmap"') == 1 and html.count("<title>") == 1 + 2 * 3  # page title + tooltips
    # self-contained: no URL but the SVG/XLink namespace names (identifiers, never fetched)
    assert re.findall(r"https?://[^\s\"']+", html) and all(
        u in ("http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink")
        for u in re.findall(r"https?://[^\s\"']+", html))
    assert " src='http" not in html and ' href="http' not in html
    assert "kvpress/snapkv r=0.5 — bin 900+" in html and "transition: ~" in html
    rows = list(csv.DictReader((rep / "transitions.csv").open()))
    assert {r["method"]: r["transition_bin"] for r in rows} == {"full": "", "snapkv": "2"}
    snap = next(r for r in rows if r["method"] == "snapkv")
    assert float(snap["interval_lo"]) <= float(snap["transition_tokens"]) <= float(snap["interval_hi"])
    bins = list(csv.DictReader((rep / "bins.csv").open()))
    held = {(r["method"], r["bin"]): float(r["kv_bytes_held"]) for r in bins}
    assert all(held[("snapkv", b)] < held[("full", b)] for b in ("0", "1", "2"))
    assert {r["kv_bytes_source"] for r in bins} == {"kv_bytes_after (engine, per response)"}
    prov = list(csv.DictReader((rep / "provenance.csv").open()))
    assert {r["cell"] for r in prov} == {"kvpress.full-aaaa", "kvpress.snapkv.r0.5-bbbb"}
    assert all(r["runtime"] == "process" and r["scope"] == "query_aware" for r in prov)
    md = (rep / "report.md").read_text()
    assert "| kvpress/snapkv r=0.5 |" in md and "0%" in md and "![heatmap](heatmap.png)" in md
    # --out writes the same report elsewhere and leaves runs/<exp>/report alone
    before = (rep / "index.html").stat().st_mtime_ns
    assert main(["report", *c, "--out", str(paths.run_dir / "elsewhere")]) == 0
    assert (paths.run_dir / "elsewhere" / "index.html").read_text() == (rep / "index.html").read_text()
    assert (rep / "index.html").stat().st_mtime_ns == before


def test_masked_presses_are_reported_as_not_freed(small_synthetic: Path, capsys: pytest.CaptureFixture):
    cfg = load_config(small_synthetic)
    paths = resolve_paths(cfg)
    prepare(cfg, paths)
    conn = connect(paths.db)
    _record_cell(conn, "kvpress.full-aaaa", "full", paths.dataset_id, lambda b, a: f"The pass key is {a}.")
    _record_cell(conn, "kvpress.adakv.r0.5-cccc", "adakv", paths.dataset_id, lambda b, a: f"The pass key is {a}.",
                 masked=True)
    conn.close()
    c = ["-c", str(small_synthetic)]
    assert main(["score", "-q", *c]) == 0 and main(["analyze", *c]) == 0 and main(["report", *c]) == 0
    capsys.readouterr()
    conn = connect(paths.db)
    saved = conn.execute("SELECT kv_saved_frac FROM analysis_bins WHERE cell_id LIKE '%adakv%'").fetchall()
    conn.close()
    assert saved and all(s[0] == 0 for s in saved)  # bytes held, not the masked count
    md = (paths.report_dir / "report.md").read_text()
    assert "kvpress/adakv r=0.5 [masked, not freed]" in md and "kvpress/full |" in md


def test_report_without_db_is_a_clear_error(small_synthetic: Path, capsys: pytest.CaptureFixture):
    assert main(["report", "-c", str(small_synthetic)]) == 2
    assert "no database for this experiment group" in capsys.readouterr().err
