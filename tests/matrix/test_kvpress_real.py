"""The real kvpress engine (`python -m kvpress_engine`, process runtime, CPU) on the tiny model: the smoke
matrix's four cells (full + snapkv + streamingllm + knorm at r=0.5) on a tiny manifest, over two slots —
one engine load serves all four."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _kvpress_loadable() -> str:
    from kv_transition.engines.spec import load_engine
    from kv_transition.errors import ConfigError

    try:
        load_engine("kvpress", REPO / "engines")
    except ConfigError as e:
        return f"engines/kvpress/engine.yaml does not load with the harness's engine schema yet: {e}"
    try:
        import kvpress_engine  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return f"the kvpress engine is not installed in this venv: {e}"
    return ""


@pytest.mark.engine
def test_smoke_matrix_with_the_real_kvpress_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tokenizer_cache: Path) -> None:
    why = _kvpress_loadable()
    if why:
        pytest.skip(why)
    from kv_transition.config import load_config, resolve_paths
    from kv_transition.db import connect, rows
    from kv_transition.manifest.store import write_db
    from kv_transition.matrix import expand, load_matrix
    from kv_transition.matrix.inventory import inventory
    from kv_transition.matrix.run import MatrixRunner
    from kv_transition.manifest.prepare import record_experiment

    from .conftest import scorable_manifest

    monkeypatch.delenv("KVT_ENGINES_DIR", raising=False)
    monkeypatch.setenv("KVT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(tokenizer_cache, tmp_path / "data" / "tokenizers", dirs_exist_ok=True)
    cfg = load_config(REPO / "config" / "default.yaml", [
        "experiment.group_id=kvreal", "dataset.id=tiny3", f"output.runs_root={tmp_path / 'runs'}",
        f"output.data_root={tmp_path / 'data'}", "engine.port=18470", "telemetry.interval_s=0.5"], env={})
    paths = resolve_paths(cfg, cwd=tmp_path)
    conn = connect(paths.db)
    record_experiment(conn, cfg)
    write_db(conn, scorable_manifest(paths.dataset_id, 3), paths.manifest, cfg.experiment.group_id)
    conn.close()
    exp = expand(cfg, load_matrix(REPO / "config" / "matrix" / "smoke.yaml"))
    assert len(exp.cells) == 4 and len(exp.groups) == 1
    s = MatrixRunner(cfg, exp, inventory(slots=2), cwd=tmp_path).run()
    assert s.ok, [(o.cell.label, o.reason) for o in s.outcomes]
    conn = connect(paths.db)
    assert len(rows(conn, "SELECT * FROM matrix_engines")) == 1
    assert rows(conn, "SELECT COUNT(*) n FROM responses")[0]["n"] == 12
    applied = [r["kv_applied_json"] for r in rows(conn, "SELECT kv_applied_json FROM responses")]
    assert any(a and "snapkv" in a for a in applied), applied
    # interleaved (the default): the engine reports the prefills it ran; the four cells' requests of one
    # example reach it together, so it runs fewer prefills than requests (1 per example when all four share)
    import json

    from kv_transition.report.data import _prefill_share

    per_example = {}
    for r in rows(conn, "SELECT q.example_id, p.kv_applied_json FROM responses p JOIN requests q USING(request_id)"):
        a = json.loads(r["kv_applied_json"])
        assert a["shared_prefill"] == (a["shared_prefill_with"] > 1), a
        per_example[r["example_id"]] = per_example.get(r["example_id"], 0) + 1 / a["shared_prefill_with"]
    assert len(per_example) == 3 and sum(per_example.values()) < 12, per_example
    shares = [_prefill_share(conn, c["cell_id"]) for c in rows(conn, "SELECT cell_id FROM cells")]
    assert sum(shares) == pytest.approx(sum(per_example.values()) / 3, abs=1e-3)
    assert rows(conn, "SELECT COUNT(DISTINCT cell_id) n FROM events WHERE kind='interleaved'")[0]["n"] == 4
    conn.close()


@pytest.mark.engine
def test_press_spec_cell_stores_the_whole_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               tokenizer_cache: Path) -> None:
    """A matrix method spec ({method: adakv, inner: {method: knorm}}) runs on the real engine and every
    response row stores the engine's kv_press_applied with the whole tree and the masked flag."""
    why = _kvpress_loadable()
    if why:
        pytest.skip(why)
    import json

    from kv_transition.config import load_config, resolve_paths
    from kv_transition.db import connect, rows
    from kv_transition.manifest.store import write_db
    from kv_transition.matrix import MatrixFile, expand
    from kv_transition.matrix.inventory import inventory
    from kv_transition.matrix.run import MatrixRunner
    from kv_transition.manifest.prepare import record_experiment

    from .conftest import scorable_manifest

    monkeypatch.delenv("KVT_ENGINES_DIR", raising=False)
    monkeypatch.setenv("KVT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(tokenizer_cache, tmp_path / "data" / "tokenizers", dirs_exist_ok=True)
    cfg = load_config(REPO / "config" / "default.yaml", [
        "experiment.group_id=kvspec", "dataset.id=tiny2", f"output.runs_root={tmp_path / 'runs'}",
        f"output.data_root={tmp_path / 'data'}", "engine.port=18490", "telemetry.enabled=false"], env={})
    paths = resolve_paths(cfg, cwd=tmp_path)
    conn = connect(paths.db)
    record_experiment(conn, cfg)
    write_db(conn, scorable_manifest(paths.dataset_id, 2), paths.manifest, cfg.experiment.group_id)
    conn.close()
    mx = MatrixFile.model_validate({"name": "spec", "engines": {"kvpress": {
        "runtime": "process", "device": "cpu", "dtype": "float32", "compression_ratios": [0.5],
        "methods": ["full", {"method": "adakv", "inner": {"method": "knorm"}}]}}})
    exp = expand(cfg, mx)
    s = MatrixRunner(cfg, exp, inventory(slots=1), cwd=tmp_path).run()
    assert s.ok, [(o.cell.label, o.reason) for o in s.outcomes]
    conn = connect(paths.db)
    got = rows(conn, "SELECT r.cell_id, p.kv_applied_json FROM responses p JOIN requests r USING (request_id)")
    conn.close()
    ada = [json.loads(g["kv_applied_json"]) for g in got if ".adakv." in g["cell_id"]]
    assert len(ada) == 2
    for a in ada:
        assert a["press"] == {"method": "adakv", "alpha_safeguard": 0.2, "inner": {"method": "knorm"}}
        assert a["masked"] is True and a["kv_bytes_after"] == a["kv_bytes_before"]
