"""Matrix expansion: cells, stable ids (equal to `kvt run`'s), exclusions, overrides, grouping, lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv_transition.cell import cell_id_for, cell_inputs, resolve_cell_spec
from kv_transition.config.paths import dataset_id_for
from kv_transition.config.schema import Config
from kv_transition.errors import ConfigError
from kv_transition.matrix import MatrixFile, expand
from kv_transition.matrix.schema import load_matrix

from .conftest import base_config


def _cfg(tmp_path: Path, **sections) -> Config:
    return Config.model_validate(base_config(tmp_path, **sections))


MX = {
    "name": "t", "repeats": 2,
    "models": [{"id": "fake-model"}, {"id": "other/big-model", "tp": 2}],
    "engines": {
        "fakekv": {"compression_ratios": [0.25, 0.5], "methods": {"full": None, "snapkv": None,
                                                                   "knorm": {"budgets": [64]}}},
        "fakesrv": {"tp": 1, "args": ["--ttft", "0"], "methods": ["full", "fp8"]},
    },
    "exclude": [{"engine": "fakekv", "method": "snapkv", "compression_ratio": 0.5, "model": "other/big-model"}],
    "overrides": [{"match": {"engine": "fakesrv", "model": "other/big-model"}, "tp": 4, "env": {"X_TOKEN": "s3cret"}},
                  {"match": {"engine": "fakesrv", "method": "fp8"}, "args": ["--token-delay", "0"]}],
}


def test_expansion_counts_exclusions_overrides(tmp_path: Path, engines_dir: Path) -> None:
    exp = expand(_cfg(tmp_path), MatrixFile.model_validate(MX))
    # per model: fakekv full + snapkv×2 + knorm b64 = 4 cells; fakesrv full + fp8 = 2 → 6 × 2 models − 1 excluded
    assert len(exp.cells) == 11 and exp.excluded == 1
    big_srv = [c for c in exp.cells if c.model == "other/big-model" and c.engine == "fakesrv"]
    assert {c.tp for c in big_srv} == {4} and all(c.spec.env["X_TOKEN"] == "s3cret" for c in big_srv)
    assert {c.tp for c in exp.cells if c.model == "other/big-model" and c.engine == "fakekv"} == {2}  # model tp
    fp8 = [c for c in exp.cells if c.method == "fp8"]
    assert all(c.cfg.engine.extra_args == ["--ttft", "0", "--token-delay", "0"] for c in fp8)
    assert all(c.spec.args[-4:] == ["--ttft", "0", "--token-delay", "0"] for c in fp8)
    assert all(c.cfg.decoding.repeats == 2 for c in exp.cells)
    knorm = [c for c in exp.cells if c.method == "knorm"]
    assert {(c.compression_ratio, c.budget) for c in knorm} == {(None, 64)}  # method list replaces the engine's
    full_kv = [c for c in exp.cells if c.engine == "fakekv" and c.method == "full"]
    assert all(c.compression_ratio is None and c.baseline for c in full_kv)  # full takes no ratio
    # a different model does not inherit the config model's weights path
    assert {c.cfg.model.path for c in exp.cells if c.model == "other/big-model"} == {None}


def test_ids_are_stable_and_equal_to_kvt_run(tmp_path: Path, engines_dir: Path) -> None:
    cfg = _cfg(tmp_path)
    m = MatrixFile.model_validate(MX)
    a = [c.cell_id for c in expand(cfg, m).cells]
    b = [c.cell_id for c in expand(_cfg(tmp_path), MatrixFile.model_validate(MX)).cells]
    assert a == b and len(set(a)) == len(a)
    # the same cell as a single `kvt run -c CONFIG --engine fakekv --method snapkv --ratio 0.25` (repeats 2)
    cfg2 = _cfg(tmp_path, decoding={"repeats": 2})
    spec, _, _ = resolve_cell_spec(cfg2, engine="fakekv", method="snapkv", compression_ratio=0.25)
    want = cell_id_for(cell_inputs(cfg2, spec, dataset_id_for(cfg2)))
    snap = [c for c in expand(cfg, m).cells if c.model == "fake-model" and c.method == "snapkv"
            and c.compression_ratio == 0.25]
    assert [c.cell_id for c in snap] == [want]
    # infrastructure knobs (ports, GPUs, tp, env, concurrency) do not change ids; args and ratios do
    m2 = MatrixFile.model_validate({**MX, "base_port": 19999,
                                    "overrides": MX["overrides"] + [{"match": {"engine": "fakekv"}, "concurrency": 1,
                                                                     "tp": 8, "env": {"A": "1"}}]})
    assert [c.cell_id for c in expand(cfg, m2).cells] == a
    m3 = MatrixFile.model_validate({**MX, "engines": {**MX["engines"], "fakesrv": {**MX["engines"]["fakesrv"],
                                                                                   "args": ["--ttft", "0.5"]}}})
    ids3 = {c.cell_id for c in expand(cfg, m3).cells}
    assert ids3 != set(a) and {c.cell_id for c in expand(cfg, m3).cells if c.engine == "fakekv"} <= set(a)


def test_grouping_baseline_first(tmp_path: Path, engines_dir: Path) -> None:
    exp = expand(_cfg(tmp_path), MatrixFile.model_validate(MX))
    shared = [g for g in exp.groups if g.shared]
    # request mode: one engine per model (all methods/ratios/budgets of it), the baseline first
    assert len(shared) == 2 and {g.model for g in shared} == {"fake-model", "other/big-model"}
    assert all(g.cells[0].baseline and g.cells[0].method == "full" for g in shared)
    assert sum(len(g.cells) for g in shared) == 7
    # server mode: one group per cell; every group holding a baseline precedes every group without
    srv = [g for g in exp.groups if not g.shared]
    assert len(srv) == 4 and all(len(g.cells) == 1 for g in srv)
    flags = [g.has_baseline for g in exp.groups]
    assert flags == sorted(flags, reverse=True)


def test_request_mode_groups_split_on_server_args(tmp_path: Path, engines_dir: Path) -> None:
    mx = {"name": "s", "engines": {"fakekv": {"compression_ratios": [0.5], "methods": ["full", "snapkv", "knorm"]}},
          "overrides": [{"match": {"method": "knorm"}, "args": ["--ttft", "0.1"]}]}
    exp = expand(_cfg(tmp_path), MatrixFile.model_validate(mx))
    assert sorted(len(g.cells) for g in exp.groups) == [1, 2]


def test_lock_pins_docker_cells_only(tmp_path: Path, engines_dir: Path) -> None:
    lock = {"images": {"kvt-test-engine:latest": {"digest": "sha256:" + "a" * 64, "source": "registry"}}}
    m = {"name": "l", "engines": {"fakesrv": {"methods": ["full"], "runtime": "docker"},
                                  "fakekv": {"methods": ["full"], "runtime": "process"}}}
    exp = expand(_cfg(tmp_path), MatrixFile.model_validate(m), lock)
    d = next(c for c in exp.cells if c.engine == "fakesrv")
    p = next(c for c in exp.cells if c.engine == "fakekv")
    assert d.spec.image_ref == "kvt-test-engine@sha256:" + "a" * 64 and d.digest
    assert p.digest is None and p.spec.image_ref == "kvt-test-engine:latest" and p.image_lock.startswith("sha256:")
    local = {"images": {"kvt-test-engine:latest": {"digest": "local:sha256:" + "b" * 64, "source": "local"}}}
    d2 = next(c for c in expand(_cfg(tmp_path), MatrixFile.model_validate(m), local).cells if c.engine == "fakesrv")
    assert d2.digest is None and d2.image_lock.startswith("local:")  # a local id is recorded, the tag kept


def test_bad_matrices_are_one_line_errors(tmp_path: Path, engines_dir: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text("name: x\nengines: {fakekv: {methods: [full]}}\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus: unknown key"):
        load_matrix(p)
    with pytest.raises(ConfigError, match="has no method 'nope'"):
        expand(_cfg(tmp_path), MatrixFile.model_validate({"name": "x", "engines": {"fakekv": {"methods": ["nope"]}}}))
    with pytest.raises(ConfigError, match="does not take a compression_ratio"):
        expand(_cfg(tmp_path), MatrixFile.model_validate(
            {"name": "x", "engines": {"fakesrv": {"methods": {"fp8": {"compression_ratios": [0.5]}}}}}))


def test_repo_matrix_files_validate(repo_root: Path) -> None:
    for p in sorted((repo_root / "config" / "matrix").glob("*.yaml")):
        if not p.name.endswith(".lock.yaml"):
            assert load_matrix(p).engines, p


def test_llama8b_sweep_expands(tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The realistic GPU example against the repo's engine YAMLs (kvpress needs a loadable engine.yaml)."""
    from kv_transition.config import load_config
    from kv_transition.engines.spec import load_engine

    monkeypatch.delenv("KVT_ENGINES_DIR", raising=False)
    try:
        load_engine("kvpress")
    except ConfigError as e:
        pytest.skip(f"engines/kvpress/engine.yaml does not load yet: {e}")
    cfg = load_config(repo_root / "config" / "experiments" / "snapkv_longbench.yaml", env={})
    exp = expand(cfg, load_matrix(repo_root / "config" / "matrix" / "llama8b_kv_sweep.yaml"))
    kv = [g for g in exp.groups if g.engine == "kvpress"]
    assert len(kv) == 1 and kv[0].cells[0].method == "full"
    assert sum(g.engine == "vllm" for g in exp.groups) == 4 and sum(g.engine == "sglang" for g in exp.groups) == 3
