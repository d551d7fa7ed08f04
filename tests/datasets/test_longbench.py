from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kv_transition.config.schema import LongBenchCfg, PromptConfigSource
from kv_transition.datasets import longbench as lb
from kv_transition.datasets.schema import stable_id
from kv_transition.errors import DataError

from .conftest import REPO, SHARED_LONGBENCH, lb_record, records, write_jsonl, write_parquet, write_zip


def cfg(**kw) -> LongBenchCfg:
    """A LongBench config; source parquet unless given (the shipped default, zip, downloads from the Hub)."""
    kw.setdefault("source", "parquet")
    return LongBenchCfg(**kw)


# ---------------------------------------------------------------- registry

def test_registry_has_21_v1_and_13_e_tasks():
    v1 = [n for n, i in lb.TASKS.items() if not i.longbench_e]
    e = [n for n, i in lb.TASKS.items() if i.longbench_e]
    assert len(v1) == 21 and len(e) == 13
    assert "repobench-p" in v1 and "repobench-p_e" in e and "multifieldqa_zh_e" not in lb.TASKS
    assert lb.TASKS["multifieldqa_zh"].metric == "qa_f1_zh_score"
    assert lb.TASKS["dureader"].metric == "rouge_zh_score" and lb.TASKS["dureader"].language == "zh"
    assert lb.TASKS["passage_count_e"].metric == "count_score"
    assert lb.TASKS["lcc"].metric == "code_sim_score"
    assert lb.prompt_key("hotpotqa_e") == "hotpotqa"


def test_no_chat_template_tasks():
    base = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert lb.NO_CHAT_TEMPLATE_TASKS == base | {"trec_e", "triviaqa_e", "samsum_e", "lcc_e", "repobench-p_e"}
    assert lb.TASKS["hotpotqa"].chat_template and lb.TASKS["lcc"].chat_template is False
    assert not lb.TASKS["samsum_e"].chat_template


@pytest.mark.parametrize("bad,suggest", [("HotpotQA", "hotpotqa"), ("hotpotqa-e", "hotpotqa_e"), ("nosuch", None)])
def test_unknown_task_lists_valid_ones(tmp_path, data_root, bad, suggest):
    with pytest.raises(DataError) as ei:
        lb.load_longbench(cfg(tasks=[bad], source="dir", path=str(tmp_path)), data_root)
    msg = str(ei.value)
    assert repr(bad) in msg and "narrativeqa" in msg and "repobench-p_e" in msg
    if suggest:
        assert f"Did you mean {suggest!r}" in msg


# ---------------------------------------------------------------- parquet

LAYOUTS = {
    "hub-parquet-export": "{t}/test/0000.parquet",
    "hub-parquet-export-legacy": "{t}/long_bench-test.parquet",
    "push-to-hub-config": "{t}/test-00000-of-00001.parquet",
    "data-flat": "data/{t}.parquet",
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parquet_local_dir_layouts(tmp_path, data_root, layout):
    mirror = tmp_path / "mirror"
    for t in ("hotpotqa", "hotpotqa_e", "trec"):
        write_parquet(mirror / LAYOUTS[layout].format(t=t), records(t, 3 if t != "trec" else 2))
    exs = lb.load_longbench(cfg(tasks=["hotpotqa_e", "trec"], source="parquet", path=str(mirror)), data_root)
    assert [e.meta["task"] for e in exs] == ["hotpotqa_e"] * 3 + ["trec"] * 2
    first = exs[0]
    assert first.question == "Question 0 about hotpotqa_e?"
    assert first.answers == ["answer 0"]
    assert first.example_id == stable_id("longbench", "hotpotqa_e", "hotpotqa_e-id-0000")
    assert exs[3].meta["all_classes"] == ["A", "B"]
    # the datasets cache stays inside data_root
    assert (data_root / "raw" / "longbench" / "hf" / "datasets").is_dir()


def test_parquet_repo_may_be_a_local_dir(tmp_path, data_root):
    mirror = tmp_path / "m"
    write_parquet(mirror / "qasper/test/0000.parquet", records("qasper", 2)[:1])
    write_parquet(mirror / "qasper/test/0001.parquet", records("qasper", 2)[1:])
    exs = lb.load_longbench(cfg(tasks=["qasper"], parquet_repo=str(mirror)), data_root)
    assert [e.meta["orig_id"] for e in exs] == ["qasper-id-0000", "qasper-id-0001"]


def test_parquet_missing_task_names_layouts(tmp_path, data_root):
    write_parquet(tmp_path / "m/qasper/test/0000.parquet", records("qasper"))
    with pytest.raises(DataError, match=r"'hotpotqa'.*<task>/test/\*\.parquet"):
        lb.load_longbench(cfg(tasks=["hotpotqa"], path=str(tmp_path / "m")), data_root)


def test_parquet_missing_column(tmp_path, data_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "m/hotpotqa/test/0000.parquet"
    p.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"input": "q", "context": "c"}]), p)
    with pytest.raises(DataError, match=r"0000\.parquet.*'answers'.*hotpotqa"):
        lb.load_longbench(cfg(tasks=["hotpotqa"], path=str(tmp_path / "m")), data_root)


