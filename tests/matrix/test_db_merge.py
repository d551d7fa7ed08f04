"""`kvt db merge` / db.merge: two hosts run parts of one experiment group by hand (the TEST DOUBLE engines,
process runtime); merging their DBs gives every request answered exactly once, a re-merge adds nothing,
different answers/manifests are conflicts (reported, nothing overwritten), another group is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kv_transition.db import connect, rows
from kv_transition.matrix import expand, load_matrix
from kv_transition.matrix.inventory import inventory
from kv_transition.matrix.run import MatrixRunner

REPO = Path(__file__).resolve().parents[2]
ENV = {"FAKE_TOKEN_DELAY": "0.01"}
BOTH = {"name": "mg", "engines": {"fakekv": {"compression_ratios": [0.5], "methods": ["full", "snapkv"], "env": ENV},
                                  "fakesrv": {"methods": ["full"], "env": ENV}}}


def _run(cpath: Path, mpath: Path) -> Any:
    from kv_transition.config import load_config

    cfg = load_config(cpath, env=dict(os.environ))
    return MatrixRunner(cfg, expand(cfg, load_matrix(mpath)), inventory(slots=1), cwd=cpath.parent).run()


def _kvt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kv_transition", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "harness")})


def _answers(db: Path) -> dict[tuple[str, str, int], str]:
    conn = connect(db)
    try:
        return {(r["cell_id"], r["example_id"], r["repeat"]): r["text"] for r in rows(
            conn, "SELECT q.cell_id, q.example_id, q.repeat, p.text FROM requests q JOIN responses p USING(request_id)")}
    finally:
        conn.close()


def _count(db: Path, sql: str) -> int:
    conn = connect(db)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def test_two_hosts_by_hand_merge_exactly_once(experiment, tmp_path: Path) -> None:
    # host A runs the request-mode engine's cells, host B the server-mode one, each with its own DB
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    cpa, _, _, pa = experiment(4, {**BOTH, "engines": {"fakekv": BOTH["engines"]["fakekv"]}}, root=a_root)
    cpb, _, _, pb = experiment(4, {**BOTH, "engines": {"fakesrv": BOTH["engines"]["fakesrv"]}}, root=b_root)
    assert _run(cpa, a_root / "matrix" / "mg.yaml").ok and _run(cpb, b_root / "matrix" / "mg.yaml").ok
    want = {**_answers(pa.db), **_answers(pb.db)}
    assert len(want) == 12
    # a third, reference host ran everything: the merged DB must equal it cell for cell
    r = _kvt("db", "merge", "--into", str(pa.db), str(pb.db))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "added" in r.stdout and "conflict" not in r.stdout
    assert _answers(pa.db) == want
    n_req = _count(pa.db, "SELECT COUNT(*) FROM requests")
    n_att = _count(pa.db, "SELECT COUNT(*) FROM attempts")
    n_tel = _count(pa.db, "SELECT COUNT(*) FROM telemetry_host")
    assert n_req == 12 and n_att == 12
    assert _count(pa.db, "SELECT COUNT(*) FROM runs") == 3
    assert _count(pa.db, "SELECT COUNT(*) FROM cells WHERE status='completed' AND n_ok=n_requests") == 3
    assert _count(pa.db, "SELECT COUNT(*) FROM matrix_runs") == 2
    # every attempt and response points at a run of its own cell (ids re-mapped, not copied)
    assert _count(pa.db, "SELECT COUNT(*) FROM attempts a JOIN requests q USING(request_id) JOIN runs r"
                         " ON r.run_id=a.run_id WHERE r.cell_id<>q.cell_id") == 0
    # re-merge (a re-sent batch): adds nothing
    r = _kvt("db", "merge", "--into", str(pa.db), str(pb.db), "--json")
    assert r.returncode == 0, r.stderr
    import json

    rep = json.loads(r.stdout)["sources"][0]
    assert sum(rep["added"].values()) == 0 and rep["conflicts"] == []
    assert (_count(pa.db, "SELECT COUNT(*) FROM requests"), _count(pa.db, "SELECT COUNT(*) FROM attempts"),
            _count(pa.db, "SELECT COUNT(*) FROM telemetry_host")) == (n_req, n_att, n_tel)
    # and the merged DB scores like one host's: `kvt score` on it scores all 12
    r = _kvt("score", "-c", str(cpa), "-q")
    assert r.returncode == 0, r.stderr + r.stdout
    assert _count(pa.db, "SELECT COUNT(*) FROM scores") == 12


def test_a_missing_answer_is_filled_from_the_other_db(experiment, tmp_path: Path) -> None:
    """Two copies of one DB each lack a different answer: the merge fills the gap forward (pending → ok)."""
    cpa, mpa, cfg, pa = experiment(4, {**BOTH, "engines": {"fakekv": BOTH["engines"]["fakekv"]}})
    assert _run(cpa, mpa).ok
    b = tmp_path / "b.sqlite"
    shutil.copy(pa.db, b)
    conn = connect(b)  # B: one answer "lost" → B's resume resends it, under a new run
    rid = conn.execute("SELECT request_id FROM requests ORDER BY request_id LIMIT 1").fetchone()[0]
    conn.execute("DELETE FROM responses WHERE request_id=?", (rid,))
    conn.execute("UPDATE requests SET status='pending' WHERE request_id=?", (rid,))
    conn.close()
    conn = connect(pa.db)
    conn.execute("DELETE FROM responses WHERE request_id=(SELECT MAX(request_id) FROM requests)")
    conn.execute("UPDATE requests SET status='pending' WHERE request_id=(SELECT MAX(request_id) FROM requests)")
    conn.execute("UPDATE cells SET status='incomplete'")
    conn.close()
    r = _kvt("db", "merge", "--into", str(pa.db), str(b))
    assert r.returncode == 0, r.stderr + r.stdout
    assert _count(pa.db, "SELECT COUNT(*) FROM requests WHERE status='ok'") == 8
    assert _count(pa.db, "SELECT COUNT(*) FROM responses") == 8
    assert _count(pa.db, "SELECT COUNT(*) FROM cells WHERE status='completed'") == 2


def test_conflicts_are_reported_and_nothing_is_overwritten(experiment, tmp_path: Path) -> None:
    cpa, mpa, cfg, pa = experiment(3, {**BOTH, "engines": {"fakekv": BOTH["engines"]["fakekv"]}})
    assert _run(cpa, mpa).ok
    b = tmp_path / "b.sqlite"
    shutil.copy(pa.db, b)
    conn = connect(b)
    conn.execute("UPDATE responses SET text='a different answer' WHERE request_id=(SELECT MIN(request_id) FROM responses)")
    conn.execute("UPDATE datasets SET content_hash='sha256:other'")
    conn.close()
    before = _answers(pa.db)
    r = _kvt("db", "merge", "--into", str(pa.db), str(b))
    assert r.returncode == 1, r.stderr + r.stdout
    assert "conflict" in r.stdout and "dataset" in r.stdout and _answers(pa.db) == before
    # the dataset conflict kept the cells of that dataset out; the answer conflict alone is reported too
    conn = connect(b)
    conn.execute("UPDATE datasets SET content_hash=(SELECT content_hash FROM datasets)")
    conn.close()
    src = connect(pa.db)
    good = src.execute("SELECT content_hash FROM datasets").fetchone()[0]
    src.close()
    conn = connect(b)
    conn.execute("UPDATE datasets SET content_hash=?", (good,))
    conn.close()
    r = _kvt("db", "merge", "--into", str(pa.db), str(b))
    assert r.returncode == 1 and "a different answer" in r.stdout and _answers(pa.db) == before


def test_another_group_is_refused_with_one_line(experiment, tmp_path: Path) -> None:
    cpa, mpa, cfg, pa = experiment(2, {**BOTH, "engines": {"fakekv": {**BOTH["engines"]["fakekv"], "methods": ["full"]}}})
    assert _run(cpa, mpa).ok
    b = tmp_path / "b.sqlite"
    shutil.copy(pa.db, b)
    conn = connect(b)
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("UPDATE experiments SET group_id='other'")
    conn.execute("UPDATE cells SET group_id='other'")
    conn.close()
    n = _count(pa.db, "SELECT COUNT(*) FROM runs")
    r = _kvt("db", "merge", "--into", str(pa.db), str(b))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "'other'" in r.stderr, r.stderr
    assert _count(pa.db, "SELECT COUNT(*) FROM runs") == n
    r = _kvt("db", "merge", "--into", str(pa.db), str(tmp_path / "missing.sqlite"))
    assert r.returncode == 2 and "no such database" in r.stderr


def test_follow_up_answers_merge_with_their_request(experiment, tmp_path: Path) -> None:
    """A two-request example's follow-up (table followups) travels with its request, ids re-mapped."""
    cpa, mpa, cfg, pa = experiment(2, {**BOTH, "engines": {"fakekv": {**BOTH["engines"]["fakekv"], "methods": ["full"]}}})
    assert _run(cpa, mpa).ok
    b = tmp_path / "b.sqlite"
    shutil.copy(pa.db, b)
    conn = connect(b)
    q = rows(conn, "SELECT p.request_id, p.run_id, p.attempt_no, q.example_id FROM responses p JOIN requests q"
                   " USING(request_id) ORDER BY p.request_id LIMIT 1")[0]
    conn.execute("INSERT INTO followups(request_id, attempt_no, run_id, prompt, prompt_truncated, text, e2e_s, itl_json,"
                 " n_chunks, streamed, created_at) VALUES (?,?,?,'step 2',0,'The answer is (A)',0.1,'[]',1,1,'t')",
                 (q["request_id"], q["attempt_no"], q["run_id"]))
    conn.close()
    fresh = tmp_path / "fresh.sqlite"   # a DB that has only the manifest: every id is new there
    r = _kvt("db", "merge", "--into", str(fresh), str(b))
    assert r.returncode == 0, r.stderr + r.stdout
    conn = connect(fresh)
    got = rows(conn, "SELECT f.text, q.example_id, r.cell_id = q.cell_id AS same_cell FROM followups f"
                     " JOIN requests q USING(request_id) JOIN runs r ON r.run_id = f.run_id")
    conn.close()
    assert got == [{"text": "The answer is (A)", "example_id": q["example_id"], "same_cell": 1}]
    r = _kvt("db", "merge", "--into", str(fresh), str(b), "--json")
    import json

    assert sum(json.loads(r.stdout)["sources"][0]["added"].values()) == 0
