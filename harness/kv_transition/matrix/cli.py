"""`kvt matrix plan|prepare|run` and `kvt lock` (registered by kv_transition.cli)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from kv_transition.errors import KvtError


def _lock_path(args: argparse.Namespace) -> Optional[Path]:
    from kv_transition.matrix.lock import default_lock_path

    if getattr(args, "lock", None):
        p = Path(args.lock)
        if not p.is_file():
            raise KvtError(f"--lock {p}: lock file not found (run `kvt lock -m {args.matrix}`)")
        return p
    p = default_lock_path(args.matrix)
    return p if p.is_file() else None


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Optional[Path], Optional[dict[str, Any]]]:
    from kv_transition.config import load_config
    from kv_transition.matrix import expand, load_matrix
    from kv_transition.matrix.lock import read_lock

    cfg = load_config(args.config, args.override)
    matrix = load_matrix(args.matrix)
    lp = _lock_path(args)
    lock = read_lock(lp)
    exp = expand(cfg, matrix, lock)
    check_model_paths(exp, args)
    return cfg, matrix, exp, lp, lock


def check_model_paths(exp: Any, args: argparse.Namespace) -> None:
    """Every cell's local model path exists (before any manifest, row or engine)."""
    from kv_transition.config.checks import check_model_path

    in_matrix = {m.id for m in exp.matrix.models if m.path}
    seen: set[tuple[str, str]] = set()
    for c in exp.cells:
        key = (c.cfg.model.path or "", c.runtime)
        if key in seen:
            continue
        seen.add(key)
        rcfg = c.cfg.model_copy(update={"engine": c.cfg.engine.model_copy(update={"runtime": c.runtime})})
        if c.model in in_matrix:
            check_model_path(rcfg, f"{exp.matrix.source}: models[{c.model}]")
        else:
            check_model_path(rcfg, args.config, args.override)


def _inventory(args: argparse.Namespace, cfg: Any = None) -> Any:
    """--gpus > --slots > the config's matrix.gpus > NVML > one CPU slot."""
    from kv_transition.matrix.inventory import inventory

    gpus = args.gpus or (None if args.slots else (cfg.matrix.gpus if cfg is not None else None))
    return inventory(gpus=gpus, slots=args.slots)


def _hardware(args: argparse.Namespace, cfg: Any, exp: Any, inv: Any) -> Any:
    """Refuse (exit 2, one line) a method the GPUs cannot run; → the GpuArch checked (None = unknown)."""
    from kv_transition.matrix.hardware import gpu_arch, refuse_unrunnable

    arch = gpu_arch(getattr(args, "gpu_arch", None), cfg, inv)
    refuse_unrunnable(exp, arch)
    return arch


def group_specs(cfg: Any, exp: Any, inv: Any, n_requests: Optional[dict[str, int]] = None
                ) -> list[tuple[Any, Any, tuple[int, ...], int, float]]:
    """Every engine group with the spec it would start (planned GPUs and port): (group, spec, gpus, port,
    planned start). GPU engines on a CPU-slot inventory are refused (exit 2)."""
    from kv_transition.cell import resolve_cell_spec
    from kv_transition.matrix.group import group_cfg, port_for
    from kv_transition.matrix.inventory import require_gpu_inventory
    from kv_transition.matrix.run import jobs_for
    from kv_transition.matrix.schedule import simulate

    require_gpu_inventory(exp, inv)
    placements = {p.key: p for p in simulate(jobs_for(exp, n_requests), inv.devices)}
    base = exp.matrix.base_port or cfg.engine.port
    out = []
    for g in exp.groups:
        p = placements[g.group_id]
        port = port_for(base, inv, p.gpus)
        c0 = g.cells[0]
        spec, _, _ = resolve_cell_spec(group_cfg(c0, port, p.gpus, inv), engine=c0.engine, method=c0.method,
                                       compression_ratio=c0.compression_ratio, budget=c0.budget,
                                       tensor_parallel=g.tp, digest=c0.digest)
        out.append((g, spec, p.gpus, port, p.start))
    return out


