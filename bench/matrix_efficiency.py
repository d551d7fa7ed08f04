#!/usr/bin/env python3
"""Matrix scheduler efficiency with a simulated engine of known cost, through the real runner.

The engine is the TEST DOUBLE server (tests/fakes/fake_openai_server.py) started by the process runtime
with a known startup time (FAKE_STARTUP_DELAY) and per-request cost (FAKE_TTFT, all requests of a cell in
one concurrent batch), on 8 simulated GPUs (`--gpus` semantics without CUDA: slots).

1. 24 server-mode cells (one engine each, TP 1) on 8 GPUs, and a mixed case (16 × TP1 + 4 × TP2 + 2 × TP4).
   Reports wall / (Σ cell work / 8): with the nominal work (startup + request cost — the goal ≤ 1.05) and
   with each cell's measured duration (matrix_cells), which isolates the packing from per-cell overhead.
2. A kvpress-like request-mode sweep, 4 methods × 4 ratios: the number of engine loads (goal: 1 per model and
   GPU set, not 16) and the wall time against 16 loads.

    .venv/bin/python bench/matrix_efficiency.py [--startup 2.0] [--request 3.0] [--requests 8]

Results (2-core CPU box; startup 2.0 s, request 3.0 s, 8 requests per cell; nominal cell work 5.0 s):

    24 cells, TP 1, 8 GPUs     wall 18.54 s  ideal 15.0 s  ratio nominal 1.236  ratio measured 1.017
    22 cells, TP 1/2/4 mixed   wall 25.18 s  ideal 20.0 s  ratio nominal 1.259  ratio measured 1.095
    kvpress sweep 4 × 4        16 cells, 1 engine group, 1 engine load (GPU set [0]), wall 63.7 s
                               (16 loads would cost 16 × 5.0 = 80 s nominal)

The packing itself is within 2 % of ideal for equal TP-1 cells (ratio measured); the nominal ratio misses
the 1.05 goal by the per-cell overhead of ~1 s measured here (a cell took 6.08 s for 5.0 s of simulated
work: starting a Python engine process and tearing it down on 2 busy cores, plus run_cell's own setup/
teardown — the shared-engine sweep shows ~0.8 s per cell even without a load). With real engines
(minutes of load, seconds per request) that overhead is < 1 %; the mixed-TP case additionally loses to
fragmentation (TP-4 blocks waiting for aligned free GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakes.fake_engine import FAKE_SERVER  # noqa: E402


def engine_yaml(name: str, mode: str) -> str:
    methods = ("  full: {baseline: true}\n" + "".join(f"  m{i}: {{args: [\"--reply\", \"r{i}\"]}}\n" for i in range(60))
               if mode == "server" else
               "  full: {request: {kv_press: {method: full}}, baseline: true}\n"
               + "".join(f"  press{i}: {{request: {{kv_press: {{method: press{i}}}}}, supports: [compression_ratio]}}\n"
                         for i in range(4)))
    return (f"name: {name}\nimage: kvt-bench\ntag: latest\ncommand: [python, -u, {FAKE_SERVER}]\n"
            "args: [--host, '{host}', --port, '{port}', --model, '{served_model}']\n"
            "health: {path: /health, readiness_timeout_s: 60, interval_s: 0.05}\n"
            "metrics: {path: /metrics, kv_usage: []}\nconcurrency: 64\ngpu: false\n"
            f"method_mode: {mode}\nmethods:\n{methods}")


def setup(root: Path, n_req: int) -> tuple:
    from kv_transition.config import resolve_paths
    from kv_transition.config.schema import Config
    from kv_transition.db import connect
    from kv_transition.manifest import write_db
    from kv_transition.prepare import record_experiment
    from tests.runner.conftest import make_manifest

    for name, mode in (("simsrv", "server"), ("simkv", "request")):
        (root / "engines" / name).mkdir(parents=True, exist_ok=True)
        (root / "engines" / name / "engine.yaml").write_text(engine_yaml(name, mode))
    os.environ["KVT_ENGINES_DIR"] = str(root / "engines")
    os.environ["KVT_STATE_DIR"] = str(root / "state")
    cfg = Config.model_validate({
        "experiment": {"group_id": "bench"}, "dataset": {"id": "benchds"},
        "model": {"id": "fake-model", "path": "/nonexistent"},
        "engine": {"name": "simsrv", "runtime": "process", "device": "cpu", "port": 19100},
        "decoding": {"request_timeout_s": 60, "max_retries": 0}, "telemetry": {"enabled": False},
        "output": {"runs_root": str(root / "runs"), "data_root": str(root / "data")}})
    paths = resolve_paths(cfg, cwd=root)
    conn = connect(paths.db)
    record_experiment(conn, cfg)
    write_db(conn, make_manifest(paths.dataset_id, n_req), paths.manifest, cfg.experiment.group_id)
    conn.close()
    return cfg, paths


def run_matrix(cfg, root: Path, matrix: dict, n_gpus: int) -> tuple:
    from kv_transition.db import connect, rows
    from kv_transition.matrix import MatrixFile, expand
    from kv_transition.matrix.run import Inventory, MatrixRunner

    exp = expand(cfg, MatrixFile.model_validate(matrix))
    runner = MatrixRunner(cfg, exp, Inventory(tuple(range(n_gpus)), False), cwd=root)
    t0 = time.monotonic()
    s = runner.run()
    wall = time.monotonic() - t0
    assert s.ok, [(o.cell.label, o.reason) for o in s.outcomes if o.status != "completed"]
    conn = connect(runner.paths.db)
    cells = rows(conn, "SELECT * FROM matrix_cells WHERE matrix_run_id=?", (s.matrix_run_id,))
    loads = rows(conn, "SELECT * FROM matrix_engines WHERE matrix_run_id=?", (s.matrix_run_id,))
    conn.close()
    return s, wall, cells, loads, exp


def _secs(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--startup", type=float, default=2.0, help="engine startup, s")
    ap.add_argument("--request", type=float, default=3.0, help="per-request cost (one concurrent batch per cell), s")
    ap.add_argument("--requests", type=int, default=8, help="requests per cell")
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    out: dict = {"startup_s": args.startup, "request_s": args.request, "requests_per_cell": args.requests,
                 "gpus": args.gpus}
    env = {"FAKE_STARTUP_DELAY": str(args.startup), "FAKE_TTFT": str(args.request)}
    work = args.startup + args.request  # nominal cell work on its GPU set: load + one concurrent batch
    with tempfile.TemporaryDirectory(prefix="kvt-bench-") as tmp:
        root = Path(tmp)
        cfg, _ = setup(root, args.requests)
        # 1a. 24 cells, TP 1
        m = {"name": "b24", "engines": {"simsrv": {"env": env, "methods": ["full"] + [f"m{i}" for i in range(23)]}}}
        s, wall, cells, _, exp = run_matrix(cfg, root, m, args.gpus)
        measured = sum(_secs(c["started_at"], c["finished_at"]) for c in cells)
        out["24_cells_tp1"] = {"cells": len(cells), "wall_s": round(wall, 2),
                               "ideal_s": round(24 * work / args.gpus, 2),
                               "ratio_nominal": round(wall / (24 * work / args.gpus), 3),
                               "ratio_measured": round(wall / (measured / args.gpus), 3),
                               "mean_cell_s": round(measured / len(cells), 2)}
        # 1b. mixed TP: 16 × TP1 + 4 × TP2 + 2 × TP4 = 24 + 16 GPU-cells... (Σ GPU·work / 8)
        meths = ["full"] + [f"m{i}" for i in range(23, 44)]
        m2 = {"name": "bmix", "engines": {"simsrv": {"env": env, "methods": meths}},
              "overrides": [{"match": {"method": meths[16:20]}, "tp": 2}, {"match": {"method": meths[20:22]}, "tp": 4}]}
        s, wall, cells, _, exp = run_matrix(cfg, root, m2, args.gpus)
        tp = {c.cell_id: c.tp for c in exp.cells}
        gpu_work = sum(tp[c["cell_id"]] * work for c in cells)
        gpu_meas = sum(tp[c["cell_id"]] * _secs(c["started_at"], c["finished_at"]) for c in cells)
        out["22_cells_mixed_tp"] = {"cells": len(cells), "tp": {"1": 16, "2": 4, "4": 2}, "wall_s": round(wall, 2),
                                    "ideal_s": round(gpu_work / args.gpus, 2),
                                    "ratio_nominal": round(wall / (gpu_work / args.gpus), 3),
                                    "ratio_measured": round(wall / (gpu_meas / args.gpus), 3)}
        # 2. kvpress-like sweep: 4 methods × 4 ratios on one model
        m3 = {"name": "bkv", "engines": {"simkv": {"env": env, "compression_ratios": [0.25, 0.5, 0.75, 0.9],
                                                   "methods": [f"press{i}" for i in range(4)]}}}
        s, wall, cells, loads, exp = run_matrix(cfg, root, m3, args.gpus)
        out["kvpress_sweep_4x4"] = {"cells": len(cells), "engine_groups": len(exp.groups), "engine_loads": len(loads),
                                    "gpu_sets": sorted({c["gpus_json"] for c in cells}), "wall_s": round(wall, 2),
                                    "one_engine_per_cell_s": round(16 * work, 2)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
