"""LongBench v2 chain of thought as its pred.py --cot does it: the reasoning request (0shot_cot, the
manifest prompt), then the 0shot_cot_ans request carrying that reasoning, to the same engine with the
same KV method; the second response is scored. Both are recorded once (responses / followups), a run
killed between the two sends only the follow-up next time, and empty responses are left out of accuracy.

The end-to-end test runs the real kvpress engine (process runtime, CPU) on the tiny model; the resume
test uses the TEST DOUBLE server, whose crash knob kills it between the two requests of an example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.db import connect, rows
from kv_transition.manifest.store import read_json
from kv_transition.score.longbench_v2 import extract_answer
from tests.conftest import write_yaml
from tests.datasets.conftest import v2_record, write_v2_json, write_v2_prompts

ANS_TAIL = "\n\nAnswer:"  # the fixture's 0shot_cot_ans ends with "Reasoning: $COT$\n\nAnswer:"


def _cot_config(project: Path, n: int = 2, **top) -> Path:
    data = write_v2_json(project / "lb2" / "data.json", [v2_record(i) for i in range(n)])
    prompts = write_v2_prompts(project / "lb2" / "prompts")
    raw = {
        "extends": "../default.yaml",
        "experiment": {"group_id": "v2cot"},
        "dataset": {"source": "longbench_v2", "longbench_v2": {
            "path": str(data), "prompt_config": {"path": str(prompts)}, "cot": True}},
        "binning": {"edges": [0, 400]},
        "model": {"max_context": 2048},
        "engine": {"port": 18493},
        "telemetry": {"interval_s": 0.5},
    }
    for k, v in top.items():
        raw[k] = {**raw.get(k, {}), **v}
    return write_yaml(project / "config" / "experiments" / "v2cot.yaml", raw)


def _expected_followup(tok, ex: dict, first: str) -> str:
    """The fixture's 0shot_cot_ans filled as pred.py fills it ($COT$ = the first response, stripped)."""
    c = ex["meta"]["choices"]
    body = (f"Read the document.\n\n<text>\n(omitted)\n</text>\n\nQuestion: {ex['question']}\nChoices:\n"
            + "".join(f"({k}) {c[k]}\n" for k in "ABCD") + f"\nReasoning: {first.strip()}{ANS_TAIL}")
    return tok.chat(body)


def test_manifest_carries_the_answer_template(project, smol_tokenizer):
    cfg_file = _cot_config(project)
    assert main(["prepare", "-q", "-c", str(cfg_file)]) == 0
    man = read_json(resolve_paths(load_config(cfg_file)).manifest)
    fu = man["followups"]["longbench_v2"]
    assert fu["max_new_tokens"] == 128 and fu["file"] == "0shot_cot_ans.txt" and fu["chat"] is True
    assert "{cot}" in fu["template"] and "$" not in fu["template"] and "{context}" not in fu["template"]
    assert {e["max_new_tokens"] for e in man["entries"]} == {1024}
    cfg_o = load_config(cfg_file, ["decoding.max_new_tokens=32"])  # an explicit budget is both requests'
    from kv_transition.manifest.prepare import followups

    assert followups(cfg_o, resolve_paths(cfg_o))["longbench_v2"]["max_new_tokens"] == 32
    # without cot the manifest has no followups key (one-request manifests keep their content hash)
    cfg2 = _cot_config(project, dataset={"source": "longbench_v2", "longbench_v2": {
        "path": str(project / "lb2" / "data.json"), "prompt_config": {"path": str(project / "lb2" / "prompts")}}})
    assert main(["prepare", "-q", "-c", str(cfg2)]) == 0
    assert "followups" not in read_json(resolve_paths(load_config(cfg2)).manifest)


def test_followup_prompt_is_truncated_in_the_middle_to_max_context(smol_tokenizer):
    from kv_transition.datasets import longbench_v2 as v2
    from kv_transition.datasets.schema import Example
    from kv_transition.manifest.prompts import PromptBuilder

    template = v2.to_template("Q: $Q$\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\nReasoning: $COT$\nAnswer:",
                              "t", answer=True)
    ex = Example("e1", "Which?", "ctx", ["A"], {"task": "longbench_v2", "choices": dict(zip("ABCD", "wxyz"))})
    b = PromptBuilder(smol_tokenizer, max_context=256)
    cot = "step " * 400 + "{context} stays verbatim"
    bp = b.build_followup(ex, template, cot, 128, chat=True)
    assert bp.truncated and bp.final_tokens <= 256 - 128 and bp.original_tokens > 256
    assert bp.prompt.startswith(smol_tokenizer.chat("Q: Which?")[:20]) and "{context} stays verbatim" in bp.prompt
    assert bp.prompt.rstrip().endswith(smol_tokenizer.chat("x\nAnswer:").rstrip()[-20:])
    assert bp.question_start is not None and bp.prompt[bp.question_start:].startswith("\nAnswer:")
    with pytest.raises(Exception, match=r"without .*\$COT\$"):
        v2.to_template("$DOC$ $Q$ $C_A$ $C_B$ $C_C$ $C_D$", "t", answer=True)


