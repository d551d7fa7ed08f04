"""The report's LongBench v2 breakdown: accuracy per cell overall / difficulty / length split / domain /
sub-domain beside the full-cache baseline (paired on the same examples), as HTML + markdown tables, a CSV
and a Δ chart that stay legible with 16 cells; a DB without LongBench v2 (the real 15-cell H200 study)
still opens and reports without the section."""

from __future__ import annotations

import csv
import gzip
import re
import shutil
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.db import connect
from kv_transition.manifest.prepare import prepare
from kv_transition.report import longbench_v2 as lbv2
from kv_transition.report.data import load_report_data
from kv_transition.report.plots import overlapping_texts
from tests.conftest import write_yaml
from tests.datasets.conftest import v2_record, write_v2_json, write_v2_prompts
from tests.report.test_stages import _record_cell

N_METHODS = 15
_REPO = Path(__file__).resolve().parents[2]
#: the shared real DB: ../shared/data beside the main checkout (worktrees live one level deeper, in wt/)
REAL_DB = next((p for p in (_REPO.parent / "shared" / "data" / "science-h200-15cells.sqlite.gz",
                            _REPO.parent.parent / "shared" / "data" / "science-h200-15cells.sqlite.gz") if p.is_file()),
               _REPO.parent / "shared" / "data" / "science-h200-15cells.sqlite.gz")


@pytest.fixture
def v2_study(project: Path):
    """12 records (gold letter ↔ domain: both follow i % 4), a full cache that is always right, 15 methods
    where method k is right only for gold letters in its set, and one that answers nothing in bin 0."""
    data = write_v2_json(project / "lb2" / "data.json", [v2_record(i) for i in range(12)])
    prompts = write_v2_prompts(project / "lb2" / "prompts")
    cfg_file = write_yaml(project / "config" / "experiments" / "v2r.yaml", {
        "extends": "../default.yaml", "experiment": {"group_id": "v2r"},
        "dataset": {"source": "longbench_v2", "longbench_v2": {"path": str(data), "prompt_config": {"path": str(prompts)}}},
        "binning": {"edges": [0, 600]}, "model": {"max_context": 2048},
    })
    cfg = load_config(cfg_file)
    paths = resolve_paths(cfg)
    prepare(cfg, paths)
    conn = connect(paths.db)
    _record_cell(conn, "kvpress.full-aaaa", "full", paths.dataset_id, lambda b, a: f"The correct answer is ({a})")
    for k in range(1, N_METHODS + 1):
        right = "ABCD"[: k % 4 + 1]
        _record_cell(conn, f"kvpress.m{k:02d}.r0.5-{k:04d}", f"m{k:02d}", paths.dataset_id,
                     lambda b, a, right=right: f"The correct answer is ({a})" if a in right else "No idea.")
    _record_cell(conn, "kvpress.quiet.r0.5-9999", "quiet", paths.dataset_id,
                 lambda b, a: "" if b == 0 else f"The correct answer is ({a})")
    conn.close()
    assert main(["score", "-q", "-c", str(cfg_file)]) == 0
    assert main(["analyze", "-c", str(cfg_file)]) == 0
    return cfg_file, paths


def test_breakdown_beside_the_baseline(v2_study):
    cfg_file, paths = v2_study
    conn = connect(paths.db)
    data = load_report_data(conn)
    n_bin0 = conn.execute("SELECT COUNT(*) FROM manifest_entries WHERE bin_id = 0").fetchone()[0]
    conn.close()
    v2 = data.v2
    assert [c for c in v2["columns"][:6]] == [("overall", "all"), ("difficulty", "easy"), ("difficulty", "hard"),
                                              ("length", "short"), ("length", "medium"), ("length", "long")]
    assert {c[1] for c in v2["columns"] if c[0] == "domain"} == {
        "Single-Document QA", "Multi-Document QA", "Long In-context Learning", "Code Repository Understanding"}
    base = v2["cells"]["kvpress.full-aaaa"]
    assert base[("overall", "all")]["accuracy"] == 100.0 and base[("overall", "all")]["n"] == 12
    m4 = v2["cells"]["kvpress.m04.r0.5-0004"]  # k=4: right only for gold A = Single-Document QA
    assert m4[("domain", "Single-Document QA")]["accuracy"] == 100.0
    assert m4[("domain", "Multi-Document QA")] == {"n": 3, "accuracy": 0.0, "baseline_accuracy": 100.0,
                                                   "delta_pp": -100.0}
    assert m4[("overall", "all")]["delta_pp"] == -75.0
    assert m4[("sub_domain", "Academic")]["accuracy"] == 100.0
    # the empty answers are left out, and the baseline is taken on the same examples
    q = v2["cells"]["kvpress.quiet.r0.5-9999"][("overall", "all")]
    assert 0 < n_bin0 < 12 and q == {"n": 12 - n_bin0, "accuracy": 100.0, "baseline_accuracy": 100.0, "delta_pp": 0.0}

    fig = lbv2.chart_figure(data)
    assert fig is not None and len(fig.axes[0].get_yticklabels()) == N_METHODS + 1  # every compressed cell
    assert overlapping_texts(fig) == []


def test_report_files_with_16_cells(v2_study):
    cfg_file, paths = v2_study
    assert main(["report", "-c", str(cfg_file)]) == 0
    out = paths.report_dir
    html = (out / "index.html").read_text()
    table = re.search(r"<table id='longbench-v2'>(.*?)</table>", html, re.S).group(1)
    assert table.count("<tr class=") == N_METHODS + 2  # one row per cell
    assert "single-doc QA" in table and "medium" in table and "n=12" in table
    assert "100.0 (−100.0)" not in table and "0.0 (−100.0)" in table and "class='bad'" in table
    assert "<table id='longbench-v2-sub'>" in html and "Academic" in html
    assert "data:image/png;base64" in html.split("id='s-longbench-v2'")[1].split("<h2")[0]
    md = (out / "report.md").read_text()
    assert "## LongBench v2 accuracy" in md and "![LongBench v2 breakdown](longbench_v2_breakdown.png)" in md
    assert (out / "longbench_v2_breakdown.png").stat().st_size > 5000
    rows = list(csv.DictReader((out / "longbench_v2.csv").open()))
    assert {r["cell_id"] for r in rows} == {"kvpress.full-aaaa", "kvpress.quiet.r0.5-9999"} | {
        f"kvpress.m{k:02d}.r0.5-{k:04d}" for k in range(1, N_METHODS + 1)}
    r = next(r for r in rows if r["cell_id"] == "kvpress.m04.r0.5-0004" and r["value"] == "Multi-Document QA")
    assert (r["dimension"], r["accuracy"], r["baseline_accuracy"], r["delta_pp"]) == ("domain", "0.0", "100.0", "-100.0")
    assert next(r for r in rows if r["value"] == "Academic")["domain"] == "Single-Document QA"


@pytest.mark.skipif(not REAL_DB.is_file(), reason="the shared real DB is not on this machine")
def test_real_15_cell_db_still_reports(tmp_path: Path):
    db = tmp_path / "db.sqlite"
    with gzip.open(REAL_DB) as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    conn = connect(db)  # migrations (11 included) apply to the real DB
    assert {r[0] for r in conn.execute("SELECT version FROM schema_migrations")} >= {11}
    data = load_report_data(conn)
    conn.close()
    assert len(data.cells) == 15 and data.v2 == {}
    from kv_transition.report.build import write_report

    files = write_report(data, tmp_path / "report")
    assert "LongBench v2" not in files.html.read_text() and not (tmp_path / "report" / "longbench_v2.csv").exists()
