"""LongBench v2 as a dataset: data.json in the Hub repo's format (downloaded once from a loopback server,
sha256 recorded, or a local file), its fields on canonical examples, filters, its 0shot / 0shot_cot
templates with the choices filled in, middle truncation to model.max_context, token bins."""

from __future__ import annotations

import json

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.config.schema import LONGBENCH_V2_URL, LongBenchV2Cfg, LongBenchV2PromptSource
from kv_transition.datasets import list_tasks
from kv_transition.datasets import longbench_v2 as v2
from kv_transition.datasets.download import sha256_file, sidecar
from kv_transition.errors import DataError
from kv_transition.manifest.store import read_json
from tests.conftest import write_yaml

from .conftest import v2_record, write_v2_json, write_v2_prompts


def test_record_fields_map_onto_the_example(tmp_path, data_root):
    f = write_v2_json(tmp_path / "data.json", [v2_record(i) for i in range(4)])
    exs = v2.load_longbench_v2(LongBenchV2Cfg(path=str(f)), data_root)
    assert [e.task for e in exs] == ["longbench_v2"] * 4
    e = exs[1]
    rec = v2_record(1)
    assert e.question == rec["question"].strip() and e.context == rec["context"].strip()  # stripped like pred.py
    assert e.answers == ["B"]
    assert e.meta["choices"] == {"A": "Statement 1-A", "B": "Statement 1-B", "C": "Statement 1-C", "D": "Statement 1-D"}
    assert (e.meta["domain"], e.meta["sub_domain"], e.meta["difficulty"], e.meta["length_split"]) == (
        "Multi-Document QA", "News", "hard", "medium")
    assert e.meta["orig_id"] == rec["_id"] and e.meta["source"] == "longbench_v2" and e.meta["metric"] == "accuracy"
    assert len({x.example_id for x in exs}) == 4
    assert not (data_root / "raw").exists()  # a local file is read in place


def test_filters_and_limit(tmp_path, data_root):
    f = write_v2_json(tmp_path / "data.json", [v2_record(i) for i in range(12)])
    only = v2.load_longbench_v2(LongBenchV2Cfg(path=str(f), lengths=["long"], difficulties=["hard"]), data_root)
    assert only and all(e.meta["length_split"] == "long" and e.meta["difficulty"] == "hard" for e in only)
    qa = v2.load_longbench_v2(LongBenchV2Cfg(path=str(f), domains=["Single-Document QA"], limit=2), data_root)
    assert len(qa) == 2 and {e.meta["domain"] for e in qa} == {"Single-Document QA"}
    with pytest.raises(DataError, match="'Single-Doc QA' is not a domain"):
        v2.load_longbench_v2(LongBenchV2Cfg(path=str(f), domains=["Single-Doc QA"]), data_root)


@pytest.mark.parametrize("over, match", [
    ({"answer": "E"}, "'answer' must be one of A, B, C, D"),
    ({"length": "huge"}, "'length' must be one of short, medium, long"),
    ({"difficulty": "medium"}, "'difficulty' must be one of easy, hard"),
    ({"choice_C": None}, "missing required LongBench v2 field 'choice_C'"),
    ({"context": 12}, "field 'context' must be a string"),
])
def test_malformed_records_name_item_and_field(tmp_path, data_root, over, match):
    f = write_v2_json(tmp_path / "data.json", [v2_record(0), v2_record(1, **over)])
    with pytest.raises(DataError, match=rf"data\.json item 1: .*{match}"):
        v2.load_longbench_v2(LongBenchV2Cfg(path=str(f)), data_root)


def test_duplicate_id_and_jsonl(tmp_path, data_root):
    f = write_v2_json(tmp_path / "data.json", [v2_record(0), v2_record(0)])
    with pytest.raises(DataError, match="duplicate _id"):
        v2.load_longbench_v2(LongBenchV2Cfg(path=str(f)), data_root)
    j = tmp_path / "v2.jsonl"
    j.write_text("".join(json.dumps(v2_record(i)) + "\n" for i in range(3)))
    assert len(v2.load_longbench_v2(LongBenchV2Cfg(path=str(j)), data_root)) == 3


def test_hub_data_json_downloaded_once_with_checksum(tmp_path, data_root, serve_dir):
    assert LongBenchV2Cfg().url == LONGBENCH_V2_URL
    assert LONGBENCH_V2_URL == "https://huggingface.co/datasets/THUDM/LongBench-v2/resolve/main/data.json"
    www = tmp_path / "www"
    f = write_v2_json(www / "datasets/THUDM/LongBench-v2/resolve/main/data.json", [v2_record(i) for i in range(3)])
    base, hits = serve_dir(www)
    c = LongBenchV2Cfg(url=f"{base}/datasets/THUDM/LongBench-v2/resolve/main/data.json")
    first = v2.load_longbench_v2(c, data_root)
    again = v2.load_longbench_v2(c, data_root)
    assert len(hits) == 1 and [e.to_dict() for e in first] == [e.to_dict() for e in again]
    dest = v2.download_path(c.url, data_root)
    assert json.loads(sidecar(dest).read_text())["sha256"] == sha256_file(f)
    assert v2.provenance(c, data_root)[0]["sha256"] == sha256_file(f)


