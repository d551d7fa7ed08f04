"""A real group DB from an H200 run (../shared/data, made at migration 4 by an older main) opens under today's
migrations, re-analyzes and reports: newer code must never strand an older study."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from kv_transition.analysis.compute import analyze
from kv_transition.db import connect
from kv_transition.db.migrations import MIGRATIONS
from kv_transition.report.data import load_report_data
from kv_transition.report.build import write_report

_REPO = Path(__file__).resolve().parents[2]
# ../shared beside the main checkout (or beside the folder of worktrees one level below it)
REAL_DB = next((p for p in (_REPO.parent / "shared" / "data" / "science-h200-15cells.sqlite.gz",
                            _REPO.parent.parent / "shared" / "data" / "science-h200-15cells.sqlite.gz") if p.is_file()),
               _REPO.parent / "shared" / "data" / "science-h200-15cells.sqlite.gz")


@pytest.mark.skipif(not REAL_DB.is_file(), reason=f"{REAL_DB} not present (it lives beside the main checkout)")
def test_the_real_h200_db_migrates_analyzes_and_reports(tmp_path: Path):
    db = tmp_path / "kv_transition.sqlite"
    with gzip.open(REAL_DB) as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    conn = connect(db)
    applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    assert applied == {v for v, _, _ in MIGRATIONS}
    n_cells = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    n_resp = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert (n_cells, n_resp) == (15, 569)  # what the DB's README says it holds; migrations lose nothing
    analyze(conn, n_boot=50)
    usage = [r[0] for r in conn.execute("SELECT peak_kv_usage FROM analysis_bins WHERE peak_kv_usage IS NOT NULL")]
    assert usage and max(usage) <= 1.0  # fractions only; the kvpress bytes gauge goes to peak_kv_bytes
    assert conn.execute("SELECT COUNT(*) FROM analysis_bins WHERE peak_kv_bytes > 1").fetchone()[0] > 0
    data = load_report_data(conn, n_boot=50, db_path=str(db))
    conn.close()
    assert len(data.cells) == 15
    files = write_report(data, tmp_path / "report")
    html = files.html.read_text()
    assert "snapkv" in html and "streamingllm" in html
    assert files.pngs and all(p.stat().st_size > 0 for p in files.pngs)