def plan_dict(cfg: Any, exp: Any, inv: Any, lock_path: Optional[Path], n_requests: Optional[dict[str, int]] = None
              ) -> dict[str, Any]:
    """Every group with its planned GPUs/port and exact container spec, every cell. Starts nothing."""
    from kv_transition.matrix.run import jobs_for
    from kv_transition.matrix.schedule import makespan, simulate

    placements = {p.key: p for p in simulate(jobs_for(exp, n_requests), inv.devices)}
    groups = []
    for g, spec, gpus, port, start in group_specs(cfg, exp, inv, n_requests):
        c0 = g.cells[0]
        groups.append({
            "group_id": g.group_id, "engine": g.engine, "model": g.model, "runtime": g.runtime, "tp": g.tp,
            "shared_engine": g.shared,
            # cells at the same time, example-major (the engine can prefill each prompt once for all of them)
            "interleaved": g.shared and exp.matrix.interleave and len(g.cells) > 1,
            inv.kind + "s": list(gpus), "port": port, "planned_start": start,
            "image_ref": spec.image_ref, "image_lock": c0.image_lock, "command": spec.command, "args": spec.args,
            "env": spec.masked_env(), "docker_run": spec.docker_run() if g.runtime == "docker" else None,
            "mounts": [{"source": m.source, "target": m.target, "read_only": m.read_only, "kind": m.kind}
                       for m in spec.mounts],
            "attention_backend": spec.attention_backend,
            "cells": [{"cell_id": c.cell_id, "method": c.method, "compression_ratio": c.compression_ratio,
                       "budget": c.budget, "baseline": c.baseline,
                       "request_extras": c.spec.request_extras if g.shared else None} for c in g.cells],
        })
    return {"matrix": exp.matrix.name, "group_id": cfg.experiment.group_id, "lock": str(lock_path) if lock_path else None,
            "inventory": {"kind": inv.kind, "devices": list(inv.devices)}, "n_cells": len(exp.cells),
            "n_excluded": exp.excluded, "n_groups": len(groups),
            "engine_loads": len(groups), "planned_makespan_units": makespan(list(placements.values())),
            "groups": groups}


