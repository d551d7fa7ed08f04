"""The engine's KV gauges reach analysis_bins by unit: the usage fraction as peak_kv_usage, a *_bytes gauge as
peak_kv_bytes (they were one maximum once, so a bytes gauge read as a "usage" of millions)."""

from __future__ import annotations

from datetime import datetime

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.db import connect
from kv_transition.manifest.prepare import prepare
from tests.report.test_stages import _record_cell


def test_usage_fraction_and_bytes_gauges_are_kept_apart(small_synthetic):
    cfg = load_config(small_synthetic, ["dataset.synthetic.depths=[0.5]"])
    paths = resolve_paths(cfg)
    prepare(cfg, paths)
    conn = connect(paths.db)
    _record_cell(conn, "kvpress.full-aaaa", "full", paths.dataset_id, lambda b, a: f"The pass key is {a}.")
    run_id, created = conn.execute("SELECT run_id, created_at FROM responses LIMIT 1").fetchone()
    t = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() - 0.05
    for metric, value in (("kvpress:kv_cache_usage_perc", 0.25), ("kvpress:kv_cache_usage_perc", 0.4),
                          ("kvpress:kv_cache_bytes", 5_000_000.0), ("kvpress:kv_cache_bytes", 7_000_000.0)):
        conn.execute("INSERT INTO telemetry_engine_metric(run_id, t, metric, labels_json, value) VALUES (?,?,?,?,?)",
                     (run_id, t, metric, "{}", value))
    conn.commit()
    conn.close()
    c = ["-c", str(small_synthetic), "-o", "dataset.synthetic.depths=[0.5]"]
    assert main(["score", "-q", *c]) == 0
    assert main(["analyze", *c]) == 0
    conn = connect(paths.db)
    got = conn.execute("SELECT MAX(peak_kv_usage), MAX(peak_kv_bytes) FROM analysis_bins").fetchone()
    conn.close()
    assert tuple(got) == (0.4, 7_000_000.0)
