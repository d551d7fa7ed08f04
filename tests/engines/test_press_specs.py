"""Composable kvpress specs through the harness: kv.params carry the whole press tree into the request
and the cell id; matrix files take method specs; `kvt run --method` takes one; `kvt methods` lists the
catalogs. No engine is started (the real engines/ catalogs, a throwaway config)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kv_transition.cell import cell_id_for, cell_inputs, request_body, resolve_cell_spec
from kv_transition.cli import _method_spec, main
from kv_transition.config.paths import dataset_id_for
from kv_transition.config.schema import Config
from kv_transition.engines.spec import load_engine, resolve
from kv_transition.errors import ConfigError
from kv_transition.matrix import MatrixFile, expand
from tests.matrix.conftest import base_config


def _cfg(tmp_path: Path, **kv) -> Config:
    raw = base_config(tmp_path)
    raw["engine"] = {**raw.get("engine", {}), "name": "kvpress"}
    raw["kv"] = {**raw.get("kv", {}), **kv}
    return Config.model_validate(raw)


def test_nested_press_reaches_the_request_and_the_id(tmp_path: Path) -> None:
    eng = load_engine("kvpress")
    inner = {"inner": {"method": "snapkv", "window_size": 16}}
    spec = resolve(eng, "adakv", model_path="m", served_model="m", compression_ratio=0.5, request_params=inner)
    assert spec.request_extras["kv_press"] == {"method": "adakv", "alpha_safeguard": 0.2, "compression_ratio": 0.5,
                                               "inner": {"method": "snapkv", "window_size": 16}}
    cfg_a = _cfg(tmp_path, method="adakv", compression_ratio=0.5, params=inner)
    cfg_b = _cfg(tmp_path, method="adakv", compression_ratio=0.5, params={"inner": {"method": "knorm"}})
    ids = []
    for cfg in (cfg_a, cfg_b):
        s, _, _ = resolve_cell_spec(cfg)
        ids.append(cell_id_for(cell_inputs(cfg, s, dataset_id_for(cfg))))
    assert ids[0] != ids[1] and all(i.startswith("kvpress.adakv.r0.5-") for i in ids)


def test_wrapper_without_its_press_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"kv.params.inner: method kvpress/adakv wraps other presses"):
        resolve(load_engine("kvpress"), "adakv", model_path="m", served_model="m", compression_ratio=0.5)
    with pytest.raises(ConfigError, match=r"kv.params.presses"):
        resolve(load_engine("kvpress"), "composed", model_path="m", served_model="m", compression_ratio=0.5)


def test_matrix_method_specs_expand_to_distinct_cells(tmp_path: Path) -> None:
    mx = MatrixFile.model_validate({
        "name": "specs", "engines": {"kvpress": {"runtime": "process", "compression_ratios": [0.5], "methods": [
            "full", "snapkv", "expected_attention_leaderboard",
            {"method": "adakv", "inner": {"method": "snapkv"}},
            {"method": "adakv", "inner": {"method": "knorm"}, "compression_ratios": [0.25]},
            {"method": "decoding", "target_size": 256, "inner": {"method": "knorm"}},
        ]}}})
    exp = expand(_cfg(tmp_path), mx)
    labels = [c.label for c in exp.cells]
    assert labels == ["kvpress/full", "kvpress/snapkv r=0.5", "kvpress/expected_attention_leaderboard r=0.5",
                      "kvpress/adakv(snapkv) r=0.5", "kvpress/adakv(knorm) r=0.25", "kvpress/decoding(knorm)"]
    assert len({c.cell_id for c in exp.cells}) == 6 and len(exp.groups) == 1  # one engine serves them all
    ada = exp.cells[3]
    assert ada.spec.request_extras["kv_press"]["inner"] == {"method": "snapkv"}
    dec = exp.cells[5]
    assert dec.compression_ratio is None and dec.spec.request_extras["kv_press"]["target_size"] == 256
    with pytest.raises(Exception, match="method spec needs method"):
        MatrixFile.model_validate({"name": "x", "engines": {"kvpress": {"methods": [{"inner": {}}]}}})


def test_kvt_run_method_spec(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    args = argparse.Namespace(method="{method: adakv, compression_ratio: 0.5, inner: {method: snapkv}}",
                              ratio=None, budget=None)
    name, cfg2 = _method_spec(args, cfg)
    assert name == "adakv" and args.ratio == 0.5 and cfg2.kv.params == {"inner": {"method": "snapkv"}}
    s, _, _ = resolve_cell_spec(cfg2, method=name, compression_ratio=args.ratio)
    assert s.request_extras["kv_press"]["inner"] == {"method": "snapkv"}
    for bad, msg in (("{inner: {}}", "needs method"), ("{method: [", "not a YAML/JSON"),
                     ("{method: knorm, budget: 5}", None)):
        a = argparse.Namespace(method=bad, ratio=None, budget=3 if msg is None else None)
        with pytest.raises(ConfigError, match=msg or "given twice"):
            _method_spec(a, cfg)


def test_pipeline_scope_sends_question_start(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, scope="kvpress_pipeline", method="snapkv", compression_ratio=0.5)
    s, _, _ = resolve_cell_spec(cfg)
    entry = {"prompt": "ctx Q?", "max_new_tokens": 4, "add_special_tokens": False, "question_start": 4}
    body = request_body(entry, s, cfg)
    assert body["kv_press"]["scope"] == "kvpress_pipeline" and body["kv_press"]["question_start"] == 4
    finch = _cfg(tmp_path, method="finch", compression_ratio=0.5)
    s, _, _ = resolve_cell_spec(finch)
    body = request_body(entry, s, finch)
    assert "scope" not in body["kv_press"] and body["kv_press"]["question_start"] == 4


def test_kvt_methods_lists_every_engine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {(r["engine"], r["method"]): r for r in rows}
    assert {"vllm", "sglang", "kvpress"} <= {r["engine"] for r in rows}
    assert by[("kvpress", "adakv")]["memory"] == "masks" and by[("kvpress", "adakv")]["takes"] == "inner"
    assert by[("kvpress", "observed_attention")]["attention"] == "eager"
    assert by[("kvpress", "expected_attention_leaderboard")]["recipe"]["method"] == "adakv"
    assert by[("kvpress", "qfilter")]["needs"] == ["qfilter_path"]
    assert main(["methods", "--engine", "kvpress"]) == 0
    out = capsys.readouterr().out
    assert "masked, not freed" in out and "decoding" in out
    assert main(["methods", "--engine", "nope"]) == 2
