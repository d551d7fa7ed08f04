"""The thin CLI: `kvt …` and `python -m kv_transition …`. Parses, calls a stage, renders.

Exit codes: 0 ok · 1 a run/cell failed · 2 bad input (config, arguments, data) · 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kv_transition import __version__
from kv_transition.errors import KvtError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"kvt: error: {message}\n")
        sys.exit(2)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="config YAML (experiments may `extends:` a base)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one key (repeatable); VALUE is parsed as a YAML scalar")


def _load(args: argparse.Namespace, check_db: bool = True) -> tuple[Any, Any]:
    """The config and its paths; with `check_db`, an existing DB that is damaged, foreign or empty is
    refused here, before the command writes anything (a manifest, a log, a row)."""
    from kv_transition.config import load_config, resolve_paths
    from kv_transition.db.core import check_file
    from kv_transition.errors import ConfigError

    cfg = load_config(args.config, args.override)
    try:
        paths = resolve_paths(cfg)
    except ConfigError as e:  # e.g. db.path outside runs_root: name the file (or the -o it came from)
        msg = str(e)
        key = msg.split(":", 1)[0]
        blame = next((f"-o {o}" for o in reversed(args.override) if o.split("=", 1)[0].strip() == key), args.config)
        raise ConfigError(f"{blame}: {msg}") from None
    if check_db and paths.db.exists():
        check_file(paths.db)
        from kv_transition.db import connect

        connect(paths.db, readonly=True).close()  # reads the schema: a damaged file fails here, not halfway
    return cfg, paths


_KNOB_FLAGS = (("engine", "--engine"), ("method", "--method"), ("ratio", "--ratio"), ("budget", "--budget"),
               ("runtime", "--runtime"), ("base_url", "--base-url"))


def check_inputs(args: argparse.Namespace, cfg: Any, for_run: bool = False) -> Any:
    """Everything a run would refuse, refused now (before any engine starts or any row is written):
    the cell's engine/method/ratio/budget resolve (the CLI's flags through the same rules as the
    config's kv section) and a local model path exists. → the resolved spec."""
    from kv_transition.cell import resolve_cell_spec
    from kv_transition.config.checks import check_model_path
    from kv_transition.errors import ConfigError

    flags = [f"{flag} {getattr(args, attr)}" for attr, flag in _KNOB_FLAGS if getattr(args, attr, None) is not None]
    rt_cfg = cfg if getattr(args, "runtime", None) is None else cfg.model_copy(
        update={"engine": cfg.engine.model_copy(update={"runtime": args.runtime})})
    check_model_path(rt_cfg, args.config, args.override)  # before the spec (which mounts the model)
    try:
        spec, _, _ = resolve_cell_spec(cfg, engine=getattr(args, "engine", None), method=getattr(args, "method", None),
                                       compression_ratio=getattr(args, "ratio", None),
                                       budget=getattr(args, "budget", None), runtime=getattr(args, "runtime", None),
                                       base_url=getattr(args, "base_url", None))
    except ConfigError as e:
        msg = str(e)
        if not for_run and msg.startswith("engine.base_url: runtime 'external' needs"):
            return None  # `kvt run --base-url URL` may still give it
        if not msg.startswith(("kv.", "engine.", "model.", "set at most")):
            raise  # already names its file (an engine.yaml)
        if flags:
            msg = (msg.replace("set kv.compression_ratio or kv.budget", "add --ratio R or --budget N")
                   .replace("set kv.compression_ratio)", "add --ratio R)").replace("set kv.budget)", "add --budget N)")
                   .replace("kv.compression_ratio: ", "--ratio: ").replace("kv.budget: ", "--budget: "))
            raise ConfigError(f"{' '.join(flags)}: {msg}") from None
        blame = next((f"-o {o}" for o in reversed(args.override) if o.split("=", 1)[0].strip().startswith(("kv.", "engine."))),
                     args.config)
        raise ConfigError(f"{blame}: {msg}") from None
    return spec