def cmd_plan_ray(args: argparse.Namespace, cfg: Any, exp: Any, lp: Optional[Path]) -> int:
    """`kvt matrix plan --backend ray`: the resources each group's actor asks Ray for. Starts nothing."""
    from kv_transition.matrix.ray_backend import plan_ray

    groups = plan_ray(exp, args.ray_slot_resource)
    plan = {"matrix": exp.matrix.name, "group_id": cfg.experiment.group_id, "backend": "ray",
            "ray_address": args.ray_address or "auto", "lock": str(lp) if lp else None, "n_cells": len(exp.cells),
            "n_excluded": exp.excluded, "n_groups": len(groups), "groups": groups}
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    from rich.table import Table

    from kv_transition.ui import console

    console.print(f"matrix [bold]{plan['matrix']}[/] on Ray ({plan['ray_address']}): {plan['n_cells']} cells "
                  f"({plan['n_excluded']} excluded) in {plan['n_groups']} engine groups, one actor each, submitted in "
                  "this order · nothing started")
    t = Table(show_lines=False)
    for col in ("#", "group", "runtime", "tp", "Ray asked for", "cells"):
        t.add_column(col)
    for g in groups:
        t.add_row(str(g["submit_order"] + 1), g["group_id"], g["runtime"], str(g["tp"]), g["ray_request_label"],
                  ", ".join(c["method"] + (f" r={c['compression_ratio']:g}" if c["compression_ratio"] is not None
                                           else f" b={c['budget']}" if c["budget"] is not None else "")
                            for c in g["cells"]))
    console.print(t)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg, matrix, exp, lp, _ = _setup(args)
    if getattr(args, "backend", "local") == "ray":
        return cmd_plan_ray(args, cfg, exp, lp)
    inv = _inventory(args, cfg)
    arch = _hardware(args, cfg, exp, inv)
    plan = plan_dict(cfg, exp, inv, lp)
    plan["gpu_arch"] = {"compute_capability": arch.label, "source": arch.source} if arch else None
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    from rich.table import Table

    from kv_transition.ui import console

    kind = inv.kind
    console.print(f"matrix [bold]{plan['matrix']}[/] on {kind}s {','.join(map(str, inv.devices))}: "
                  f"{plan['n_cells']} cells ({plan['n_excluded']} excluded) in {plan['n_groups']} engine groups"
                  f" · lock: {plan['lock'] or 'none (tags unpinned; `kvt lock`)'} · nothing started")
    from kv_transition.matrix.hardware import describe

    console.print(f"hardware: {describe(arch)}", highlight=False, markup=False)
    t = Table(show_lines=False)
    for col in (kind + "s", "port", "group", "runtime", "tp", "cell", "method", "knob", "cell id"):
        t.add_column(col)
    for g in plan["groups"]:
        for i, c in enumerate(g["cells"]):
            knob = (f"r={c['compression_ratio']:g}" if c["compression_ratio"] is not None
                    else f"b={c['budget']}" if c["budget"] is not None else "")
            t.add_row(",".join(map(str, g[kind + "s"])) if i == 0 else "", str(g["port"]) if i == 0 else "",
                      g["group_id"] if i == 0 else "", g["runtime"] if i == 0 else "", str(g["tp"]) if i == 0 else "",
                      str(i + 1), c["method"] + (" [dim](baseline)[/]" if c["baseline"] else ""), knob, c["cell_id"])
    console.print(t)
    for g in plan["groups"]:
        console.print(f"[bold]{g['group_id']}[/] ({g['image_ref']}" + (f", lock {g['image_lock']}" if g["image_lock"] else "")
                      + ")")
        line = g["docker_run"] or " ".join(g["command"] + g["args"])
        console.print(f"  {line}", soft_wrap=True, highlight=False, markup=False)
        for m in g["mounts"]:
            console.print(f"  mount ({m['kind']}): {m['source']} → {m['target']} ({'ro' if m['read_only'] else 'rw'})",
                          highlight=False, markup=False)
        if g["interleaved"]:
            console.print(f"  {len(g['cells'])} cells interleaved: every example's requests go out together "
                          f"(window {exp.matrix.interleave_window}); the engine prefills each prompt once for them",
                          highlight=False, markup=False)
        if g["attention_backend"]:
            console.print(f"  attention backend pinned: {g['attention_backend']}", highlight=False, markup=False)
        if g["env"] and not g["docker_run"]:
            console.print("  env: " + " ".join(f"{k}={v}" for k, v in sorted(g["env"].items())), highlight=False, markup=False)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg, matrix, exp, lp, lock = _setup(args)
    from kv_transition.matrix.inventory import Inventory
    from kv_transition.matrix.run import MatrixRunner
    from kv_transition.ui import console

    runner = MatrixRunner(cfg, exp, Inventory((0,), False), lock=lock, log=lambda s: console.print(s, markup=False))
    done = runner.prepare()
    console.print(f"manifests ready ({len(done)} prepared now) in {runner.paths.db}")
    return 0


def preflight_stage(cfg: Any, exp: Any, inv: Any, *, pull: bool, console: Any, as_json: bool = False,
                    min_gpu_free: float = 0.5, min_disk_gib: float = 1.0) -> Any:
    """Run every preflight check (matrix groups, or the config's one cell when exp is None), show the
    table, raise PreflightError (exit 2) on any failure."""
    from kv_transition.config import resolve_paths
    from kv_transition.preflight import render, run_preflight, targets_for_config, targets_for_matrix

    targets = targets_for_matrix(cfg, exp, inv) if exp is not None else targets_for_config(cfg)
    paths = resolve_paths(cfg)
    rep = run_preflight(targets, logs_dir=paths.logs_dir, group=cfg.experiment.group_id, pull=pull,
                        min_gpu_free=min_gpu_free, min_disk_gib=min_disk_gib)
    if as_json:
        print(json.dumps({"ok": rep.ok, "checks": [c.as_dict() for c in rep.checks]}, indent=2))
    else:
        render(rep, console)
    if not rep.ok:
        raise rep.error()
    return rep


