"""LongBench as researchers get it: the official data.zip by default (downloaded once, sha256 recorded and
checked), a one-line error naming an unreachable source and the alternatives (exit 2, nothing written),
and kvpress's reformatted mirror (Xnhyacinth/LongBench) mapped with its question/context split and layout.

Every download goes to a loopback server holding files in the real on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config, resolve_paths
from kv_transition.config.schema import LONGBENCH_ZIP_URL, LongBenchCfg
from kv_transition.datasets import longbench as lb
from kv_transition.datasets.download import sha256_file, sidecar
from kv_transition.errors import DataError
from kv_transition.manifest.store import read_json
from tests.conftest import write_yaml

from .conftest import kvpress_row, lb_record, records, write_kvpress_mirror, write_zip

# ---------------------------------------------------------------- 1. the official data.zip by default


def test_shipped_longbench_configs_default_to_the_official_zip(repo_root):
    assert LongBenchCfg().source == "zip" and LongBenchCfg().url == LONGBENCH_ZIP_URL
    assert LONGBENCH_ZIP_URL == "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
    for f in ("default.yaml", "experiments/snapkv_longbench.yaml"):
        cfg = load_config(repo_root / "config" / f, env={})
        assert cfg.dataset.longbench.source == "zip", f
        assert cfg.dataset.longbench.url == LONGBENCH_ZIP_URL and cfg.dataset.longbench.path is None, f


def test_zip_url_downloaded_once_with_checksum_recorded(tmp_path, data_root, serve_dir):
    www = tmp_path / "www"
    z = write_zip(www / "datasets/THUDM/LongBench/resolve/main/data.zip",
                  {"hotpotqa": records("hotpotqa"), "trec": records("trec", 2)})
    base, hits = serve_dir(www)
    url = f"{base}/datasets/THUDM/LongBench/resolve/main/data.zip"
    c = LongBenchCfg(tasks=["hotpotqa", "trec"], url=url)
    events = []
    first = lb.load_longbench(c, data_root, progress=lambda *e: events.append(e))
    assert len(first) == 5 and hits == ["/datasets/THUDM/LongBench/resolve/main/data.zip"]
    size = z.stat().st_size  # a progress bar of the bytes: total from Content-Length, then the chunks
    assert events[0] == ("download data.zip", 0, size) and sum(e[1] for e in events) == size
    dest = lb.zip_download_path(url, data_root)
    assert dest.is_relative_to(data_root / "raw" / "longbench" / "zip")
    assert dest.read_bytes() == z.read_bytes()
    rec = json.loads(sidecar(dest).read_text())
    assert rec["url"] == url and rec["sha256"] == sha256_file(z) and rec["bytes"] == z.stat().st_size
    assert rec["downloaded_at"]
    assert {e.meta["layout"] for e in first} == {"official-jsonl"}
    # reused: no second request, same examples; the record is what the manifest cites
    again = lb.load_longbench(c, data_root)
    assert hits == ["/datasets/THUDM/LongBench/resolve/main/data.zip"]
    assert [e.to_dict() for e in again] == [e.to_dict() for e in first]
    assert lb.provenance(c, data_root)[0]["sha256"] == rec["sha256"]
    # a damaged file is caught against the record
    dest.write_bytes(dest.read_bytes()[:-10])
    with pytest.raises(DataError, match="differs from the .* recorded"):
        lb.load_longbench(c, data_root)


def test_pinned_sha256_mismatch_keeps_nothing(tmp_path, data_root, serve_dir):
    www = tmp_path / "www"
    z = write_zip(www / "data.zip", {"hotpotqa": records("hotpotqa")})
    base, _hits = serve_dir(www)
    with pytest.raises(DataError, match=r"dataset\.longbench\.url\.sha256|pinned by dataset\.longbench"):
        lb.load_longbench(LongBenchCfg(url=f"{base}/data.zip", sha256="0" * 64), data_root)
    assert not (data_root / "raw").exists()
    ok = lb.load_longbench(LongBenchCfg(url=f"{base}/data.zip", sha256=sha256_file(z)), data_root)
    assert len(ok) == 3


def test_unreachable_default_source_one_line_exit_2_nothing_written(project, closed_port_url, capsys):
    cfg = write_yaml(project / "config" / "experiments" / "lbdown.yaml", {
        "extends": "../default.yaml",
        "experiment": {"group_id": "lbdown"},
        "dataset": {"source": "longbench", "longbench": {"url": f"{closed_port_url}/data.zip"}},
    })
    before = sorted(str(p) for p in project.rglob("*"))
    assert main(["prepare", "-q", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert f"{closed_port_url}/data.zip" in line and "dataset.longbench.url" in line
    assert "alternatives" in line and "dataset.longbench.path" in line
    assert "source parquet" in line and "source kvpress" in line
    assert sorted(str(p) for p in project.rglob("*")) == before  # no runs/, no data/raw/, no partial file


def test_local_zip_path_still_wins(tmp_path, data_root):
    z = write_zip(tmp_path / "data.zip", {"hotpotqa": records("hotpotqa", 2)})
    exs = lb.load_longbench(LongBenchCfg(path=str(z), url="http://127.0.0.1:9/never-used.zip"), data_root)
    assert len(exs) == 2
    assert lb.provenance(LongBenchCfg(path=str(z)), data_root)[0]["sha256"] == sha256_file(z)


# ---------------------------------------------------------------- 2. kvpress's mirror


def test_kvpress_mirror_maps_with_split_and_layout(tmp_path, data_root):
    m = write_kvpress_mirror(tmp_path / "Xnhyacinth__LongBench",
                             {"hotpotqa": [kvpress_row("hotpotqa", i) for i in range(3)],
                              "trec": [kvpress_row("trec", 0, all_classes=["Location", "Person"])]})
    exs = lb.load_longbench(LongBenchCfg(source="kvpress", path=str(m), tasks=["hotpotqa", "trec"]), data_root)
    assert [e.task for e in exs] == ["hotpotqa"] * 3 + ["trec"]
    h = exs[0]
    row = kvpress_row("hotpotqa", 0)
    assert h.context == row["context"] and h.question == row["question"]  # the split is kept
    assert h.context.startswith("Answer from the passages.") and h.question == "Question: Question 0 about hotpotqa?\n"
    assert h.answers == ["answer 0"]
    assert h.meta["layout"] == "kvpress" and h.meta["answer_prefix"] == "Answer:" and h.meta["max_new_tokens"] == 52
    assert h.meta["orig_id"] == "hotpotqa-id-0000" and h.meta["metric"] == "qa_f1_score"
    assert exs[3].meta["all_classes"] == ["Location", "Person"] and exs[3].meta["chat_template"] is True
    # distinct from the same record in LongBench's own layout (a different prompt input)
    official = lb.record_to_example(lb_record("hotpotqa", 0), "hotpotqa", "x")
    assert official.example_id != h.example_id and official.meta["layout"] == "official-jsonl"


def test_kvpress_from_the_hub_is_the_mirror_layout(data_root, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, *, repo_type, revision, allow_patterns, local_dir, cache_dir, **kw):
        calls.append((repo_id, revision))
        assert repo_type == "dataset" and "hotpotqa/test-*.parquet" in allow_patterns
        assert Path(local_dir).is_relative_to(data_root)
        write_kvpress_mirror(Path(local_dir), {"hotpotqa": [kvpress_row("hotpotqa", 0)]})
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    exs = lb.load_longbench(LongBenchCfg(source="kvpress"), data_root)
    assert calls == [("Xnhyacinth/LongBench", "main")]
    assert exs[0].meta["layout"] == "kvpress"
    lb.load_longbench(LongBenchCfg(source="kvpress"), data_root)
    assert len(calls) == 1  # cached snapshot reused


def test_kvpress_source_rejects_the_official_layout(tmp_path, data_root):
    from .conftest import write_parquet

    write_parquet(tmp_path / "m" / "hotpotqa" / "test-00000-of-00001.parquet", records("hotpotqa"))
    with pytest.raises(DataError, match="not kvpress's LongBench layout"):
        lb.load_longbench(LongBenchCfg(source="kvpress", path=str(tmp_path / "m")), data_root)
    # the same files through source parquet are LongBench's own fields, layout recorded
    exs = lb.load_longbench(LongBenchCfg(source="parquet", path=str(tmp_path / "m")), data_root)
    assert {e.meta["layout"] for e in exs} == {"push-to-hub-config"}


def test_kvpress_row_of_another_task_and_bad_budget(tmp_path, data_root):
    m = write_kvpress_mirror(tmp_path / "m", {"hotpotqa": [kvpress_row("hotpotqa", 0, **{"task": "musique"})]})
    with pytest.raises(DataError, match="row of task 'musique'"):
        lb.load_longbench(LongBenchCfg(source="kvpress", path=str(m)), data_root)
    m2 = write_kvpress_mirror(tmp_path / "m2", {"hotpotqa": [kvpress_row("hotpotqa", 0, max_new_tokens=0)]})
    with pytest.raises(DataError, match="max_new_tokens"):
        lb.load_longbench(LongBenchCfg(source="kvpress", path=str(m2)), data_root)


def test_prepare_kvpress_mirror_end_to_end(project, smol_tokenizer, closed_port_url):
    """The prompt is kvpress's: chat(context + question) + answer_prefix, for every task (trec too), its
    max_new_tokens, the question start at the question; LongBench's prompt config is never fetched."""
    m = write_kvpress_mirror(project / "mirror", {
        "hotpotqa": [kvpress_row("hotpotqa", 0), kvpress_row("hotpotqa", 1)],
        "trec": [kvpress_row("trec", 0, all_classes=["Location", "Person"], answers=["Location"])]})
    cfg_file = write_yaml(project / "config" / "experiments" / "kvp.yaml", {
        "extends": "../default.yaml",
        "experiment": {"group_id": "kvp"},
        "dataset": {"source": "longbench", "longbench": {
            "tasks": ["hotpotqa", "trec"], "source": "kvpress", "path": str(m),
            "prompt_config": {"url": closed_port_url}}},  # would fail if fetched
        "binning": {"edges": [0, 1000]},
    })
    assert main(["prepare", "-q", "-c", str(cfg_file)]) == 0
    cfg = load_config(cfg_file)
    man = read_json(resolve_paths(cfg).manifest)
    by_task = {}
    exs = {e["example_id"]: e for e in man["examples"]}
    for entry in man["entries"]:
        by_task.setdefault(entry["task"], []).append(entry)
    for entry in by_task["hotpotqa"] + by_task["trec"]:
        ex = exs[entry["example_id"]]
        expected = smol_tokenizer.chat(ex["context"] + ex["question"]) + ex["meta"]["answer_prefix"]
        assert entry["prompt"] == expected and entry["chat"] is True
        assert entry["max_new_tokens"] == ex["meta"]["max_new_tokens"]
        assert entry["prompt"][entry["question_start"]:].startswith(ex["question"])
        assert ex["context"] in entry["prompt"][:entry["question_start"]]
    assert {e["max_new_tokens"] for e in by_task["trec"]} == {84}
    assert {e["max_new_tokens"] for e in by_task["hotpotqa"]} == {52}
    assert by_task["trec"][0]["prompt"].endswith("Type:")