@pytest.mark.engine
def test_cot_two_requests_end_to_end_on_the_real_kvpress_engine(project, smol_tokenizer, monkeypatch):
    """prepare → run (snapkv r=0.5) → score → analyze → report on the real engine."""
    from tests.matrix.test_kvpress_real import _kvpress_loadable

    why = _kvpress_loadable()
    if why:
        pytest.skip(why)
    monkeypatch.delenv("KVT_ENGINES_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg_file = _cot_config(project, decoding={"max_new_tokens": 24})  # both budgets, kept short on CPU
    assert main(["prepare", "-q", "-c", str(cfg_file)]) == 0
    assert main(["run", "-q", "-c", str(cfg_file), "--method", "snapkv", "--ratio", "0.5"]) == 0
    paths = resolve_paths(load_config(cfg_file))
    man = read_json(paths.manifest)
    exs = {e["example_id"]: e for e in man["examples"]}
    conn = connect(paths.db)
    reqs = rows(conn, "SELECT q.request_id, q.cell_id, q.example_id, q.status, p.text AS first, f.prompt, f.text,"
                      " p.kv_applied_json AS kv1, f.kv_applied_json AS kv2, f.prompt_tokens,"
                      " p.prompt_tokens AS p1_tokens FROM requests q JOIN responses p USING (request_id)"
                      " LEFT JOIN followups f USING (request_id)")
    assert len(reqs) == 2 and {r["status"] for r in reqs} == {"ok"}
    for r in reqs:
        if r["first"] == "":
            assert r["prompt"] is None  # pred.py asks nothing more after an empty reasoning
            continue
        assert r["prompt"] == _expected_followup(smol_tokenizer, exs[r["example_id"]], r["first"])
        assert r["prompt_tokens"] < r["p1_tokens"]  # the answer request has no document
        # the same KV method on both requests
        assert json.loads(r["kv1"])["method"] == "snapkv" and json.loads(r["kv2"])["method"] == "snapkv"
    # every request was sent exactly twice, step 1 then step 2, each attempt once
    steps = rows(conn, "SELECT request_id, GROUP_CONCAT(step) s FROM (SELECT * FROM attempts ORDER BY attempt_no)"
                       " GROUP BY request_id")
    assert {s["s"] for s in steps} == {"1,2"}
    assert [r["n_ok"] for r in rows(conn, "SELECT n_ok FROM runs ORDER BY run_id")] == [2]
    conn.close()

    assert main(["score", "-q", "-c", str(cfg_file)]) == 0
    conn = connect(paths.db)
    got = {(s["cell_id"], s["example_id"]): s["score"] for s in rows(conn, "SELECT * FROM scores")}
    for r in reqs:
        if r["text"] is not None:  # scored from the answer request, not the reasoning
            gold = exs[r["example_id"]]["answers"][0]
            assert got[(r["cell_id"], r["example_id"])] == float(extract_answer(r["text"]) == gold)
    conn.close()
    assert main(["analyze", "-c", str(cfg_file)]) == 0
    assert main(["report", "-c", str(cfg_file)]) == 0
    html = (paths.report_dir / "index.html").read_text()
    assert "LongBench v2" in html


def test_killed_between_the_two_requests_resends_only_the_followup(project, smol_tokenizer, monkeypatch, tmp_path):
    """The TEST DOUBLE engine crashes on the 2nd completion request: the first example's reasoning is in,
    its answer request is not. The re-run sends that example's answer request only (no second reasoning),
    the other example both; every example ends with one responses row and one followups row."""
    from kv_transition.cell import run_cell
    from tests.runner.conftest import FAKE_ENGINE_YAML, SubprocessFakeRuntime

    eng = tmp_path / "engines" / "fake"
    eng.mkdir(parents=True)
    (eng / "engine.yaml").write_text(FAKE_ENGINE_YAML)
    monkeypatch.setenv("KVT_ENGINES_DIR", str(tmp_path / "engines"))
    cfg_file = _cot_config(project, engine={"name": "fake", "concurrency": 1},
                           decoding={"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "max_retries": 1})
    assert main(["prepare", "-q", "-c", str(cfg_file)]) == 0
    cfg = load_config(cfg_file)
    paths = resolve_paths(cfg)
    reply = ("--reply", "The correct answer is (B)")
    res = run_cell(cfg, paths, runtime_impl=SubprocessFakeRuntime(("--crash-after", "1", *reply)),
                   watchdog_interval_s=0.05)
    assert res.status == "incomplete" and res.n_ok == 0, res.reason
    conn = connect(paths.db)
    assert rows(conn, "SELECT COUNT(*) n FROM responses")[0]["n"] == 1
    assert rows(conn, "SELECT COUNT(*) n FROM followups")[0]["n"] == 0
    first = rows(conn, "SELECT request_id, text FROM responses")[0]
    run1 = rows(conn, "SELECT n_ok FROM runs")[0]
    assert run1["n_ok"] == 0  # a reasoning without its answer is not an answered request

    res2 = run_cell(cfg, paths, runtime_impl=SubprocessFakeRuntime(reply))
    assert res2.status == "completed" and res2.n_ok == 2 and res2.n_todo == 2, res2.reason
    sent = rows(conn, "SELECT request_id, step FROM attempts WHERE run_id=? ORDER BY attempt_no", (res2.run_id,))
    by_req: dict[int, list[int]] = {}
    for a in sent:
        by_req.setdefault(a["request_id"], []).append(a["step"])
    assert by_req[first["request_id"]] == [2]  # only the missing answer request
    assert [v for k, v in by_req.items() if k != first["request_id"]] == [[1, 2]]
    assert rows(conn, "SELECT COUNT(*) n FROM responses")[0]["n"] == 2
    assert rows(conn, "SELECT COUNT(*) n FROM followups")[0]["n"] == 2
    assert rows(conn, "SELECT text FROM responses WHERE request_id=?", (first["request_id"],))[0]["text"] == first["text"]
    fu = rows(conn, "SELECT prompt, run_id FROM followups WHERE request_id=?", (first["request_id"],))[0]
    assert fu["run_id"] == res2.run_id and "Reasoning: The correct answer is (B)" in fu["prompt"]
    # attempt numbers continue across runs and steps; the run counts its two answered requests once each
    assert rows(conn, "SELECT COUNT(*) n FROM (SELECT 1 FROM attempts GROUP BY request_id, attempt_no"
                      " HAVING COUNT(*) > 1)")[0]["n"] == 0
    assert rows(conn, "SELECT n_ok FROM runs WHERE run_id=?", (res2.run_id,))[0]["n_ok"] == 2
    conn.close()
    # a third run has nothing to send
    res3 = run_cell(cfg, paths, runtime_impl=SubprocessFakeRuntime(reply))
    assert res3.n_todo == 0 and res3.status == "completed"


def test_empty_responses_are_left_out_like_pred_py(project, smol_tokenizer, monkeypatch, tmp_path, capsys):
    """An empty reasoning asks nothing more and an empty answer is not judged: neither gets a score row
    (pred.py writes no result for them); a whitespace-only answer is judged (no answer: 0)."""
    from kv_transition.cell import run_cell
    from tests.runner.conftest import FAKE_ENGINE_YAML, SubprocessFakeRuntime

    eng = tmp_path / "engines" / "fake"
    eng.mkdir(parents=True)
    (eng / "engine.yaml").write_text(FAKE_ENGINE_YAML)
    monkeypatch.setenv("KVT_ENGINES_DIR", str(tmp_path / "engines"))
    cfg_file = _cot_config(project, n=3, engine={"name": "fake"})
    assert main(["prepare", "-q", "-c", str(cfg_file)]) == 0
    cfg = load_config(cfg_file)
    paths = resolve_paths(cfg)
    res = run_cell(cfg, paths, runtime_impl=SubprocessFakeRuntime(("--reply", "")))
    assert res.status == "completed" and res.n_ok == 3
    conn = connect(paths.db)
    assert rows(conn, "SELECT COUNT(*) n FROM followups")[0]["n"] == 0  # no answer request after ''
    assert {a["step"] for a in rows(conn, "SELECT step FROM attempts")} == {1}
    # the answer requests of a second cell: one empty, one blank, one real answer
    ids = [r["request_id"] for r in rows(conn, "SELECT request_id FROM requests ORDER BY request_id")]
    conn.execute("UPDATE responses SET text='I think so.'")
    now = "2026-01-01T00:00:00+00:00"
    for rid, text in zip(ids, ["", "  \n", "The correct answer is (A)"]):
        conn.execute("INSERT INTO followups(request_id, attempt_no, run_id, prompt, prompt_truncated, text, e2e_s,"
                     " itl_json, n_chunks, streamed, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                     (rid, 2, res.run_id, "p", 0, text, 0.1, "[]", 1, 1, now))
    conn.close()
    capsys.readouterr()
    assert main(["score", "-q", "-c", str(cfg_file)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal width
    assert "1 empty LongBench v2 response(s) left out" in out and "scored 2 response(s)" in out
    conn = connect(paths.db)
    sc = {s["request_id"]: s["score"] for s in rows(conn, "SELECT request_id, score FROM scores")}
    assert set(sc) == set(ids[1:]) and sc[ids[1]] == 0.0
    conn.close()
