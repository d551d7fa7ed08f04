"""`kvt prepare` on LongBench data end to end: the official data.zip layout, LongBench's own prompt
configuration (the shared reference copy when present, else a local dir in the same format), the
tasks that skip the chat template, per-task generation budgets, middle truncation, LongBench-E names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.manifest.store import read_json
from kv_transition.score import score_longbench
from tests.conftest import write_yaml
from tests.datasets.conftest import lb_record, write_zip

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "longbench"


def _prompt_config(project: Path) -> Path:
    if (SHARED / "dataset2prompt.json").is_file():
        return SHARED
    from kv_transition.datasets.longbench import LONGBENCH_V1_TASKS

    d = project / "lbconfig"  # same format, our own words (the official files are never copied here)
    d.mkdir()
    prompts = {t: "Read this.\n\n{context}\n\nQuestion: {input}\nAnswer:" for t in LONGBENCH_V1_TASKS}
    prompts.update({"hotpotqa": "Answer from the passages.\n\n{context}\n\nQuestion: {input}\nAnswer:",
                    "trec": "Classify the question.\n\n{context}\n{input}"})
    (d / "dataset2prompt.json").write_text(json.dumps(prompts))
    (d / "dataset2maxlen.json").write_text(json.dumps({t: (64 if t == "trec" else 32) for t in LONGBENCH_V1_TASKS}))
    return d


@pytest.fixture
def longbench_cfg(project: Path) -> Path:
    long_ctx = "The river flows past the old mill. " * 400  # ~3.2k tokens: truncated at max_context 2048
    write_zip(project / "lb" / "data.zip", {
        "hotpotqa": [lb_record("hotpotqa", 0), lb_record("hotpotqa", 1, context=long_ctx)],
        "trec": [lb_record("trec", 0, all_classes=["Location", "Person"], answers=["Location"])],
        "hotpotqa_e": [lb_record("hotpotqa_e", 0, length=5000)],
    })
    return write_yaml(project / "config" / "experiments" / "lb.yaml", {
        "extends": "../default.yaml",
        "experiment": {"group_id": "lb"},
        "dataset": {"source": "longbench", "longbench": {
            "tasks": ["hotpotqa", "trec", "hotpotqa_e"], "source": "zip", "path": str(project / "lb" / "data.zip"),
            "prompt_config": {"path": str(_prompt_config(project))}}},
        "binning": {"edges": [0, 1000]},
        "model": {"max_context": 2048},
    })


def test_prepare_longbench_zip_end_to_end(longbench_cfg: Path, smol_tokenizer, capsys: pytest.CaptureFixture):
    assert main(["prepare", "-q", "-c", str(longbench_cfg)]) == 0
    cfg = load_config(longbench_cfg)
    paths = resolve_paths(cfg)
    m = read_json(paths.manifest)
    d2p = json.loads((Path(cfg.dataset.longbench.prompt_config.path) / "dataset2prompt.json").read_text())
    d2m = json.loads((Path(cfg.dataset.longbench.prompt_config.path) / "dataset2maxlen.json").read_text())
    by_task: dict[str, list[dict]] = {}
    for e in m["entries"]:
        by_task.setdefault(e["task"], []).append(e)
    assert {t: len(v) for t, v in by_task.items()} == {"hotpotqa": 2, "trec": 1, "hotpotqa_e": 1}
    # trec skips the chat template (LongBench's pred.py); QA tasks get it
    (trec,) = by_task["trec"]
    assert not trec["chat"] and not trec["prompt"].startswith("<|im_start|>")
    assert all(e["chat"] and e["prompt"].startswith("<|im_start|>") for e in by_task["hotpotqa"])
    # per-task budgets from dataset2maxlen; _e tasks use their base task's template and budget
    assert trec["max_new_tokens"] == d2m["trec"] and by_task["hotpotqa_e"][0]["max_new_tokens"] == d2m["hotpotqa"]
    head = d2p["hotpotqa"].split("{context}")[0]
    assert head in by_task["hotpotqa_e"][0]["prompt"]
    # the long example is middle-truncated to max_context - max_new_tokens, exactly
    long = max(by_task["hotpotqa"], key=lambda e: e["original_tokens"])
    assert long["truncated"] and long["final_tokens"] <= 2048 - long["max_new_tokens"] < long["original_tokens"]
    assert long["final_tokens"] == len(smol_tokenizer.encode(long["prompt"]))
    assert "Question 1 about hotpotqa?" in long["prompt"]  # the question at the end survives
    # examples keep LongBench's fields for scoring
    ex = {x["example_id"]: x for x in m["examples"]}[trec["example_id"]]
    assert ex["meta"]["all_classes"] == ["Location", "Person"] and ex["answers"] == ["Location"]
    assert score_longbench("trec", "Location\nextra line", ex["answers"], ex["meta"]["all_classes"]) == 1.0
    assert main(["manifest", "verify", "-c", str(longbench_cfg)]) == 0


def test_unknown_longbench_task_is_a_clear_error(longbench_cfg: Path, capsys: pytest.CaptureFixture):
    assert main(["prepare", "-q", "-c", str(longbench_cfg), "-o", "dataset.longbench.tasks=[HotpotQA]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvt: error: ") and "hotpotqa" in err and err.count("\n") == 1
    assert not resolve_paths(load_config(longbench_cfg, ["dataset.longbench.tasks=[HotpotQA]"])).manifest.exists()
