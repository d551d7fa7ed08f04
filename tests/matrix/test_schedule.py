"""The packing scheduler as pure functions: fake inventories of 1, 2, 4, 8 GPUs; TP 1/2/4."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv_transition.config.schema import Config
from kv_transition.errors import ConfigError
from kv_transition.matrix import MatrixFile, expand
from kv_transition.matrix.inventory import Inventory, inventory
from kv_transition.matrix.run import jobs_for
from kv_transition.matrix.schedule import Job, assign, choose_gpus, makespan, simulate

from .conftest import base_config


def _no_overlap(placements) -> None:
    """No GPU runs two jobs at once."""
    for i, a in enumerate(placements):
        for b in placements[i + 1:]:
            if set(a.gpus) & set(b.gpus):
                assert a.end <= b.start or b.end <= a.start, (a, b)


def test_choose_gpus_aligned_blocks() -> None:
    inv = list(range(8))
    assert choose_gpus(inv, 2, inv) == (0, 1)
    assert choose_gpus([1, 2, 3, 4, 5], 2, inv) == (2, 3)          # aligned pair, not 1-2
    assert choose_gpus([1, 2, 3, 4, 5, 6, 7], 4, inv) == (4, 5, 6, 7)
    assert choose_gpus([1, 2, 5, 6], 4, inv) == (1, 2, 5, 6)         # no aligned block: lowest free
    assert choose_gpus([3], 2, inv) is None
    assert choose_gpus([4, 6], 1, [6, 4]) == (6,)                    # inventory order (e.g. --gpus 6,4)


@pytest.mark.parametrize("n_gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_simulate_packs_disjoint_sets(n_gpus: int, tp: int) -> None:
    inv = list(range(n_gpus))
    jobs = [Job(f"j{i}", tp, work=1.0, order=i) for i in range(12)]
    if tp > n_gpus:
        with pytest.raises(ConfigError, match="needs"):
            simulate(jobs, inv)
        return
    pl = simulate(jobs, inv)
    assert sorted(p.key for p in pl) == sorted(j.key for j in jobs)
    assert all(len(p.gpus) == tp and set(p.gpus) <= set(inv) for p in pl)
    _no_overlap(pl)
    lanes = n_gpus // tp
    assert makespan(pl) == pytest.approx(-(-12 // lanes))  # equal jobs: perfect waves
    if tp > 1:
        assert all(p.gpus[0] % tp == 0 and list(p.gpus) == list(range(p.gpus[0], p.gpus[0] + tp)) for p in pl)


def test_mixed_tp_on_8_gpus_is_near_optimal() -> None:
    jobs = ([Job(f"a{i}", 4, 2.0, order=i) for i in range(2)] + [Job(f"b{i}", 2, 1.0, order=10 + i) for i in range(4)]
            + [Job(f"c{i}", 1, 1.0, order=20 + i) for i in range(8)])
    pl = simulate(jobs, range(8))
    _no_overlap(pl)
    total = sum(j.n_gpus * j.work for j in jobs)
    assert makespan(pl) <= 1.05 * total / 8 + 1e-9


def test_baseline_first_and_backfill() -> None:
    jobs = [Job("big", 2, 5.0, order=0), Job("base", 1, 1.0, baseline=True, order=1), Job("small", 1, 1.0, order=2)]
    first = assign(jobs, [0, 1], [0, 1])
    assert [j.key for j, _ in first] == ["base", "small"]   # baseline first; 'big' does not fit the rest: backfill
    got = assign(jobs, [0, 1, 2, 3], [0, 1, 2, 3])
    assert [(j.key, g) for j, g in got] == [("base", (0,)), ("big", (2, 3)), ("small", (1,))]


def test_inventory_sources() -> None:
    assert inventory(gpus="0,1,2,3") == Inventory((0, 1, 2, 3), True)
    assert inventory(slots=2) == Inventory((0, 1), False)
    assert inventory(nvml=lambda: 8) == Inventory(tuple(range(8)), True)
    assert inventory(nvml=lambda: (_ for _ in ()).throw(RuntimeError("no driver"))) == Inventory((0,), False)
    with pytest.raises(ConfigError):
        inventory(gpus="0,0")


@pytest.mark.parametrize("n_gpus", [1, 2, 4, 8])
def test_request_mode_sweep_is_one_engine_per_model_and_gpu_set(tmp_path: Path, engines_dir: Path, n_gpus: int) -> None:
    """kvpress-like sweep of 4 methods × 4 ratios: 1 engine group per model (not 16), each on one GPU set."""
    from kv_transition.matrix.cli import plan_dict

    m = MatrixFile.model_validate({
        "name": "sweep", "models": [{"id": "fake-model"}, {"id": "m2", "tp": 2 if n_gpus >= 2 else 1}],
        "engines": {"fakekv": {"compression_ratios": [0.25, 0.5, 0.75, 0.9], "methods": ["snapkv", "streamingllm", "knorm", "full"]},
                    "fakesrv": {"methods": ["full", "fp8", "int4"]}}})
    cfg = Config.model_validate(base_config(tmp_path))
    exp = expand(cfg, m)
    inv = Inventory(tuple(range(n_gpus)), True)
    plan = plan_dict(cfg, exp, inv, None)
    kv = [g for g in plan["groups"] if g["engine"] == "fakekv"]
    assert len(kv) == 2 and all(len(g["cells"]) == 13 for g in kv)      # 3 × 4 ratios + full
    assert all(g["cells"][0]["baseline"] for g in kv)
    # request-mode groups send example-major (interleave: true by default); server-mode groups never do
    assert all(g["interleaved"] for g in kv) and not any(g["interleaved"] for g in plan["groups"] if g not in kv)
    assert plan["engine_loads"] == 2 + 2 * 3 and plan["n_cells"] == 2 * 16
    assert all(g["gpus"] and len(g["gpus"]) == g["tp"] for g in plan["groups"])
    # the engine gets exactly its GPU set; ports differ between groups that run at the same time
    for g in plan["groups"]:
        assert g["args"][g["args"].index("--port") + 1] == str(g["port"])
    jobs = jobs_for(exp)
    _no_overlap(simulate(jobs, inv.devices))