def test_corrupt_parquet_is_a_data_error(tmp_path, data_root):
    p = tmp_path / "m/hotpotqa/test/0000.parquet"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="hotpotqa"):
        lb.load_longbench(cfg(tasks=["hotpotqa"], path=str(tmp_path / "m")), data_root)


def test_hub_snapshot_is_reused_without_network(data_root, monkeypatch):
    """A Hub download lands in <data_root>/raw/longbench/parquet/<repo>/<rev> in the Hub layout
    and is read by the same local code; a second load does not touch the network."""
    import huggingface_hub

    def fake_download(repo_id, *, repo_type, revision, allow_patterns, local_dir, cache_dir, **kw):
        assert repo_type == "dataset" and revision == "refs/convert/parquet"
        assert "hotpotqa/test/*.parquet" in allow_patterns
        assert Path(local_dir).is_relative_to(data_root) and Path(cache_dir).is_relative_to(data_root)
        write_parquet(Path(local_dir) / "hotpotqa/test/0000.parquet", records("hotpotqa"))
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    c = cfg(tasks=["hotpotqa"])
    assert c.parquet_repo == "zai-org/LongBench"
    first = lb.load_longbench(c, data_root)

    def no_network(*a, **kw):
        raise AssertionError("network used although the snapshot is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    again = lb.load_longbench(c, data_root)
    assert [e.example_id for e in first] == [e.example_id for e in again] and len(first) == 3


def test_hub_unreachable_is_a_clear_error(data_root):
    code = (
        "import sys; sys.path.insert(0, 'harness')\n"
        "from pathlib import Path\n"
        "from kv_transition.config.schema import LongBenchCfg\n"
        "from kv_transition.datasets.longbench import load_longbench\n"
        "from kv_transition.errors import DataError\n"
        "try:\n"
        f"    load_longbench(LongBenchCfg(tasks=['hotpotqa'], source='parquet'), Path({str(data_root)!r}))\n"
        "except DataError as e:\n"
        "    print('DATAERROR', e); sys.exit(3)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "zai-org/LongBench" in r.stdout and "dataset.longbench.path" in r.stdout


# ---------------------------------------------------------------- zip / dir / jsonl

def test_zip_dir_and_parquet_give_the_same_examples(tmp_path, data_root):
    by_task = {"hotpotqa": records("hotpotqa"), "lsht": records("lsht", 2)}
    z = write_zip(tmp_path / "dl/data.zip", by_task)
    from_zip = lb.load_longbench(cfg(tasks=["lsht", "hotpotqa"], source="zip", path=str(z)), data_root)
    extracted = list((data_root / "raw" / "longbench" / "extracted").glob("*/data/*.jsonl"))
    assert sorted(p.name for p in extracted) == ["hotpotqa.jsonl", "lsht.jsonl"]

    d = tmp_path / "LongBench"
    for t, recs in by_task.items():
        write_jsonl(d / "data" / f"{t}.jsonl", recs)
    from_dir = lb.load_longbench(cfg(tasks=["lsht", "hotpotqa"], source="dir", path=str(d)), data_root)

    m = tmp_path / "mirror"
    for t, recs in by_task.items():
        write_parquet(m / t / "test" / "0000.parquet", recs)
    from_pq = lb.load_longbench(cfg(tasks=["lsht", "hotpotqa"], source="parquet", path=str(m)), data_root)

    def same(exs):  # everything but the layout the example came from
        return [{**e.to_dict(), "meta": {k: v for k, v in e.meta.items() if k != "layout"}} for e in exs]

    assert same(from_zip) == same(from_dir) == same(from_pq)
    assert {e.meta["layout"] for e in from_zip + from_dir} == {"official-jsonl"}
    assert {e.meta["layout"] for e in from_pq} == {"hub-parquet-export"}
    assert [e.meta["task"] for e in from_zip] == ["lsht"] * 2 + ["hotpotqa"] * 3
    meta = from_zip[0].meta
    assert meta["language"] == "en" and meta["metric"] == "classification_score"
    assert {"source", "task", "language", "length", "all_classes", "orig_id", "dataset"} <= set(meta)
    assert meta["length"] == 120 and meta["orig_id"] == "lsht-id-0000" and meta["source"] == "longbench"


def test_dir_accepts_flat_layout_and_limit(tmp_path, data_root):
    write_jsonl(tmp_path / "flat" / "qmsum.jsonl", records("qmsum", 5))
    exs = lb.load_longbench(cfg(tasks=["qmsum"], source="dir", path=str(tmp_path / "flat"), limit=2), data_root)
    assert [e.meta["orig_id"] for e in exs] == ["qmsum-id-0000", "qmsum-id-0001"]


def test_zip_missing_member_and_bad_zip(tmp_path, data_root):
    z = write_zip(tmp_path / "data.zip", {"hotpotqa": records("hotpotqa")})
    with pytest.raises(DataError, match=r"data\.zip.*data/musique\.jsonl.*'musique'"):
        lb.load_longbench(cfg(tasks=["musique"], source="zip", path=str(z)), data_root)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK garbage")
    with pytest.raises(DataError, match="not a valid zip"):
        lb.load_longbench(cfg(tasks=["hotpotqa"], source="zip", path=str(bad)), data_root)


@pytest.mark.parametrize("source", ["zip", "dir", "jsonl", "parquet"])
def test_missing_path(tmp_path, data_root, source):
    with pytest.raises(DataError, match="nope"):
        lb.load_longbench(cfg(tasks=["hotpotqa"], source=source, path=str(tmp_path / "nope")), data_root)


def test_dir_missing_task_file(tmp_path, data_root):
    write_jsonl(tmp_path / "d/data/hotpotqa.jsonl", records("hotpotqa"))
    with pytest.raises(DataError, match=r"'2wikimqa'.*data/2wikimqa\.jsonl"):
        lb.load_longbench(cfg(tasks=["2wikimqa"], source="dir", path=str(tmp_path / "d")), data_root)


def test_loose_jsonl_by_dataset_field_and_by_file_name(tmp_path, data_root):
    mixed = write_jsonl(tmp_path / "mine.jsonl", records("hotpotqa", 2) + records("samsum", 2) + records("qasper", 1))
    exs = lb.load_longbench(cfg(tasks=["samsum", "hotpotqa"], source="jsonl", path=str(mixed)), data_root)
    assert [e.meta["task"] for e in exs] == ["samsum", "samsum", "hotpotqa", "hotpotqa"]
    # LongBench-E files carry the base task in `dataset`; the file name decides
    e_file = write_jsonl(tmp_path / "hotpotqa_e.jsonl", records("hotpotqa_e", 2))
    exs = lb.load_longbench(cfg(tasks=["hotpotqa_e"], source="jsonl", path=str(e_file)), data_root)
    assert [e.meta["task"] for e in exs] == ["hotpotqa_e"] * 2 and exs[0].meta["dataset"] == "hotpotqa"
    with pytest.raises(DataError, match="no records for LongBench task 'trec'"):
        lb.load_longbench(cfg(tasks=["trec"], source="jsonl", path=str(mixed)), data_root)


def test_loose_jsonl_unknown_dataset_field(tmp_path, data_root):
    p = write_jsonl(tmp_path / "x.jsonl", [lb_record("hotpotqa", 0, dataset="HotPotQA")])
    with pytest.raises(DataError, match=r"x\.jsonl line 1.*'HotPotQA'.*hotpotqa"):
        lb.load_longbench(cfg(tasks=["hotpotqa"], source="jsonl", path=str(p)), data_root)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("field", ["input", "context", "answers"])
def test_missing_field_names_file_line_field(tmp_path, data_root, field):
    recs = records("hotpotqa", 3)
    del recs[1][field]
    p = write_jsonl(tmp_path / "d/data/hotpotqa.jsonl", recs)
    with pytest.raises(DataError) as ei:
        lb.load_longbench(cfg(tasks=["hotpotqa"], source="dir", path=str(tmp_path / "d")), data_root)
    msg = str(ei.value)
    assert str(p) in msg and "line 2" in msg and repr(field) in msg


@pytest.mark.parametrize("bad,match", [
    ('{"input": "q", "context": "c", "answers": "not a list"}', "'answers' must be a non-empty list"),
    ('{"input": "q", "context": "c", "answers": []}', "'answers' must be a non-empty list"),
    ('{"input": "q", "context": 5, "answers": ["a"]}', "'context' must be a string"),
    ('{"input": "q", "context": "c", "answers": ["a"], "length": "long"}', "'length' must be an integer"),
    ('{"input": "q", "context": "c", "answers": ["a"], "all_classes": "A"}', "'all_classes'"),
    ('{"input": "q", "context": ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_records(tmp_path, data_root, bad, match):
    p = write_jsonl(tmp_path / "d/hotpotqa.jsonl", [lb_record("hotpotqa", 0), bad])
    with pytest.raises(DataError, match=match) as ei:
        lb.load_longbench(cfg(tasks=["hotpotqa"], source="dir", path=str(tmp_path / "d")), data_root)
    assert "line 2" in str(ei.value) and str(p) in str(ei.value)


def test_duplicate_ids_rejected(tmp_path, data_root):
    p = write_jsonl(tmp_path / "d/trec.jsonl", [lb_record("trec", 0), lb_record("trec", 1, _id="trec-id-0000")])
    with pytest.raises(DataError, match="duplicate"):
        lb.load_longbench(cfg(tasks=["trec"], source="dir", path=str(p.parent)), data_root)


# ---------------------------------------------------------------- ids

def test_ids_pinned_and_without_id_hash_based(tmp_path, data_root):
    assert stable_id("longbench", "hotpotqa", "abc") == lb.record_to_example(
        lb_record("hotpotqa", 0, _id="abc"), "hotpotqa", "x").example_id
    a = lb.record_to_example(lb_record("hotpotqa", 0, _id=None), "hotpotqa", "x")
    b = lb.record_to_example(lb_record("hotpotqa", 0, _id=None), "hotpotqa", "y")
    c = lb.record_to_example(lb_record("hotpotqa", 0, _id=None, context="other"), "hotpotqa", "x")
    d = lb.record_to_example(lb_record("hotpotqa", 0, _id=None), "hotpotqa_e", "x")
    assert a.example_id == b.example_id and len({a.example_id, c.example_id, d.example_id}) == 3
    assert a.meta["orig_id"] is None


def test_ids_stable_across_processes(tmp_path, data_root):
    write_jsonl(tmp_path / "d/data/musique.jsonl", records("musique", 4) + [lb_record("musique", 9, _id=None)])
    here = [e.example_id for e in lb.load_longbench(cfg(tasks=["musique"], source="dir", path=str(tmp_path / "d")), data_root)]
    code = (
        "import sys, json; sys.path.insert(0, 'harness')\n"
        "from pathlib import Path\n"
        "from kv_transition.config.schema import LongBenchCfg\n"
        "from kv_transition.datasets.longbench import load_longbench\n"
        f"c = LongBenchCfg(tasks=['musique'], source='dir', path={str(tmp_path / 'd')!r})\n"
        f"print(json.dumps([e.example_id for e in load_longbench(c, Path({str(data_root)!r}))]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == here and len(set(here)) == 5


# ---------------------------------------------------------------- prompt configuration

def _prompt_files(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if (SHARED_LONGBENCH / "dataset2prompt.json").is_file():
        for n in ("dataset2prompt.json", "dataset2maxlen.json"):
            shutil.copy(SHARED_LONGBENCH / n, d / n)
    else:
        (d / "dataset2prompt.json").write_text(json.dumps({t: "{context}\n{input}" for t in lb.LONGBENCH_V1_TASKS}))
        (d / "dataset2maxlen.json").write_text(json.dumps({t: 32 for t in lb.LONGBENCH_V1_TASKS}))
    return d


@pytest.mark.skipif(not SHARED_LONGBENCH.is_dir(), reason="../shared/longbench not present")
def test_prompt_config_from_local_path_matches_official(data_root):
    d2p, d2m = lb.load_prompt_config(PromptConfigSource(path=str(SHARED_LONGBENCH)), data_root)
    assert set(d2p) == set(lb.LONGBENCH_V1_TASKS) == set(d2m)
    assert d2m["hotpotqa"] == 32 and d2m["gov_report"] == 512
    assert "{context}" in d2p["trec"] and "{input}" in d2p["hotpotqa"]
    for t in lb.TASKS:  # every task, LongBench-E included, has a template through prompt_key
        assert lb.prompt_key(t) in d2p
    assert not (data_root / "raw").exists()  # a local path is read in place, not cached


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def test_prompt_config_fetched_cached_and_reused(tmp_path, data_root):
    served = _prompt_files(tmp_path / "www" / "LongBench" / "config")
    handler = functools.partial(_Quiet, directory=str(tmp_path / "www"))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/LongBench/config"
    try:
        d2p, d2m = lb.load_prompt_config(PromptConfigSource(url=url), data_root)
    finally:
        srv.shutdown()
        srv.server_close()
    cache = data_root / "raw" / "longbench" / "config"
    assert (cache / "dataset2prompt.json").read_bytes() == (served / "dataset2prompt.json").read_bytes()
    assert d2p == json.loads((served / "dataset2prompt.json").read_text())
    # server gone: the cached copy is reused
    again = lb.load_prompt_config(PromptConfigSource(url=url + "/"), data_root)
    assert again == (d2p, d2m)


def test_prompt_config_unreachable_and_uncached(tmp_path, data_root):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(DataError, match=r"dataset\.longbench\.prompt_config\.path"):
        lb.load_prompt_config(PromptConfigSource(url=f"http://127.0.0.1:{port}/cfg"), data_root, timeout=2)
    assert not (data_root / "raw" / "longbench" / "config" / "dataset2prompt.json").exists()


def test_prompt_config_bad_local_files(tmp_path, data_root):
    d = _prompt_files(tmp_path / "cfg")
    (d / "dataset2maxlen.json").write_text(json.dumps({"hotpotqa": 32}))
    with pytest.raises(DataError, match="lacks LongBench tasks"):
        lb.load_prompt_config(PromptConfigSource(path=str(d)), data_root)
    (d / "dataset2maxlen.json").write_text("{oops")
    with pytest.raises(DataError, match="dataset2maxlen.json"):
        lb.load_prompt_config(PromptConfigSource(path=str(d)), data_root)
    with pytest.raises(DataError, match="directory not found"):
        lb.load_prompt_config(PromptConfigSource(path=str(tmp_path / "none")), data_root)
