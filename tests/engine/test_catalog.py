"""The press table (kvpress_engine/presses.py) against kvpress itself and against engine.yaml: every press
class exists, every parameter is a constructor field with kvpress's own default, the leaderboard recipes are
the registry's, and the harness catalog (engine.yaml) is exactly what the table generates."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from kvpress_engine.catalog import catalog
from kvpress_engine.presses import KINDS, RECIPES

ENGINE_YAML = Path(__file__).resolve().parents[2] / "engines" / "kvpress" / "engine.yaml"
# deliberate deviations from kvpress's defaults (documented in the README)
DEVIATIONS = {("random", "seed")}  # kvpress: None (unseeded); here 0, so runs are reproducible


def test_engine_yaml_is_the_generated_catalog():
    methods = yaml.safe_load(ENGINE_YAML.read_text())["methods"]
    assert methods == catalog(), "engine.yaml is stale: run `python -m kvpress_engine.catalog` and paste it"


def _init_defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


@pytest.mark.parametrize("name", [k for k in KINDS if KINDS[k].press_class])
def test_kind_matches_kvpress_class(name):
    import kvpress

    kind = KINDS[name]
    cls = getattr(kvpress, kind.press_class)
    fields = _init_defaults(cls)
    if kind.ratio == "compression_ratio":
        assert "compression_ratio" in fields
    if kind.inner:
        assert kind.inner_field in fields
    for pname, p in kind.params.items():
        if p.type == "path":  # the engine's local-artifact parameter (kvpress fetches it from the Hub)
            continue
        assert pname in fields, f"{kind.press_class} has no field {pname}"
        if not p.required and (name, pname) not in DEVIATIONS:
            assert fields[pname] == p.default, f"{name}.{pname}: kvpress default {fields[pname]!r}"


def test_recipes_are_the_leaderboard_registry():
    """The recipes, rebuilt through kvpress classes, print like kvpress's registry entries
    (evaluation/evaluate_registry.py) — written out here by hand from that file."""
    import kvpress as k

    registry = {
        "expected_attention": k.AdaKVPress(k.ExpectedAttentionPress(epsilon=1e-2)),
        "adakv_snapkv": k.AdaKVPress(k.SnapKVPress()),
        "adakv_compactor": k.AdaKVPress(k.CompactorPress()),
        "block_keydiff": k.BlockPress(press=k.KeyDiffPress(), block_size=128),
        "chunkkv": k.ChunkKVPress(press=k.SnapKVPress(), chunk_length=20),
        "critical_snapkv": k.CriticalKVPress(k.SnapKVPress()),
        "critical_expected_attention": k.CriticalKVPress(k.ExpectedAttentionPress(use_vnorm=False)),
        "critical_adakv_snapkv": k.CriticalAdaKVPress(k.SnapKVPress()),
        "critical_adakv_expected_attention": k.CriticalAdaKVPress(k.ExpectedAttentionPress(use_vnorm=False)),
        "kvzip_plus": k.KVzipPress(kvzip_plus_normalization=True),
        "streaming_llm": k.StreamingLLMPress(),
        "decoding_knorm": k.DecodingPress(base_press=k.KnormPress()),
        "decoding_streaming_llm": k.DecodingPress(base_press=k.StreamingLLMPress()),
        "decoding_tova": k.DecodingPress(base_press=k.TOVAPress()),
        "decoding_keydiff": k.DecodingPress(base_press=k.KeyDiffPress()),
        "cam_streaming_llm": k.CAMPress(base_press=k.StreamingLLMPress()),
        "cam_knorm": k.CAMPress(base_press=k.KnormPress()),
        "cam_tova": k.CAMPress(base_press=k.TOVAPress()),
        "merging_knorm": k.MergingPress(k.KnormPress()),
        "merging_snapkv": k.MergingPress(k.SnapKVPress()),
        "merging_expected_attention": k.MergingPress(k.ExpectedAttentionPress(epsilon=1e-2)),
    }
    from kvpress_engine.build import build_node
    from kvpress_engine.presses import parse_node

    seen = set()
    for name, rec in RECIPES.items():
        if rec.leaderboard == "no_press":
            continue
        built = build_node(parse_node({"method": name}, "kv_press"), 0.0)
        assert repr(built) == repr(registry[rec.leaderboard]), name
        seen.add(rec.leaderboard)
    assert seen == set(registry)
