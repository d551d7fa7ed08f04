from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from kv_transition.config.schema import DatasetCfg, LongBenchCfg, SyntheticCfg
from kv_transition.datasets import list_tasks, load_examples
from kv_transition.datasets import synthetic as syn
from kv_transition.errors import DataError

from .conftest import REPO, records, whitespace_count, write_jsonl

ALL = list(syn.SYNTHETIC_TASKS)


def gen(count=whitespace_count, verify=None, **kw):
    base = dict(tasks=ALL, lengths=[300, 1200], depths=[0.0, 0.3, 0.75, 1.0], n_per_length=2, seed=7)
    base.update(kw)
    return syn.generate_synthetic(SyntheticCfg(**base), count, verify=verify)


def _digest(exs) -> str:
    return hashlib.sha256(json.dumps([e.to_dict() for e in exs], sort_keys=True).encode()).hexdigest()


def test_deterministic_for_a_seed_and_json_serialisable():
    a, b = gen(), gen()
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert len(a) == 4 * 2 * 4 * 2 and len({e.example_id for e in a}) == len(a)
    json.dumps([e.to_dict() for e in a])


def test_deterministic_across_processes():
    here = _digest(gen())
    code = (
        "import sys, json, hashlib; sys.path.insert(0, 'harness')\n"
        "from kv_transition.config.schema import SyntheticCfg\n"
        "from kv_transition.datasets.synthetic import generate_synthetic, SYNTHETIC_TASKS\n"
        "c = SyntheticCfg(tasks=list(SYNTHETIC_TASKS), lengths=[300, 1200], depths=[0.0, 0.3, 0.75, 1.0], n_per_length=2, seed=7)\n"
        "exs = generate_synthetic(c, lambda s: len(s.split()))\n"
        "print(hashlib.sha256(json.dumps([e.to_dict() for e in exs], sort_keys=True).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "999"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == here


def test_different_seeds_differ():
    a, b = gen(seed=1), gen(seed=2)
    assert all(x.context != y.context for x, y in zip(a, b))
    assert sum(x.answers != y.answers for x, y in zip(a, b)) >= len(a) - 2
    assert {e.example_id for e in a}.isdisjoint({e.example_id for e in b})


def _check_lengths(exs, count):
    for e in exs:
        t = e.meta["target_tokens"]
        n = count(e.context)
        assert n <= t, (e.meta["task"], t, n)
        assert t - n <= max(3, 0.02 * t), (e.meta["task"], t, n)
        if e.meta["context_tokens_measured"]:
            assert n == e.meta["context_tokens"]


@pytest.mark.parametrize("verify", ["auto", "all"])
def test_token_length_close_to_target_whitespace(verify):
    exs = gen(verify=verify, lengths=[64, 500, 3000])
    _check_lengths(exs, whitespace_count)
    if verify == "all":
        assert all(e.meta["context_tokens_measured"] for e in exs)


def test_token_length_with_real_bpe_tokenizer(bpe_count):
    exs = gen(count=bpe_count, lengths=[256, 2000, 8000], depths=[0.0, 0.5, 1.0], n_per_length=3)
    _check_lengths(exs, bpe_count)


def test_non_additive_counter_falls_back_to_counting_every_context():
    def chars4(s: str) -> int:  # not additive over sentences
        return (len(s) + 3) // 4

    exs = gen(count=chars4, lengths=[400, 1500], n_per_length=3)
    _check_lengths(exs, chars4)
    assert sum(e.meta["context_tokens_measured"] for e in exs) > len(exs) // 2


def test_needle_at_requested_depth():
    for e in gen(lengths=[2000], depths=[0.0, 0.1, 0.5, 0.9, 1.0]):
        off = e.meta["needle_char_offsets"][0]
        d = e.meta["depth"]
        assert abs(off / len(e.context) - d) < 0.03, (e.meta["task"], d, off / len(e.context))
        needle_start = e.context[off:]
        if d == 0.0:
            assert off == 0
        if d == 1.0:
            assert e.context.endswith(e.answers[0] + (". Remember it." if e.meta["task"] == "passkey" else "."))
        assert needle_start.startswith(("The pass key is", "The special magic number", "One of the special"))
        assert e.answers[0] in needle_start.split(".")[0] + "."


def test_answers_exact_and_present_exactly_once():
    for e in gen():
        task = e.meta["task"]
        assert all(e.context.count(a) == 1 for a in e.answers)
        assert all(a.isdigit() for a in e.answers)
        if task == "passkey":
            assert len(e.answers) == 1 and len(e.answers[0]) == 5 and e.meta["metric"] == "exact"
            assert e.question == "What is the pass key?"
            assert e.context.count("pass key") == 1
        elif task == "niah_single":
            assert len(e.answers) == 1 and e.meta["needle_key"] in e.question
            assert f"The special magic number for {e.meta['needle_key']} is: {e.answers[0]}." in e.context
        elif task == "niah_multikey":
            assert len(e.answers) == 1 and e.meta["metric"] == "exact"
            assert e.context.count("The special magic number for") == e.meta["num_keys"] == 4
            for k in e.meta["distractor_keys"]:
                assert k in e.context and k not in e.question
            assert f"for {e.meta['needle_key']} is: {e.answers[0]}." in e.context
        else:
            assert e.meta["metric"] == "contains_all" and len(e.answers) == e.meta["num_values"] == 4
            assert len(set(e.answers)) == 4
            for a in e.answers:
                assert f"One of the special magic numbers for {e.meta['needle_key']} is: {a}." in e.context


def test_meta_keys():
    e = gen(tasks=["niah_multivalue"], lengths=[500], depths=[0.25], n_per_length=1, num_values=3)[0]
    m = e.meta
    assert m["source"] == "synthetic" and m["task"] == "niah_multivalue" and m["language"] == "en"
    assert (m["target_tokens"], m["depth"], m["seed"], m["index"]) == (500, 0.25, 7, 0)
    assert m["num_values"] == 3 and len(e.answers) == 3
    assert {"metric", "filler", "needle_key", "context_tokens", "generator_version"} <= set(m)


def test_filler_is_varied_and_passkey_filler_classic():
    ex = gen(tasks=["niah_single", "passkey"], lengths=[3000], depths=[0.5], n_per_length=1)
    sentences = [s for s in ex[0].context.split(". ") if s]
    assert len(set(sentences)) > 0.8 * len(sentences)
    assert "The grass is green." in ex[1].context and "The sky is blue." in ex[1].context


def test_unknown_task_and_too_short():
    with pytest.raises(DataError, match=r"'niah_multi'.*Valid tasks: passkey, niah_single"):
        gen(tasks=["niah_multi"])
    with pytest.raises(DataError, match="too small"):
        gen(tasks=["niah_multivalue"], lengths=[10])


def test_prompt_templates_and_maxlen():
    assert set(syn.SYNTHETIC_PROMPTS) == set(syn.SYNTHETIC_MAXLEN) == set(syn.SYNTHETIC_TASKS)
    for t, tpl in syn.SYNTHETIC_PROMPTS.items():
        assert "{context}" in tpl and "{input}" in tpl
        out = tpl.format(context="CTX", input="Q?")
        assert "CTX" in out and "Q?" in out
        assert 16 <= syn.SYNTHETIC_MAXLEN[t] <= 48


def test_load_examples_dispatch_and_list_tasks(tmp_path):
    s = load_examples(DatasetCfg(source="synthetic", synthetic=SyntheticCfg(lengths=[200], depths=[0.5])),
                      tmp_path, whitespace_count)
    assert len(s) == 1 and s[0].meta["task"] == "passkey"
    write_jsonl(tmp_path / "d" / "data" / "trec.jsonl", records("trec", 2))
    lb = load_examples(DatasetCfg(source="longbench", longbench=LongBenchCfg(
        tasks=["trec"], source="dir", path=str(tmp_path / "d"))), tmp_path, whitespace_count)
    assert [e.meta["task"] for e in lb] == ["trec", "trec"]
    rows = list_tasks()
    names = [r["name"] for r in rows]
    assert len(rows) == 21 + 13 + 1 + 4 and len(set(names)) == len(names)  # v1, LongBench-E, LongBench v2, synthetic
    r = next(r for r in rows if r["name"] == "lsht")
    assert (r["source"], r["language"], r["metric"], r["longbench_e"]) == ("longbench", "zh", "classification_score", False)
    assert next(r for r in rows if r["name"] == "niah_multivalue")["metric"] == "contains_all"


def test_import_has_no_side_effects():
    code = (
        "import sys; sys.path.insert(0, 'harness')\n"
        "import kv_transition.datasets, kv_transition.datasets.longbench, kv_transition.datasets.synthetic\n"
        "print('datasets' in sys.modules, 'httpx' in sys.modules, 'huggingface_hub' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"]