def test_unreachable_data_names_url_and_alternatives(data_root, closed_port_url):
    with pytest.raises(DataError) as ei:
        v2.load_longbench_v2(LongBenchV2Cfg(url=f"{closed_port_url}/data.json"), data_root)
    msg = str(ei.value)
    assert "\n" not in msg and f"{closed_port_url}/data.json" in msg
    assert "dataset.longbench_v2.url" in msg and "dataset.longbench_v2.path" in msg
    assert not (data_root / "raw").exists()


def test_templates_local_fetched_and_cached(tmp_path, data_root, serve_dir, closed_port_url):
    d = write_v2_prompts(tmp_path / "prompts")
    t = v2.load_template(LongBenchV2PromptSource(path=str(d)), data_root, cot=False)
    assert "$" not in t and "{context}" in t and "{input}" in t and "{choice_D}" in t
    assert t.endswith('"The correct answer is (insert answer here)".')
    tc = v2.load_template(LongBenchV2PromptSource(path=str(d)), data_root, cot=True)
    assert tc.endswith("Reason step by step:")
    base, hits = serve_dir(tmp_path)
    src = LongBenchV2PromptSource(url=f"{base}/prompts")
    assert v2.load_template(src, data_root, cot=False) == t
    assert v2.load_template(src, data_root, cot=False) == t and hits == ["/prompts/0shot.txt"]  # cached
    with pytest.raises(DataError, match=r"prompt_config\.path"):
        v2.load_template(LongBenchV2PromptSource(url=closed_port_url), data_root, cot=False, timeout=2)
    (d / "0shot.txt").write_text("no placeholders here")
    with pytest.raises(DataError, match=r"without \$DOC\$"):
        v2.load_template(LongBenchV2PromptSource(path=str(d)), data_root, cot=False)


def test_datasets_list_has_v2():
    rows = {r["name"]: r for r in list_tasks()}
    assert rows["longbench_v2"]["source"] == "longbench_v2" and rows["longbench_v2"]["metric"] == "accuracy"
    assert rows["hotpotqa"]["kvpress_mirror"] is True and rows["dureader"]["kvpress_mirror"] is False
    assert sum(r["kvpress_mirror"] for r in rows.values()) == 16


def _v2_config(project, **v2over):
    data = write_v2_json(project / "lb2" / "data.json", [v2_record(i) for i in range(6)])
    prompts = write_v2_prompts(project / "lb2" / "prompts")
    return write_yaml(project / "config" / "experiments" / "v2.yaml", {
        "extends": "../default.yaml",
        "experiment": {"group_id": "v2"},
        "dataset": {"source": "longbench_v2", "longbench_v2": {
            "path": str(data), "prompt_config": {"path": str(prompts)}, **v2over}},
        "binning": {"edges": [0, 400, 800]},
        "model": {"max_context": 1024},
    })


def test_prepare_v2_end_to_end(project, smol_tokenizer):
    """0shot prompt with the choices, chat template, 128 new tokens, long contexts middle-truncated to
    max_context exactly (question and choices kept), bins by final tokens, the data file's sha256 cited."""
    cfg_file = _v2_config(project)
    assert main(["prepare", "-q", "-c", str(cfg_file)]) == 0
    cfg = load_config(cfg_file)
    man = read_json(resolve_paths(cfg).manifest)
    assert man["dataset"]["source"] == "longbench_v2" and man["dataset"]["n_loaded"] == 6
    assert man["dataset"]["files"][0]["sha256"] == sha256_file(project / "lb2" / "data.json")
    exs = {e["example_id"]: e for e in man["examples"]}
    assert len(man["entries"]) == 6
    truncated = 0
    for entry in man["entries"]:
        ex = exs[entry["example_id"]]
        assert entry["max_new_tokens"] == 128 and entry["chat"] is True
        assert entry["final_tokens"] <= 1024 - 128
        tail = entry["prompt"][entry["question_start"]:]
        assert ex["question"] in tail and all(f"({k}) {ex['meta']['choices'][k]}" in tail for k in "ABCD")
        assert len(smol_tokenizer.encode(entry["prompt"], add_special_tokens=False)) == entry["final_tokens"]
        if entry["truncated"]:
            truncated += 1
            assert entry["original_tokens"] > 1024 - 128
            assert ex["context"] not in entry["prompt"] and ex["context"][:40] in entry["prompt"]
        else:
            assert entry["prompt"] == smol_tokenizer.chat(
                f"Read the document.\n\n<text>\n{ex['context']}\n</text>\n\nQuestion: {ex['question']}\nChoices:\n"
                + "".join(f"({k}) {ex['meta']['choices'][k]}\n" for k in "ABCD")
                + '\nReply as "The correct answer is (insert answer here)".')
    assert 0 < truncated < 6
    bins = {b["bin_id"]: b for b in man["bins"]}
    for entry in man["entries"]:
        b = bins[entry["bin_id"]]
        assert b["lo"] <= entry["final_tokens"] and (b["hi"] is None or entry["final_tokens"] < b["hi"])
    assert sum(b["n_selected"] for b in man["bins"]) == 6 and len([b for b in man["bins"] if b["n_selected"]]) >= 2


def test_prepare_v2_cot(project, smol_tokenizer):
    cfg_file = _v2_config(project, cot=True, limit=2)
    assert main(["prepare", "-q", "-c", str(cfg_file), "-o", "model.max_context=4096"]) == 0
    man = read_json(resolve_paths(load_config(cfg_file, ["model.max_context=4096"])).manifest)
    assert {e["max_new_tokens"] for e in man["entries"]} == {1024}
    assert all("Reason step by step:" in e["prompt"] for e in man["entries"])
