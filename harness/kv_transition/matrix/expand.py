"""Matrix file + config (+ lock) → cells and engine groups. Pure apart from reading engine YAMLs.

Each cell gets the per-cell Config a `kvt run` of that cell would use (model merged from the matrix's
model entry, engine name/overrides, kv method/knob, repeats), and its id comes from the same
`cell_inputs`/`cell_id_for` as `kvt run` — so a matrix cell and the same single `kvt run` share an id
(ports, GPUs, TP, env and concurrency are not inputs of the id).

Cells that can share one running engine form an *engine group*: request-mode engines (kvpress) put
every method/ratio/budget of one model (and identical server args/env) in one group; server-mode
engines (vLLM, SGLang) have one group per cell. The full-cache baseline is first in its group, and
baseline groups come first in the schedule.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from kv_transition.cell import cell_id_for, cell_inputs, resolve_cell_spec
from pydantic import ValidationError

from kv_transition.config.loader import deep_merge, format_validation_error
from kv_transition.config.paths import dataset_id_for
from kv_transition.config.schema import Config
from kv_transition.engines.spec import ResolvedSpec, load_engine
from kv_transition.errors import ConfigError
from kv_transition.matrix.schema import Knobs, MatrixFile, ModelEntry


@dataclass(frozen=True)
class MatrixCell:
    cell_id: str
    model: str
    engine: str
    method: str
    compression_ratio: Optional[float]
    budget: Optional[int]
    baseline: bool
    runtime: str
    tp: int
    cfg: Config                 # the per-cell config (engine.port/gpus are filled in per group at run time)
    spec: ResolvedSpec          # resolved without GPUs, on the matrix's base port (for the plan)
    dataset_id: str
    digest: Optional[str] = None       # the lock's registry digest applied to the image (docker cells)
    image_lock: Optional[str] = None   # what the lock file says for this image (sha256:… or local:sha256:…)

    @property
    def label(self) -> str:
        knob = (f" r={self.compression_ratio:g}" if self.compression_ratio is not None
                else f" b={self.budget}" if self.budget is not None else "")
        return f"{self.engine}/{tree_label(self.method, self.cfg.kv.params)}{knob}"


def tree_label(method: str, params: dict[str, Any]) -> str:
    """adakv(snapkv), composed(snapkv+knorm): the nested presses of a method spec, for labels."""
    nested = [params[k] for k in ("inner", "prefill", "decoding") if isinstance(params.get(k), dict)]
    nested += [p for p in params.get("presses") or [] if isinstance(p, dict)]
    if not nested:
        return method
    return f"{method}({'+'.join(tree_label(str(n.get('method')), n) for n in nested)})"


@dataclass
class EngineGroup:
    group_id: str
    model: str
    engine: str
    runtime: str
    tp: int
    method_mode: str
    shared: bool                     # one engine serves every cell of the group
    cells: list[MatrixCell] = field(default_factory=list)

    @property
    def has_baseline(self) -> bool:
        return any(c.baseline for c in self.cells)

    @property
    def spec(self) -> ResolvedSpec:
        return self.cells[0].spec

    @property
    def label(self) -> str:
        return f"{self.engine}:{self.model.split('/')[-1]}" + ("" if self.shared else f" {self.cells[0].label}")


@dataclass
class Expansion:
    matrix: MatrixFile
    cells: list[MatrixCell]
    groups: list[EngineGroup]        # in schedule priority order
    excluded: int = 0


def _merged_knobs(matrix: MatrixFile, engine: str, model: ModelEntry, method: str,
                  ratio: Optional[float], budget: Optional[int]) -> Knobs:
    ee = matrix.engines[engine]
    k = Knobs(**ee.model_dump(include=set(Knobs.model_fields)))
    if model.tp is not None:
        k.tp = model.tp
    for ov in matrix.overrides:
        if not ov.match.matches(model.id, engine, method, ratio, budget):
            continue
        for name in Knobs.model_fields:
            v = getattr(ov, name)
            if name == "args":
                k.args = k.args + list(v)
            elif name == "env":
                k.env = {**k.env, **v}
            elif v is not None:
                setattr(k, name, v)
    return k


def _excluded(matrix: MatrixFile, model: str, engine: str, method: str, ratio: Optional[float],
              budget: Optional[int]) -> bool:
    return any(x.matches(model, engine, method, ratio, budget) for x in matrix.exclude)


def cell_config(cfg: Config, matrix: MatrixFile, model: ModelEntry, engine: str, method: str,
                ratio: Optional[float], budget: Optional[int], knobs: Knobs,
                method_params: Optional[dict[str, Any]] = None) -> Config:
    """The Config a `kvt run -c CONFIG --engine E --method M --ratio R` of this cell would use."""
    raw = cfg.model_dump(mode="json")
    sec = model.model_section()
    if model.id != cfg.model.id:  # another model: do not inherit the config model's weights path/revision
        raw["model"]["path"] = None
        raw["model"]["revision"] = None
    raw["model"] = deep_merge(raw["model"], sec)
    eng = raw["engine"]
    eng["name"] = engine
    if knobs.runtime:
        eng["runtime"] = knobs.runtime
    eng["extra_args"] = list(eng.get("extra_args") or []) + list(knobs.args)
    eng["env"] = {**(eng.get("env") or {}), **knobs.env}
    for name in ("tag", "concurrency", "device", "dtype", "readiness_timeout_s", "attention_backend"):
        if getattr(knobs, name) is not None:
            eng[name] = getattr(knobs, name)
    if matrix.base_port:
        eng["port"] = matrix.base_port
    eng["gpus"] = []
    raw["kv"].update({"method": method, "compression_ratio": ratio, "budget": budget,
                      "params": {**(raw["kv"].get("params") or {}), **(method_params or {})}})
    if matrix.repeats:
        raw["decoding"]["repeats"] = matrix.repeats
    try:
        return Config.model_validate(raw)
    except ValidationError as e:  # a matrix entry produced an invalid config
        one = format_validation_error(e, matrix.source).split(": ", 1)[1]
        raise ConfigError(f"{matrix.source}: engines.{engine}.methods.{method} (on {model.id}): config {one}") from None


def lock_entry(lock: Optional[dict[str, Any]], spec: ResolvedSpec) -> Optional[str]:
    if not lock:
        return None
    return (lock.get("images") or {}).get(f"{spec.image}:{spec.tag}", {}).get("digest")


def expand(cfg: Config, matrix: MatrixFile, lock: Optional[dict[str, Any]] = None) -> Expansion:
    """Every (model, engine, method, ratio/budget) not excluded → MatrixCell; cells → engine groups."""
    models = matrix.models or [ModelEntry(id=cfg.model.id)]
    cells: list[MatrixCell] = []
    excluded = 0
    seen: set[str] = set()
    for model in models:
        for engine, ee in matrix.engines.items():
            eng = load_engine(engine)
            for method, me in ee.method_entries():
                where = f"{matrix.source}: engines.{engine}.methods.{method}"
                method = eng.canonical_method(method)  # an alias (vllm fp8 = fp8_e4m3) is recorded once
                if method not in eng.methods:
                    near = difflib.get_close_matches(method, list(eng.methods), n=1, cutoff=0.5)
                    hint = f"did you mean '{near[0]}'? " if near else ""
                    raise ConfigError(f"{where}: {engine!r} has no method {method!r} ({hint}known: "
                                      f"{', '.join(eng.methods)})")
                md = eng.methods[method]
                if me.compression_ratios is not None or me.budgets is not None:  # the method's own lists win
                    ratios, budgets = list(me.compression_ratios or []), list(me.budgets or [])
                else:  # the engine's lists, for the knobs this method takes
                    ratios = ee.compression_ratios if "compression_ratio" in md.supports else []
                    budgets = ee.budgets if "budget" in md.supports else []
                combos: list[tuple[Optional[float], Optional[int]]] = (
                    [(r, None) for r in ratios] + [(None, b) for b in budgets]) or [(None, None)]
                for knob, given in (("compression_ratio", ratios), ("budget", budgets)):
                    if given and knob not in md.supports:
                        takes = f"it takes only a {' or a '.join(md.supports)}" if md.supports else "it takes none"
                        raise ConfigError(f"{where}: {engine}/{method} does not take a {knob} "
                                          f"({takes}; drop its {knob}s)")
                if combos == [(None, None)] and md.supports and not md.baseline:
                    raise ConfigError(f"{where}: {engine}/{method} needs a compression ratio or a budget "
                                      f"(add compression_ratios: or budgets: to engines.{engine} or to the method)")
                for ratio, budget in combos:
                    if _excluded(matrix, model.id, engine, method, ratio, budget):
                        excluded += 1
                        continue
                    knobs = _merged_knobs(matrix, engine, model, method, ratio, budget)
                    ccfg = cell_config(cfg, matrix, model, engine, method, ratio, budget, knobs, me.params)
                    tp = knobs.tp or 1
                    try:
                        spec0, rt, _ = resolve_cell_spec(ccfg, engine=engine, method=method,
                                                         compression_ratio=ratio, budget=budget, tensor_parallel=tp)
                    except ConfigError as e:
                        raise ConfigError(f"{where} (on {model.id}): {e}") from None
                    locked = lock_entry(lock, spec0)
                    digest = locked if (rt == "docker" and locked and locked.startswith("sha256:")) else None
                    spec = spec0
                    if digest:
                        spec, rt, _ = resolve_cell_spec(ccfg, engine=engine, method=method, compression_ratio=ratio,
                                                        budget=budget, tensor_parallel=tp, digest=digest)
                    dsid = dataset_id_for(ccfg)
                    cid = cell_id_for(cell_inputs(ccfg, spec, dsid))
                    if cid in seen:
                        raise ConfigError(f"{where}: {engine}/{method} on {model.id} appears twice "
                                          f"(cell {cid})")
                    seen.add(cid)
                    cells.append(MatrixCell(cid, model.id, engine, method, ratio, budget, md.baseline, rt, tp, ccfg,
                                            spec, dsid, digest, locked))
    return Expansion(matrix, cells, group_cells(cells), excluded)


def _group_key(c: MatrixCell) -> str:
    s = c.spec
    return json.dumps([c.model, s.server_key, c.runtime, c.tp, sorted(s.env.items()), c.cfg.engine.concurrency,
                       c.dataset_id])


def group_cells(cells: list[MatrixCell]) -> list[EngineGroup]:
    """Request-mode cells sharing server args/env/model → one group (baseline cell first); server-mode
    cells → one group each. Order: groups with a baseline first, then by matrix order."""
    groups: dict[str, EngineGroup] = {}
    for c in cells:
        shared = c.spec.method_mode == "request"
        key = _group_key(c) if shared else c.cell_id
        g = groups.get(key)
        if g is None:
            gid = (f"{c.engine}.{c.model.split('/')[-1]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
                   if shared else c.cell_id)
            g = groups[key] = EngineGroup(gid, c.model, c.engine, c.runtime, c.tp, c.spec.method_mode, shared)
        g.cells.append(c)
    out = list(groups.values())
    for g in out:
        g.cells.sort(key=lambda c: not c.baseline)  # stable: baseline first, then matrix order
    # baselines first: every engine/model's reference starts before its compressed variants
    return sorted(out, key=lambda g: not g.has_baseline)
