"""LongBench v2 scoring: pred.py's answer extraction, accuracy, result.py-style breakdowns (difficulty,
length split) plus domain / sub-domain and token bins; wired into `kvt score` next to the v1 metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.db import connect
from kv_transition.errors import DataError
from kv_transition.manifest.prepare import prepare
from kv_transition.score import score_longbench
from kv_transition.score.longbench_v2 import (
    FLAG_NO_ANSWER,
    accuracy_table,
    extract_answer,
    load_accuracy_table,
    score_v2,
)
from tests.conftest import write_yaml
from tests.datasets.conftest import v2_record, write_v2_json, write_v2_prompts


@pytest.mark.parametrize("response, letter", [
    ("The correct answer is (B)", "B"),
    ("**The correct answer is (C)**", "C"),  # '*' removed first
    ("The correct answer is **(D)**.", "D"),
    ("The correct answer is A", "A"),  # bare letter, second rule
    ("Hmm. The correct answer is (A). Wait, the correct answer is (B)", "A"),  # first match wins
    ("The correct answer is C ... The correct answer is (D)", "D"),  # the parenthesised form is tried first
    ("the correct answer is (B)", None),  # case-sensitive, like pred.py
    ("The correct answer is (E)", None),
    ("The answer is (B)", None),
    ("", None),
])
def test_extract_answer_like_pred_py(response, letter):
    assert extract_answer(response) == letter


def test_score_v2():
    assert score_v2("The correct answer is (B)", ["B"]) == (1.0, ())
    assert score_v2("The correct answer is (C)", ["B"]) == (0.0, ())
    assert score_v2("I cannot tell.", ["B"]) == (0.0, (FLAG_NO_ANSWER,))
    with pytest.raises(DataError, match="one answer letter"):
        score_v2("x", ["B", "C"])


def test_accuracy_table_groups_and_rounds_like_result_py():
    rows = []
    spec = [  # (bin, score, difficulty, length, domain, sub)
        (0, 1, "easy", "short", "Single-Document QA", "Academic"),
        (0, 0, "hard", "short", "Single-Document QA", "Legal"),
        (1, 1, "hard", "long", "Multi-Document QA", "News"),
        (1, 1, "easy", "medium", "Single-Document QA", "Academic"),
        (1, 0, "hard", "long", "Multi-Document QA", "News"),
        (1, 0, "hard", "long", "Multi-Document QA", "News"),
    ]
    for b, s, d, ln, dom, sub in spec:
        rows.append({"cell_id": "c", "bin_id": b, "score": s, "difficulty": d, "length_split": ln, "domain": dom,
                     "sub_domain": sub})
    t = {(r["bin_id"], r["dimension"], r["value"]): r for r in accuracy_table(rows)}
    assert t[(None, "overall", "all")]["accuracy"] == 50.0 and t[(None, "overall", "all")]["n"] == 6
    assert t[(None, "difficulty", "easy")]["accuracy"] == 100.0
    assert t[(None, "difficulty", "hard")]["accuracy"] == 25.0
    assert t[(None, "length", "long")]["accuracy"] == 33.3  # round(100 * 1/3, 1)
    assert t[(None, "length", "medium")]["n"] == 1
    assert t[(None, "domain", "Multi-Document QA")]["accuracy"] == 33.3
    assert t[(None, "sub_domain", "Academic")]["accuracy"] == 100.0
    assert t[(0, "overall", "all")]["accuracy"] == 50.0 and t[(1, "overall", "all")]["n"] == 4
    order = [(r["bin_id"], r["dimension"]) for r in accuracy_table(rows)][:6]
    assert order[0] == (None, "overall")


def test_v1_metrics_unchanged_by_v2():
    """The official v1 path is untouched: a few eval.py reference values."""
    assert score_longbench("hotpotqa", "The Eiffel Tower", ["Eiffel Tower"]) == 1.0
    assert score_longbench("passage_count", "3 and 3", ["3"]) == 1.0
    assert score_longbench("trec", "Location\nPerson", ["Location"], ["Location", "Person"]) == 1.0


@pytest.fixture
def v2_recorded(project: Path):
    from tests.report.test_stages import _record_cell

    recs = [v2_record(i) for i in range(8)]
    data = write_v2_json(project / "lb2" / "data.json", recs)
    prompts = write_v2_prompts(project / "lb2" / "prompts")
    cfg_file = write_yaml(project / "config" / "experiments" / "v2s.yaml", {
        "extends": "../default.yaml",
        "experiment": {"group_id": "v2s"},
        "dataset": {"source": "longbench_v2", "longbench_v2": {"path": str(data), "prompt_config": {"path": str(prompts)}}},
        "binning": {"edges": [0, 600]},
        "model": {"max_context": 2048},
    })
    cfg = load_config(cfg_file)
    paths = resolve_paths(cfg)
    prepare(cfg, paths)
    conn = connect(paths.db)
    # full cache: always right (markdown bold around it); the method: right only in bin 0, else no answer
    _record_cell(conn, "kvpress.full-aaaa", "full", paths.dataset_id, lambda b, a: f"**The correct answer is ({a})**")
    _record_cell(conn, "kvpress.snapkv.r0.5-bbbb", "snapkv", paths.dataset_id,
                 lambda b, a: f"The correct answer is {a}" if b == 0 else "It is unclear.")
    conn.close()
    return cfg_file, paths


def test_kvt_score_scores_v2_as_accuracy(v2_recorded, capsys):
    cfg_file, paths = v2_recorded
    assert main(["score", "-q", "-c", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert "scored 16 response(s)" in out and "LongBench v2 accuracy" in out
    conn = connect(paths.db)
    assert {r[0] for r in conn.execute("SELECT DISTINCT metric FROM scores")} == {"accuracy"}
    per = dict(conn.execute("SELECT cell_id, AVG(score) FROM scores GROUP BY cell_id").fetchall())
    bins = dict(conn.execute("SELECT example_id, bin_id FROM manifest_entries").fetchall())
    n0 = sum(1 for b in bins.values() if b == 0)
    assert 0 < n0 < 8
    assert per == {"kvpress.full-aaaa": 1.0, "kvpress.snapkv.r0.5-bbbb": pytest.approx(n0 / 8)}
    flags = conn.execute("SELECT flags_json FROM scores WHERE cell_id LIKE '%snapkv%' AND score = 0").fetchall()
    assert flags and all(json.loads(f[0]) == [FLAG_NO_ANSWER] for f in flags)
    table = load_accuracy_table(conn)
    conn.close()
    t = {(r["cell_id"], r["bin_id"], r["dimension"], r["value"]): r for r in table}
    assert t[("kvpress.full-aaaa", None, "overall", "all")]["accuracy"] == 100.0
    assert t[("kvpress.snapkv.r0.5-bbbb", 0, "overall", "all")]["accuracy"] == 100.0
    assert t[("kvpress.snapkv.r0.5-bbbb", 1, "overall", "all")]["accuracy"] == 0.0
    for dim, values in (("difficulty", {"easy", "hard"}), ("length", {"short", "medium", "long"})):
        assert {k[3] for k in t if k[0] == "kvpress.full-aaaa" and k[1] is None and k[2] == dim} == values
    assert ("kvpress.full-aaaa", None, "domain", "Code Repository Understanding") in t
    # analysis runs on v2 scores like on any other dataset (per bin, vs the full cache)
    assert main(["analyze", "-c", str(cfg_file)]) == 0