def cmd_preflight(args: argparse.Namespace) -> int:
    from kv_transition.ui import console

    if args.matrix:
        cfg, matrix, exp, lp, lock = _setup(args)
        inv = _inventory(args, cfg)
    else:
        from kv_transition.config import load_config

        cfg, exp, inv = load_config(args.config, args.override), None, None
        if args.gpus:
            cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(
                update={"gpus": [int(x) for x in args.gpus.split(",")]})})
    preflight_stage(cfg, exp, inv, pull=args.pull, console=console, as_json=args.json,
                    min_gpu_free=args.min_gpu_free, min_disk_gib=args.min_disk_gib)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg, matrix, exp, lp, lock = _setup(args)
    from kv_transition.matrix.run import MatrixRunner
    from kv_transition.ui import console

    ray = getattr(args, "backend", "local") == "ray"
    if ray:
        from kv_transition.matrix.inventory import Inventory

        inv = Inventory((0,), False)  # the cluster's GPUs are Ray's to hand out
        _hardware(args, cfg, exp, inv)
    else:
        inv = _inventory(args, cfg)
        _hardware(args, cfg, exp, inv)
    if ray:
        print("preflight: not run for --backend ray (it checks this host; run `kvt preflight -m …` on a node)",
              file=sys.stderr)
    elif not getattr(args, "no_preflight", False):  # before any manifest, engine or DB row
        from kv_transition.ui import err_console

        preflight_stage(cfg, exp, inv, pull=True, console=err_console if args.json else console)
    live = console.is_terminal and not args.no_live and not ray
    err = (lambda s: None) if live else (lambda s: print(s, file=sys.stderr, flush=True))
    common = dict(lock=lock, console=console, log=err, matrix_path=str(args.matrix),
                  matrix_sha256=hashlib.sha256(Path(args.matrix).read_bytes()).hexdigest())
    if ray:
        from kv_transition.matrix.ray_backend import RayMatrixRunner

        runner: Any = RayMatrixRunner(cfg, exp, address=args.ray_address, max_retries=args.ray_max_retries,
                                      sync_s=args.ray_sync_s, slot_resource=args.ray_slot_resource, **common)
        runner.connect()  # no cluster, or a request no node can hold: exit 2 before any manifest or row
    else:
        runner = MatrixRunner(cfg, exp, inv, live=live, **common)
    runner.prepare()
    runner.cleanup_stale()
    summary = runner.run()
    rows = [{"cell_id": o.cell.cell_id, "model": o.cell.model, "cell": o.cell.label, "gpus": list(o.gpus),
             "status": o.status, "requests": f"{o.n_ok}/{o.n_requests}", "reason": o.reason} for o in summary.outcomes]
    if args.json:
        print(json.dumps({"matrix_run_id": summary.matrix_run_id, "status": summary.status, "wall_s": summary.wall_s,
                          "counts": summary.counts(), "engine_loads": summary.engine_loads, "cells": rows}, indent=2))
    else:
        from rich.table import Table

        t = Table(title=f"matrix {matrix.name}: {summary.status} in {summary.wall_s:.1f} s · "
                        + " · ".join(f"{k} {v}" for k, v in sorted(summary.counts().items())))
        for col in ("cell", "model", inv.kind + "s", "status", "requests", "reason"):
            t.add_column(col)
        for r in rows:
            colour = {"completed": "green", "incomplete": "yellow"}.get(r["status"], "red")
            t.add_row(r["cell"], r["model"], ",".join(map(str, r["gpus"])), f"[{colour}]{r['status']}[/]",
                      r["requests"], (r["reason"] or "").splitlines()[0][:100] if r["reason"] else "")
        console.print(t)
    return 0 if summary.ok else 1


def cmd_lock(args: argparse.Namespace) -> int:
    from kv_transition.matrix.lock import default_lock_path, make_lock, write_lock

    lock = make_lock(args.matrix, registry=not args.no_registry)
    out = write_lock(lock, args.output or default_lock_path(args.matrix))
    for ref, e in lock["images"].items():
        print(f"{ref} -> {e['digest']} ({e['source']})")
    print(f"wrote {out}")
    return 0