@pytest.mark.parametrize("source, repo, key", [("kvpress", "Xnhyacinth/LongBench", "kvpress_repo"),
                                               ("parquet", "zai-org/LongBench", "parquet_repo")])
def test_hub_unreachable_one_line_with_alternatives_nothing_left(data_root, monkeypatch, source, repo, key):
    import huggingface_hub

    def offline(*a, **kw):  # TEST DOUBLE: what the Hub client raises without a network, after making its dirs
        Path(kw["local_dir"], ".cache").mkdir(parents=True, exist_ok=True)
        raise OSError("[Errno 101] Network is unreachable\n(more detail)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError) as ei:
        lb.load_longbench(LongBenchCfg(source=source), data_root)
    msg = str(ei.value)
    assert "\n" not in msg and repo in msg and f"dataset.longbench.{key}" in msg and "alternatives" in msg
    assert "dataset.longbench.path" in msg and "data.zip" in msg
    assert list(data_root.iterdir()) == []


def test_answer_prefix_survives_middle_truncation(smol_tokenizer):
    from kv_transition.datasets.schema import Example
    from kv_transition.manifest.prompts import PromptBuilder, PromptSpec

    ex = Example("e", "Question: which river?\n", "Read.\n\n" + "The river flows past the old mill. " * 300, ["x"],
                 {"task": "hotpotqa"})
    spec = PromptSpec("{context}{input}", 52, chat=True, answer_prefix="Answer:")
    bp = PromptBuilder(smol_tokenizer, max_context=512).build(ex, spec)
    assert bp.truncated and bp.final_tokens <= 512 - 52
    assert bp.final_tokens == len(smol_tokenizer.encode(bp.prompt, add_special_tokens=False))
    assert bp.prompt.endswith(smol_tokenizer.chat("x")[smol_tokenizer.chat("x").index("x") + 1:] + "Answer:")
    assert bp.prompt[bp.question_start:].startswith("Question: which river?")


def test_kvpress_question_goes_after_a_trimming_chat_template(smol_tokenizer):
    """kvpress applies the template to the context alone and appends the question untouched: with a
    template that trims its content (as Llama 3's does) the question's trailing newline survives."""
    import copy
    from dataclasses import replace

    from kv_transition.datasets.schema import Example
    from kv_transition.manifest.prompts import PromptBuilder, PromptSpec

    hf = copy.deepcopy(smol_tokenizer._hf)
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    trimming = replace(smol_tokenizer, _hf=hf, _chunk_counts={})  # TEST DOUBLE: SmolLM2's vocab, a trimming template
    row = kvpress_row("hotpotqa", 0)
    ex = Example("e", row["question"], "  " + row["context"], row["answers"], {"task": "hotpotqa"})
    spec = PromptSpec("{context}{input}", 52, chat=True, answer_prefix="Answer:", question_after_template=True)
    bp = PromptBuilder(trimming, max_context=4096).build(ex, spec)
    assert bp.prompt == ("<|im_start|>user\n" + row["context"] + row["question"]  # only the leading blanks trimmed
                         + "<|im_end|>\n<|im_start|>assistant\nAnswer:")
    assert row["question"].endswith("\n") and bp.prompt != trimming.chat(ex.context + ex.question) + "Answer:"
    assert bp.prompt[bp.question_start:].startswith(row["question"])
    assert bp.final_tokens == len(trimming.encode(bp.prompt))
    small = PromptBuilder(trimming, max_context=200).build(ex, spec)  # truncated: same placement
    assert small.truncated and small.prompt.endswith(row["question"] + "<|im_end|>\n<|im_start|>assistant\nAnswer:")
    assert small.final_tokens <= 200 - 52


@pytest.mark.parametrize("trim", [False, True])
def test_kvpress_prompt_equals_kvpress_pipeline_preprocess(smol_tokenizer, trim):
    """Against kvpress's own code (the installed package): KVPressTextGenerationPipeline.preprocess's
    context + question ids decode to exactly the prompt the harness builds for a mirror row."""
    import copy
    import types
    from dataclasses import replace

    pipeline = pytest.importorskip("kvpress.pipeline")
    from kv_transition.datasets.schema import Example
    from kv_transition.manifest.prompts import PromptBuilder, PromptSpec

    tok = smol_tokenizer
    if trim:  # TEST DOUBLE: a Llama-3-style template that trims the user content, on SmolLM2's vocab
        hf = copy.deepcopy(tok._hf)
        hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        tok = replace(tok, _hf=hf, _chunk_counts={})
    row = kvpress_row("hotpotqa", 3)
    ctx, q = "  " + row["context"], row["question"]
    out = pipeline.KVPressTextGenerationPipeline.preprocess(types.SimpleNamespace(tokenizer=tok._hf), ctx, [q],
                                                            row["answer_prefix"], 10**6)
    reference = tok._hf.decode(out["context_ids"][0]) + tok._hf.decode(out["questions_ids"][0][0])
    spec = PromptSpec("{context}{input}", 52, chat=True, answer_prefix=row["answer_prefix"], question_after_template=True)
    built = PromptBuilder(tok, max_context=8192).build(Example("e", q, ctx, row["answers"], {"task": "hotpotqa"}), spec)
    assert built.prompt == reference