def cmd_validate(args: argparse.Namespace) -> int:
    cfg, paths = _load(args)
    check_inputs(args, cfg)
    from kv_transition.ui import console

    console.print(f"[green]ok[/green] {args.config}: experiment {cfg.experiment.group_id!r}, "
                  f"dataset {cfg.dataset.source}, engine {cfg.engine.name}/{cfg.engine.runtime}, method {cfg.kv.method}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    cfg, paths = _load(args, check_db=False)
    out: dict[str, Any] = {"run_dir": str(paths.run_dir), "db": str(paths.db), "dataset_id": paths.dataset_id,
                           "manifest": str(paths.manifest)}
    if args.print_config:
        from kv_transition.config.secrets import masked_config

        out["config"] = masked_config(cfg)
    if args.json or args.print_config:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg, paths = _load(args)
    check_inputs(args, cfg)
    from kv_transition.manifest.prepare import prepare
    from kv_transition.ui import bins_table, console, stage_progress

    with stage_progress(not args.quiet) as cb:
        res = prepare(cfg, paths, cb)
    console.print(bins_table(res.manifest))
    console.print(f"manifest: {paths.manifest}\ndatabase: {paths.db}")
    return 0


def cmd_manifest_verify(args: argparse.Namespace) -> int:
    cfg, paths = _load(args)
    from kv_transition.db import connect
    from kv_transition.errors import ManifestError
    from kv_transition.manifest.store import verify
    from kv_transition.ui import console

    path = Path(args.manifest) if args.manifest else paths.manifest
    if not paths.db.is_file():
        raise ManifestError(f"{paths.db}: database not found (run `kvt prepare` first)")
    conn = connect(paths.db, readonly=True)
    try:
        s = verify(path, conn)
    finally:
        conn.close()
    console.print(f"[green]ok[/green] {path} matches {paths.db}: {s['entries']} entries, "
                  f"{s['examples']} examples, {s['content_hash']}")
    return 0


def cmd_datasets_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from kv_transition.datasets import list_tasks
    from kv_transition.ui import console

    rows = list_tasks()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(title="datasets")
    cols = list(rows[0].keys()) if rows else []
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(r[c]) for c in cols])
    console.print(t)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Every engine's KV methods with their catalog properties (engines/<name>/engine.yaml)."""
    from kv_transition.engines.spec import list_engines, load_engine

    names = [args.engine] if args.engine else list_engines()
    rows = []
    for name in names:
        eng = load_engine(name)
        for method, m in eng.methods.items():
            p = m.properties
            rows.append({
                "engine": name, "method": method, "supports": m.supports, "baseline": m.baseline,
                "attention": p.get("attention"), "query_aware": p.get("query_aware"), "phase": p.get("phase"),
                "memory": p.get("memory"), "takes": p.get("takes"),
                "needs": p.get("artifact") and (p.get("required") or ["artifact"]) or p.get("needs"),
                "leaderboard": p.get("leaderboard"), "recipe": p.get("recipe"), "description": m.description,
                "properties": p,
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    from kv_transition.ui import console

    yes = {True: "yes", False: "no", None: ""}
    for name in names:
        t = Table(title=f"{name}: KV methods (engines/{name}/engine.yaml)")
        for c in ("method", "knobs", "attn", "query", "phase", "memory", "notes"):
            t.add_column(c, overflow="fold", no_wrap=c != "notes")
        for r in (r for r in rows if r["engine"] == name):
            memory = {"masks": "masked, not freed", "zeroes": "zeroed, not freed"}.get(r["memory"], r["memory"] or "")
            needs = r["needs"]
            notes = [r["description"]]
            if r["takes"]:
                notes.append(f"takes {r['takes']}")
            if needs:
                notes.append(f"needs {','.join(needs) if isinstance(needs, list) else needs}")
            if r["leaderboard"]:
                notes.append(f"leaderboard: {r['leaderboard']}")
            knobs = {"compression_ratio": "r", "budget": "b"}
            t.add_row(r["method"] + (" *" if r["baseline"] else ""), "/".join(knobs.get(k, k) for k in r["supports"]) or "-",
                      {"no_eager": "!eager"}.get(r["attention"], r["attention"] or ""), yes.get(r["query_aware"], ""),
                      r["phase"] or "", memory, "; ".join(notes))
        console.print(t)
    console.print("knobs: r = compression_ratio, b = budget; * = the full-cache baseline; query = query-aware scores")
    return 0


def _require_db(paths: Any) -> None:
    from kv_transition.errors import KvtError

    if not paths.db.is_file():
        raise KvtError(f"{paths.db}: no database for this experiment group (run `kvt prepare` / `kvt run` first)")


def _require_rows(paths: Any, sql: str, nothing: str) -> None:
    """Exit 2 with one line when the stage has nothing to work on (instead of an empty result)."""
    from kv_transition.db import connect
    from kv_transition.errors import KvtError

    _require_db(paths)
    conn = connect(paths.db, readonly=True)
    try:
        n = int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()
    if n == 0:
        raise KvtError(f"{paths.db}: {nothing}")


def score_stage(paths: Any, *, force: bool = False, quiet: bool = False) -> Any:
    from kv_transition.db import connect
    from kv_transition.score.store import score_db
    from kv_transition.ui import stage_progress

    conn = connect(paths.db)
    try:
        with stage_progress(not quiet) as cb:
            return score_db(conn, force=force, progress=cb)
    finally:
        conn.close()


def analyze_stage(cfg: Any, paths: Any) -> Any:
    from kv_transition.analysis.compute import analyze
    from kv_transition.db import connect
    from kv_transition.score.store import scorer_version

    conn = connect(paths.db)
    try:
        return analyze(conn, threshold=cfg.analysis.threshold, n_boot=cfg.analysis.bootstrap, seed=cfg.analysis.seed,
                       scorer_version=scorer_version())
    finally:
        conn.close()


def report_stage(paths: Any) -> Any:
    from kv_transition.db import connect
    from kv_transition.report.build import summary_table, write_report
    from kv_transition.report.data import load_report_data
    from kv_transition.ui import console

    conn = connect(paths.db)
    try:
        data = load_report_data(conn, db_path=str(paths.db))
    finally:
        conn.close()
    files = write_report(data, paths.report_dir)
    if not data.cells:
        console.print("[yellow]no analysed cells in this DB: the report is empty (run `kvt score` and "
                      "`kvt analyze` first)[/yellow]")
    console.print(summary_table(data))
    console.print(f"report: {files.html}\n        {files.markdown}")
    return files


def cmd_score(args: argparse.Namespace) -> int:
    """Score every recorded response (official LongBench metrics / exact synthetic metrics)."""
    cfg, paths = _load(args)
    _require_rows(paths, "SELECT COUNT(*) FROM responses",
                  "nothing to score: no recorded responses (run `kvt run` or `kvt matrix run` first)")
    from kv_transition.ui import console

    rep = score_stage(paths, force=args.force, quiet=args.quiet)
    console.print(f"scored {rep.scored} response(s), {rep.skipped} already scored by {rep.version}"
                  + (f"; {rep.flagged} flagged (see scores.flags_json)" if rep.flagged else "")
                  + (f"; {rep.empty} empty LongBench v2 response(s) left out of accuracy, as its pred.py drops them"
                     if rep.empty else ""))
    _print_v2_accuracy(paths, console)
    return 0


def _print_v2_accuracy(paths: Any, console: Any) -> None:
    """LongBench v2: accuracy per cell overall / difficulty / length split / domain / sub-domain."""
    from rich.table import Table

    from kv_transition.db import connect
    from kv_transition.score.longbench_v2 import load_accuracy_table

    conn = connect(paths.db, readonly=True)
    try:
        rows = [r for r in load_accuracy_table(conn) if r["bin_id"] is None]
    finally:
        conn.close()
    if not rows:
        return
    t = Table(title="LongBench v2 accuracy (%) over all bins")
    for col in ("cell", "dimension", "value", "n", "accuracy"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["cell_id"], r["dimension"], r["value"], str(r["n"]), f"{r['accuracy']:.1f}")
    console.print(t)


def cmd_analyze(args: argparse.Namespace) -> int:
    cfg, paths = _load(args)
    _require_rows(paths, "SELECT COUNT(*) FROM scores",
                  "nothing to analyze: no scored responses (run `kvt score` first)")
    from kv_transition.ui import console

    res = analyze_stage(cfg, paths)
    for t in res.transitions:
        console.print(f"{t['cell_id']}: {t['label']}  ({t['reason']})")
    console.print(f"analyzed {len(res.bins)} cell x bin rows, {len(res.transitions)} transitions -> {paths.db}")
    return 0


def _group_db(paths: Any, ref: str) -> Path:
    """A --compare operand: a .sqlite file, or a group id under output.runs_root."""
    from kv_transition.errors import KvtError

    p = Path(ref)
    if p.suffix in (".sqlite", ".db", ".sqlite3"):
        if not p.is_file():
            raise KvtError(f"--compare {ref}: no such database file")
        return p
    db = paths.runs_root / ref / "kv_transition.sqlite"
    if not db.is_file():
        raise KvtError(f"--compare {ref}: no database for group {ref!r} at {db} "
                       "(give a group id under output.runs_root or a .sqlite path)")
    return db


def compare_stage(paths: Any, refs: Sequence[str], out: Optional[str]) -> Path:
    import re

    from kv_transition.db import connect
    from kv_transition.errors import KvtError
    from kv_transition.report.compare import write_compare
    from kv_transition.report.data import load_report_data
    from kv_transition.ui import console

    datas = []
    for ref in refs:
        db = _group_db(paths, ref)
        conn = connect(db)
        try:
            d = load_report_data(conn, db_path=str(db))
        finally:
            conn.close()
        if not d.cells:
            raise KvtError(f"--compare {ref}: {db} has no analysis (run `kvt score` and `kvt analyze` on it first)")
        datas.append(d)
    safe = [re.sub(r"[^A-Za-z0-9_.-]+", "_", d.group_id or Path(r).stem) for d, r in zip(datas, refs)]
    target = Path(out) if out else paths.runs_root / "compare" / f"{safe[0]}-vs-{safe[1]}"
    page, cmp = write_compare(datas[0], datas[1], target)
    console.print(f"compared {len(cmp.pairs)} matched cell(s) ({len(cmp.only_a)} only in {datas[0].group_id}, "
                  f"{len(cmp.only_b)} only in {datas[1].group_id})\nreport: {page}")
    return page


def cmd_report(args: argparse.Namespace) -> int:
    cfg, paths = _load(args)
    if args.compare:
        compare_stage(paths, args.compare, args.out)
        return 0
    _require_rows(paths, "SELECT COUNT(*) FROM responses",
                  "nothing to report: no recorded responses (run `kvt run` / `kvt matrix run`, then `kvt score`)")
    if args.out:
        paths = dataclasses.replace(paths, report_dir=Path(args.out).resolve())
    report_stage(paths)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: prepare → the config's matrix (matrix.file; the default is
    full + 3 eviction presses on ONE kvpress engine, a local CPU process on the tiny model) → score →
    analyze → report. Re-running resumes: completed cells and requests are not sent again."""
    cfg, paths = _load(args)
    check_inputs(args, cfg)
    from kv_transition.matrix.cli import cmd_run as matrix_run
    from kv_transition.manifest.prepare import prepare
    from kv_transition.ui import bins_table, console, stage_progress

    if not cfg.matrix.file:
        from kv_transition.errors import ConfigError

        raise ConfigError(f"{args.config}: matrix.file: the demo needs a matrix file (e.g. config/matrix/smoke.yaml)")
    with stage_progress(not args.quiet) as cb:
        res = prepare(cfg, paths, cb)
    console.print(bins_table(res.manifest))
    rc = matrix_run(argparse.Namespace(config=args.config, override=args.override, matrix=cfg.matrix.file, lock=None,
                                       gpus=None, slots=1, json=False, no_live=args.quiet, no_preflight=False))
    score_stage(paths, quiet=args.quiet)
    analyze_stage(cfg, paths)
    report_stage(paths)
    if rc:
        console.print("[red]some cells did not complete[/red]: re-run `make demo` to finish them (it resumes)")
    return rc

def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove leftover engine containers (by label) and engine process groups (pidfile registry)."""
    from kv_transition.runtime.cleanup import cleanup, close_stale_records, group_dbs

    rep = cleanup(group=args.group, runtime=args.runtime, registry_dir=args.registry, dry_run=args.dry_run,
                  force=args.force)
    if getattr(args, "ray_address", None):  # and on every node of a Ray cluster (engines of --backend ray)
        from kv_transition.matrix.ray_backend import cleanup_cluster, connect_ray

        kinds = ["docker", "process"] if args.runtime == "all" else [args.runtime]
        for line in cleanup_cluster(connect_ray(args.ray_address), args.group, kinds, dry_run=args.dry_run,
                                    force=args.force):
            print(f"node {line}")
    if args.config:  # the config's own DB
        cfg, paths = _load(argparse.Namespace(config=args.config, override=args.override))
        dbs = [paths.db] if paths.db.is_file() else []
    else:
        dbs = group_dbs(Path(args.runs_root).resolve(), args.group)
    rep.runs, notes = close_stale_records(dbs, dry_run=args.dry_run)
    rep.skipped.extend(notes)
    for line in rep.skipped:
        sys.stderr.write(f"kvt: note: {line}\n")
    lines = rep.lines()
    for line in lines:
        print(line)
    if not lines:
        print("nothing to clean up" + (f" for group {args.group!r}" if args.group else ""))
    return 0


def _dataset_in_db(paths: Any) -> bool:
    if not paths.db.is_file():
        return False
    from kv_transition.db import connect

    conn = connect(paths.db)
    try:
        return conn.execute("SELECT 1 FROM datasets WHERE dataset_id = ?", (paths.dataset_id,)).fetchone() is not None
    finally:
        conn.close()


def _method_spec(args: argparse.Namespace, cfg: Any) -> tuple[str, Any]:
    """--method '{method: adakv, inner: {method: snapkv}}' (YAML/JSON): the name, and the rest as kv.params
    (so the whole spec is in the request and in the cell id); compression_ratio/budget may sit in it too."""
    import yaml

    from kv_transition.errors import ConfigError

    try:
        spec = yaml.safe_load(args.method)
    except yaml.YAMLError as e:
        raise ConfigError(f"--method: not a YAML/JSON method spec: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        raise ConfigError("--method: a method spec needs method: <name>, e.g. '{method: adakv, inner: {method: snapkv}}'")
    spec = dict(spec)
    name = spec.pop("method")
    for key, attr in (("compression_ratio", "ratio"), ("budget", "budget")):
        if key in spec:
            if getattr(args, attr) is not None:
                raise ConfigError(f"--method: {key} given twice (in the spec and as --{attr})")
            setattr(args, attr, spec.pop(key))
    kv = cfg.kv.model_copy(update={"params": {**(cfg.kv.params or {}), **spec}})
    return name, cfg.model_copy(update={"kv": kv})


def cmd_run(args: argparse.Namespace) -> int:
    """One cell: prepare the manifest if missing, start the engine, send the manifest, tear down.
    Exit 0 when the cell is complete, 1 when it failed or is incomplete (re-run to finish it)."""
    cfg, paths = _load(args)
    spec = check_inputs(args, cfg, for_run=True)  # bad flags / model path: exit 2 before prepare, DB rows or an engine
    from kv_transition.cell import cell_summary, run_cell
    from kv_transition.runtime.gpus import require_gpus
    from kv_transition.ui import console, stage_progress

    if args.method and args.method.lstrip().startswith("{"):
        args.method, cfg = _method_spec(args, cfg)

    if spec is not None:  # GPUs too: a GPU engine with none resolvable is exit 2 before anything is written
        spec = require_gpus(spec, 1, runtime=args.runtime or cfg.engine.runtime)
        if spec.gpus:  # and a method these GPUs cannot run (engine.yaml `requires`), as `kvt matrix run` refuses it
            from kv_transition.matrix.hardware import gpu_arch, refuse_cell
            from kv_transition.matrix.inventory import Inventory

            refuse_cell(args.engine or cfg.engine.name, args.method or cfg.kv.method,
                        gpu_arch(None, cfg, Inventory(tuple(spec.gpus), True)), "kvt run")
    if not _dataset_in_db(paths):
        from kv_transition.manifest.prepare import prepare

        console.print(f"manifest {paths.dataset_id} not in {paths.db}: preparing it first")
        with stage_progress(not args.quiet) as cb:
            prepare(cfg, paths, cb)
    res = run_cell(cfg, paths, engine=args.engine, method=args.method, compression_ratio=args.ratio,
                   budget=args.budget, runtime=args.runtime, base_url=args.base_url, progress=not args.quiet,
                   console=console)
    summary = cell_summary(paths.db, res)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from rich.table import Table

        colour = {"completed": "green", "incomplete": "yellow", "failed": "red"}.get(res.status, "white")
        t = Table(title=f"cell {res.cell_id}: [{colour}]{res.status}[/{colour}]", show_header=False)
        t.add_column("", style="bold")
        t.add_column("")
        for k, v in summary.items():
            if k not in ("cell_id", "status") and v is not None:
                t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        console.print(t)
    return 0 if res.ok else 1


def cmd_db_merge(args: argparse.Namespace) -> int:
    """Merge other databases of the same experiment group into this one (exactly once, nothing overwritten)."""
    from kv_transition.db import connect
    from kv_transition.db.merge import merge_into

    if args.into:
        target = Path(args.into)
    elif args.config:
        _, paths = _load(args)
        target = paths.db
    else:
        raise KvtError("kvt db merge: name the database to merge into: -c CONFIG (its group's DB) or --into DB")
    for o in args.other:
        if Path(o).resolve() == target.resolve():
            raise KvtError(f"{o}: is the database being merged into; nothing merged")
    conn = connect(target)
    reports = []
    try:
        for o in args.other:
            reports.append(merge_into(conn, o))
    finally:
        conn.close()
    if args.json:
        print(json.dumps({"into": str(target), "sources": [{"source": r.source, "added": r.added,
                          "unchanged": r.unchanged, "moved_forward": r.updated, "renumbered_attempts": r.renumbered,
                          "conflicts": r.conflicts} for r in reports]}, indent=2))
    else:
        print(f"merged into {target}")
        for r in reports:
            print("\n".join(r.lines()))
        if any(r.added.get(t) for r in reports for t in ("responses", "scores")):
            print("scores/analysis are derived: run `kvt score` and `kvt analyze` again")
    return 1 if any(r.conflicts for r in reports) else 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvt", description="kv-transition: where does KV-cache compression start to cost accuracy?")
    p.add_argument("--version", action="version", version=f"kv-transition {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if config:
            _config_args(sp)
        sp.set_defaults(func=fn)
        return sp

    add("validate", cmd_validate, "validate a config (exit 2 with one line on the first error)")
    sp = add("resolve", cmd_resolve, "print the resolved run dir, DB path and dataset id (writes nothing)")
    sp.add_argument("--print-config", action="store_true", help="also print the fully resolved config as JSON")
    sp.add_argument("--json", action="store_true")
    sp = add("prepare", cmd_prepare, "build the dataset, tokenize, bin, and write manifest.json + SQLite")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp = add("demo", cmd_demo, "the main job on the embedded default (offline, CPU)")
    sp.add_argument("-q", "--quiet", action="store_true")
    sp = add("score", cmd_score, "score recorded responses (idempotent; re-scores after a metric change)")
    sp.add_argument("--force", action="store_true", help="re-score everything")
    sp.add_argument("-q", "--quiet", action="store_true")
    add("analyze", cmd_analyze, "per cell x bin statistics vs the full-cache baseline, and transition lengths")
    sp = add("report", cmd_report, "write runs/<exp>/report/ (HTML, Markdown, PNG, CSV) and print the summary")
    sp.add_argument("--compare", nargs=2, metavar=("G1", "G2"),
                    help="before/after view of two groups (group ids under output.runs_root, or .sqlite paths); "
                         "writes runs/compare/G1-vs-G2/")
    sp.add_argument("--out", metavar="DIR", help="write the report here instead")

    sp = add("run", cmd_run, "run one cell: start the engine for one KV method, send the manifest, record everything")
    sp.add_argument("--engine", help="engine name (engines/<name>/engine.yaml; default: engine.name)")
    sp.add_argument("--method", help="KV method of that engine (default: kv.method), or a whole spec in YAML/JSON: "
                    "'{method: adakv, inner: {method: snapkv, window_size: 32}}' (the rest becomes kv.params)")
    knob = sp.add_mutually_exclusive_group()
    knob.add_argument("--budget", type=int, help="KV budget in tokens (methods that support it)")
    knob.add_argument("--ratio", type=float, help="compression ratio in [0, 1) (methods that support it)")
    sp.add_argument("--runtime", choices=["docker", "process", "external"], help="default: engine.runtime")
    sp.add_argument("--base-url", help="the server's URL for --runtime external")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="print the summary as JSON")
    sp = add("cleanup", cmd_cleanup, "remove leftover engine containers/processes started by kvt", config=False)
    sp.add_argument("--group", help="only this experiment group (label kv-transition.group)")
    sp.add_argument("--runtime", choices=["all", "docker", "process"], default="all",
                    help="what to clean (default all; with all, an unreachable Docker daemon is only a note)")
    sp.add_argument("--registry", metavar="DIR", help="the process runtime's pidfile registry "
                    "(default $KVT_STATE_DIR/processes or ~/.local/state/kv-transition/processes)")
    sp.add_argument("-n", "--dry-run", action="store_true", help="list, remove nothing")
    sp.add_argument("--force", action="store_true",
                    help="also remove engines whose harness (a `kvt run` on this host) is still running")
    sp.add_argument("-c", "--config", help="close stale run records in this config's DB (default: the DBs under "
                    "--runs-root, only --group's when given)")
    sp.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one key of --config (repeatable)")
    sp.add_argument("--runs-root", default="runs", help="where the groups' DBs live (default: runs)")
    sp.add_argument("--ray-address", metavar="ADDR", help="also clean every node of this Ray cluster (auto, HOST:PORT, "
                    "ray://HOST:PORT): the engines `kvt matrix run --backend ray` started there")

    sp = add("methods", cmd_methods, "list every engine's KV methods with their properties (from the catalogs)",
             config=False)
    sp.add_argument("--engine", help="only this engine")
    sp.add_argument("--json", action="store_true")

    dbp = sub.add_parser("db", help="database tools")
    dbsub = dbp.add_subparsers(dest="db_command", metavar="SUBCOMMAND", parser_class=_Parser)
    dbsub.required = True
    mg = dbsub.add_parser("merge", help="merge other DBs (or shards) of the same experiment group into this one: "
                          "rows matched by their stable keys, a re-merge adds nothing, conflicts reported (exit 1), "
                          "nothing overwritten")
    mg.add_argument("other", nargs="+", metavar="OTHER.sqlite", help="databases to merge from (read, never written)")
    mg.add_argument("-c", "--config", help="merge into this config's group DB")
    mg.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one key of --config (repeatable)")
    mg.add_argument("--into", metavar="DB", help="merge into this database file instead of --config's")
    mg.add_argument("--json", action="store_true")
    mg.set_defaults(func=cmd_db_merge)

    m = sub.add_parser("manifest", help="manifest tools")
    msub = m.add_subparsers(dest="manifest_command", metavar="SUBCOMMAND", parser_class=_Parser)
    msub.required = True
    mv = msub.add_parser("verify", help="prove manifest.json and the SQLite copy agree and are unedited")
    _config_args(mv)
    mv.add_argument("--manifest", help="a manifest.json path (default: the config's)")
    mv.set_defaults(func=cmd_manifest_verify)

    d = sub.add_parser("datasets", help="dataset tools")
    dsub = d.add_subparsers(dest="datasets_command", metavar="SUBCOMMAND", parser_class=_Parser)
    dsub.required = True
    dl = dsub.add_parser("list", help="list the LongBench (+ LongBench-E), LongBench v2 and synthetic tasks")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=cmd_datasets_list)

    from kv_transition.matrix.cli import add_parsers as add_matrix_parsers  # kvt matrix …, kvt lock

    add_matrix_parsers(sub, _config_args, _Parser)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2)
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except KvtError as e:
        sys.stderr.write(f"kvt: error: {e}\n")
        return e.exit_code
    except sqlite3.DatabaseError as e:  # locked past the busy timeout, or damaged mid-command: one line
        from kv_transition.db.core import LAST_PATH, describe_db_error

        sys.stderr.write(f"kvt: error: {describe_db_error(LAST_PATH[0] if LAST_PATH else 'database', e, mid=True)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("kvt: interrupted\n")
        return 130
    except BrokenPipeError:  # `kvt … | head`: the reader left; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