def add_parsers(sub: Any, config_args: Callable[[argparse.ArgumentParser], None], parser_class: Any) -> None:
    m = sub.add_parser("matrix", help="the engine × method × budget matrix (plan, prepare, run)")
    msub = m.add_subparsers(dest="matrix_command", metavar="SUBCOMMAND", parser_class=parser_class)
    msub.required = True

    def common(sp: argparse.ArgumentParser, sched: bool = True) -> None:
        config_args(sp)
        sp.add_argument("-m", "--matrix", required=True, help="matrix file (config/matrix/*.yaml)")
        sp.add_argument("--lock", help="lock file (default: <matrix>.lock.yaml next to the matrix, when present)")
        if sched:
            sp.add_argument("--gpus", help="GPU indices to use, e.g. 0,1,2,3 (default: every GPU NVML sees)")
            sp.add_argument("--slots", type=int, help="no GPUs: N simulated slots (CPU engines in parallel)")
            sp.add_argument("--gpu-arch", help="compute capability to check methods' hardware against, e.g. 9.0 "
                                               "(H100/H200) or 10.0 (B200); default: matrix.gpu_arch, else NVML")
        sp.add_argument("--json", action="store_true", help="JSON output")
        if sched:
            sp.add_argument("--backend", choices=["local", "ray"], default="local",
                            help="local: this host's GPUs/slots (default); ray: a Ray cluster, one actor per engine group")
            sp.add_argument("--ray-address", metavar="ADDR",
                            help="Ray cluster to use with --backend ray: auto (default: $RAY_ADDRESS or the local head), "
                                 "HOST:PORT, or ray://HOST:PORT (Ray Client)")
            sp.add_argument("--ray-slot-resource", metavar="NAME",
                            help="CPU engines ask Ray for one unit of this custom resource (e.g. kvt_slot) instead of one CPU")

    sp = msub.add_parser("plan", help="dry run: every cell with its GPUs, engine group and exact container spec")
    common(sp)
    sp.set_defaults(func=cmd_plan)
    sp = msub.add_parser("prepare", help="build every model's manifest the matrix needs (once)")
    common(sp, sched=False)
    sp.set_defaults(func=cmd_prepare)
    sp = msub.add_parser("run", help="run the matrix: packed onto the GPUs/slots, resumable, continue on error")
    common(sp)
    sp.add_argument("--no-live", action="store_true", help="log lines instead of the live view")
    sp.add_argument("--no-preflight", action="store_true", help="skip `kvt preflight` (run first by default)")
    sp.add_argument("--ray-max-retries", type=int, default=2, metavar="N",
                    help="--backend ray: a group whose node died is placed again at most N times (default 2)")
    sp.add_argument("--ray-sync-s", type=float, default=5.0, metavar="S",
                    help="--backend ray: pull each running group's rows into the DB every S seconds (default 5)")
    sp.set_defaults(func=cmd_run)

    pf = sub.add_parser("preflight", help="check every engine argv with the engine's own parser, images, mounts, "
                        "ports, GPUs and disk before anything starts (exit 2 on a failure)")
    config_args(pf)
    pf.add_argument("-m", "--matrix", help="matrix file (default: the config's one cell, kv.method)")
    pf.add_argument("--lock", help="lock file (default: <matrix>.lock.yaml next to the matrix, when present)")
    pf.add_argument("--gpus", help="GPU indices the run would use, e.g. 0,1 (default: every GPU NVML sees)")
    pf.add_argument("--slots", type=int, help="no GPUs: N simulated slots (CPU engines only)")
    pf.add_argument("--pull", action="store_true", help="pull/build missing images now (else: only check)")
    pf.add_argument("--min-gpu-free", type=float, default=0.5, metavar="FRACTION",
                    help="free memory each planned GPU needs, as a fraction of its total (default 0.5)")
    pf.add_argument("--min-disk-gib", type=float, default=1.0, help="free disk for logs (default 1 GiB)")
    pf.add_argument("--json", action="store_true", help="JSON output")
    pf.set_defaults(func=cmd_preflight)

    lk = sub.add_parser("lock", help="resolve every image tag of a matrix to its digest into a lock file")
    lk.add_argument("-m", "--matrix", required=True)
    lk.add_argument("-o", "--output", help="lock file (default config/matrix/<name>.lock.yaml next to the matrix)")
    lk.add_argument("--no-registry", action="store_true", help="skip the registry; local images only")
    lk.set_defaults(func=cmd_lock)
