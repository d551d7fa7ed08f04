#!/usr/bin/env python3
"""Matrix scheduler efficiency with a simulated engine of known cost, through the real runner.

The engine is the TEST DOUBLE server (tests/fakes/fake_openai_server.py) with a known startup time
(FAKE_STARTUP_DELAY) and per-request cost (FAKE_TTFT, all requests of a cell in one concurrent batch), on 8
simulated GPUs (`--gpus` semantics without CUDA: slots), driven by the real MatrixRunner → run_cell (scheduler,
DB rows, runner, watchdog, telemetry at the config default 0.25 s: host + /metrics scrape; no NVML on CPU).
  --engine inproc (default)  InProcessSimRuntime (below): the fake served in a thread of this process after
                             sleeping the startup time; health wait = the harness's wait_healthy.
  --engine process           the real ProcessRuntime, the fake as its own OS process.
Both give the fake a listen backlog of 128 (socketserver's 5 overflowed with 8 connections per cell: the
kernel drops the SYN, the client retries after 1 s — a test-double artifact, see BACKLOG).

1. 24 server-mode cells (one engine each, TP 1) on 8 GPUs, and a mixed case (16 × TP1 + 4 × TP2 + 2 × TP4).
   Reports wall / (Σ cell work / 8): with the nominal work (startup + request cost — the goal ≤ 1.05) and
   with each cell's measured duration (matrix_cells), which isolates the packing from per-cell overhead.
2. A kvpress-like request-mode sweep, 4 methods × 4 ratios: the number of engine loads (goal: 1 per model and
   GPU set, not 16) and the wall time against 16 loads.

    .venv/bin/python bench/matrix_efficiency.py [--engine inproc|process] [--startup 2.0] [--request 3.0]
                                                [--requests 8] [--telemetry-interval 0.25]

Results (2-core CPU box; startup 2.0 s, request 3.0 s, 8 requests per cell; nominal cell work 5.0 s):

                               inproc                                  process
    24 cells, TP 1, 8 GPUs     wall 16.52 s ideal 15.0  1.102 / 1.017    wall 17.36 s ideal 15.0  1.157 / 1.020
    22 cells, TP 1/2/4 mixed   wall 21.49 s ideal 20.0  1.074 / 1.042    wall 21.86 s ideal 20.0  1.093 / 1.039
                               (ratio nominal / ratio measured)
    kvpress sweep 4 × 4        16 cells, 1 engine group, 1 engine load (GPU set [0]), wall 51.4 s both modes
                               (nominal 2 + 16 × 3 = 50 s; 16 loads would cost 16 × 5.0 = 80 s)

Before this version: process mode 1.236 / 1.017 (24 cells), 1.259 / 1.095 (mixed), sweep 63.7 s; the first
in-process run 1.329 / 1.047. The per-cell overhead (a cell took 6.1–6.35 s for 5.0 s of work) was not Python
process start-up: (a) SYN drops at the fake's backlog of 5 (a 1 s TCP retransmit in many cells; fixed here,
bench only) and (b) the harness's health poll: runtime.health.probe called a bare httpx.get, which builds a
TLS context (loads the CA bundle, ~28 ms CPU) per probe — at a 0.05 s interval 8 starting engines saturate
2 cores (fixed in health.py: one context per process; tests/runtime/test_health.py). What remains (~0.4 s
per cell, mean cell 5.42 s) is CPU contention of 8 cells × 8 streams + telemetry on 2 cores (one GIL in the
inproc mode): a cell alone costs ~0.15 s over nominal (spec/DB setup ~0.05 s, health-poll granularity,
asyncio/httpx client set-up, engine stop). The packing itself is within 2 % of ideal for equal TP-1 cells
(ratio measured); the mixed-TP case loses ~4 % to fragmentation (TP-4 waits for aligned free GPUs). With
real engines (minutes of load, seconds per request) the per-cell overhead is < 1 %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakes.fake_engine import FAKE_SERVER  # noqa: E402

from kv_transition.runtime.base import EngineStartError, Instance, Runtime, now_iso  # noqa: E402


#: listen backlog of the simulated engine. socketserver's default is 5: a cell opening its 8 connections at
#: once on a busy 2-core box overflows it (ListenOverflows in /proc/net/netstat), the kernel drops the SYN
#: and the client retries after the 1 s initial RTO — a second per cell that is an artifact of the test
#: double (uvicorn/vLLM/SGLang listen with a backlog of 2048), not of the harness.
BACKLOG = 128


def _make_server(f, opts, log_path=None):
    """tests/fakes make_server with a real-server-like backlog (this process only, no global patch); the
    access log goes to the cell's engine log like a process engine's stdout, not to this terminal."""
    from http.server import ThreadingHTTPServer

    lock = threading.Lock()

    def log_message(self, fmt, *args):
        if log_path is not None:
            with lock, open(log_path, "a") as fh:
                fh.write(f"{self.address_string()} {fmt % args}\n")

    cls = type("SimServer", (ThreadingHTTPServer,), {"request_queue_size": BACKLOG, "allow_reuse_address": True,
                                                     "daemon_threads": True})
    return cls((opts.host, opts.port), type("BoundHandler", (f.Handler,), {"state": f.State(opts),
                                                                           "log_message": log_message}))


class InProcessSimRuntime(Runtime):
    """The simulated engine in this process: `start()` returns at once with a thread that sleeps the known
    startup time (FAKE_STARTUP_DELAY from the spec's env), then serves the stdlib fake OpenAI server on the
    spec's loopback port (the matrix runner picked a free one) with the known per-request cost (FAKE_TTFT →
    --ttft); `wait_ready` is the harness's own health poll (runtime.health.wait_healthy at the engine's
    interval); `stop()` shuts the server down and joins the thread. No processes, so the number measures
    the scheduler + run_cell (DB rows, runner, telemetry, teardown), not Python start-up on a busy box."""

    name = "inproc-sim"

    def start(self, spec, labels, log_path):
        from tests.fakes import fake_openai_server as f

        if spec.host not in ("127.0.0.1", "localhost"):
            raise EngineStartError(f"in-process sim engine: loopback only, not {spec.host!r}")
        argv, it = [], iter(spec.args)  # the engine.yaml args (--model, --reply …) minus host/port
        for a in it:
            if a in ("--host", "--port"):
                next(it, None)
            else:
                argv.append(a)
        opts = f.parse_args(["--host", "127.0.0.1", "--port", str(spec.port),
                             "--startup-delay", spec.env.get("FAKE_STARTUP_DELAY", "0"),
                             "--ttft", spec.env.get("FAKE_TTFT", "0"), *argv])
        h: dict = {"srv": None, "stop": threading.Event(), "error": None, "lock": threading.Lock()}

        def serve() -> None:
            if h["stop"].wait(opts.startup_delay):  # stopped while "loading"
                return
            with h["lock"]:  # stop() either sees no server or one that serve_forever will run (and see shut down)
                if h["stop"].is_set():
                    return
                try:
                    h["srv"] = _make_server(f, opts, log_path)
                except OSError as e:
                    h["error"] = e
                    return
            h["srv"].serve_forever(poll_interval=0.05)  # as tests/fakes serve_in_thread

        th = threading.Thread(target=serve, name=f"sim-engine-{spec.port}", daemon=True)
        h["thread"] = th
        inst = Instance(runtime=self.name, base_url=spec.base_url, spec=spec, ident=f"thread:{spec.port}",
                        log_path=log_path, started_at=now_iso(), handle=h)
        self._track(inst)
        th.start()
        return inst

    def wait_ready(self, inst, timeout_s=None):
        from kv_transition.runtime.health import wait_healthy

        spec, h = inst.spec, inst.handle
        wait_healthy(spec.base_url + spec.health_path,
                     timeout_s=timeout_s if timeout_s is not None else spec.readiness_timeout_s,
                     interval_s=spec.health_interval_s,
                     alive=lambda: None if h["thread"].is_alive() or h["srv"] else 1,
                     log_tail=lambda: repr(h["error"] or ""), what=f"sim engine :{spec.port}")
        inst.ready_at = now_iso()

    def is_running(self, inst):
        return inst.exit_code is None and inst.handle["thread"].is_alive()

    def stop(self, inst, timeout_s=20.0):
        h = inst.handle
        with h["lock"]:
            h["stop"].set()
            srv = h["srv"]
        if srv is not None and inst.exit_code is None:
            srv.shutdown()
            srv.server_close()
        h["thread"].join(timeout_s)
        if inst.exit_code is None:
            inst.exit_code = 0
        inst.stopped_at = inst.stopped_at or now_iso()
        self._untrack(inst)


#: --engine process: run tests/fakes/fake_openai_server.py as its own process, with the same listen backlog
PROCESS_BOOT = ("import runpy, socketserver, sys; socketserver.TCPServer.request_queue_size = %d; "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" % BACKLOG)


def engine_yaml(name: str, mode: str) -> str:
    methods = ("  full: {baseline: true}\n" + "".join(f"  m{i}: {{args: [\"--reply\", \"r{i}\"]}}\n" for i in range(60))
               if mode == "server" else
               "  full: {request: {kv_press: {method: full}}, baseline: true}\n"
               + "".join(f"  press{i}: {{request: {{kv_press: {{method: press{i}}}}}, supports: [compression_ratio]}}\n"
                         for i in range(4)))
    cmd = json.dumps(["python", "-u", "-c", PROCESS_BOOT, str(FAKE_SERVER)])
    return (f"name: {name}\nimage: kvt-bench\ntag: latest\ncommand: {cmd}\n"
            "args: [--host, '{host}', --port, '{port}', --model, '{served_model}']\n"
            "health: {path: /health, readiness_timeout_s: 60, interval_s: 0.05}\n"
            "metrics: {path: /metrics, kv_usage: []}\nconcurrency: 64\ngpu: false\n"
            f"method_mode: {mode}\nmethods:\n{methods}")


def setup(root: Path, n_req: int, telemetry_s: float) -> tuple:
    from kv_transition.config import resolve_paths
    from kv_transition.config.schema import Config
    from kv_transition.db import connect
    from kv_transition.manifest.store import write_db
    from kv_transition.manifest.prepare import record_experiment
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
        "decoding": {"request_timeout_s": 60, "max_retries": 0}, "telemetry": ({"enabled": True, "interval_s": telemetry_s} if telemetry_s > 0 else {"enabled": False}),
        "output": {"runs_root": str(root / "runs"), "data_root": str(root / "data")}})
    paths = resolve_paths(cfg, cwd=root)
    conn = connect(paths.db)
    record_experiment(conn, cfg)
    write_db(conn, make_manifest(paths.dataset_id, n_req), paths.manifest, cfg.experiment.group_id)
    conn.close()
    return cfg, paths


def run_matrix(cfg, root: Path, matrix: dict, n_gpus: int, runtime_factory=None) -> tuple:
    from kv_transition.db import connect, rows
    from kv_transition.matrix import MatrixFile, expand
    from kv_transition.matrix.inventory import Inventory
    from kv_transition.matrix.run import MatrixRunner

    exp = expand(cfg, MatrixFile.model_validate(matrix))
    runner = MatrixRunner(cfg, exp, Inventory(tuple(range(n_gpus)), False), cwd=root,
                          runtime_factory=runtime_factory)
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
    ap.add_argument("--engine", choices=("inproc", "process"), default="inproc",
                    help="inproc: the fake served in a thread of this process (InProcessSimRuntime); "
                         "process: the fake as its own OS process through the real ProcessRuntime")
    ap.add_argument("--telemetry-interval", type=float, default=0.25,
                    help="telemetry sampler interval, s (the config default 0.25; 0 = telemetry off)")
    args = ap.parse_args()
    out: dict = {"engine": args.engine, "startup_s": args.startup, "request_s": args.request,
                 "requests_per_cell": args.requests, "gpus": args.gpus, "telemetry_interval_s": args.telemetry_interval}
    rf = (lambda name: InProcessSimRuntime()) if args.engine == "inproc" else None
    env = {"FAKE_STARTUP_DELAY": str(args.startup), "FAKE_TTFT": str(args.request)}
    work = args.startup + args.request  # nominal cell work on its GPU set: load + one concurrent batch
    with tempfile.TemporaryDirectory(prefix="kvt-bench-") as tmp:
        root = Path(tmp)
        cfg, _ = setup(root, args.requests, args.telemetry_interval)
        # 1a. 24 cells, TP 1
        m = {"name": "b24", "engines": {"simsrv": {"env": env, "methods": ["full"] + [f"m{i}" for i in range(23)]}}}
        s, wall, cells, _, exp = run_matrix(cfg, root, m, args.gpus, rf)
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
        s, wall, cells, _, exp = run_matrix(cfg, root, m2, args.gpus, rf)
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
        s, wall, cells, loads, exp = run_matrix(cfg, root, m3, args.gpus, rf)
        out["kvpress_sweep_4x4"] = {"cells": len(cells), "engine_groups": len(exp.groups), "engine_loads": len(loads),
                                    "gpu_sets": sorted({c["gpus_json"] for c in cells}), "wall_s": round(wall, 2),
                                    "one_engine_per_cell_s": round(16 * work, 2)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
