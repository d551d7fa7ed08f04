"""`kvt prepare`: config → dataset → prompts/tokens → bins → manifest.json + SQLite."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from kv_transition.manifest.binning import assign, make_bins, select
from kv_transition.config import Config, Paths
from kv_transition.config.paths import manifest_inputs
from kv_transition.datasets.schema import Example
from kv_transition.db import connect, dumps, transaction, utcnow
from kv_transition.manifest.store import FORMAT, seal, write_db, write_json
from kv_transition.manifest.prompts import BuiltPrompt, PromptBuilder, PromptSpec
from kv_transition.manifest.tokens import Tokenizer, load_tokenizer

Progress = Callable[[str, int, Optional[int]], None]  # (stage, advance, total)


def _noop(stage: str, advance: int, total: Optional[int]) -> None:
    return None


def prompt_specs(cfg: Config, paths: Paths, examples: Sequence[Example]) -> dict[str, PromptSpec]:
    """Per-task template, generation budget and chat flag, for the tasks of ``examples``.

    LongBench: the official dataset2prompt/dataset2maxlen, except for rows of kvpress's mirror, whose
    context and question are templated already (``{context}{input}``, chat template for every task,
    their ``answer_prefix`` after it and their ``max_new_tokens``). LongBench v2: its 0shot / 0shot_cot
    template and pred.py's budgets.
    """
    from kv_transition.datasets import longbench, longbench_v2, synthetic
    from kv_transition.errors import DataError

    override = cfg.decoding.max_new_tokens if isinstance(cfg.decoding.max_new_tokens, int) else None
    tasks = sorted({e.task for e in examples})
    specs: dict[str, PromptSpec] = {}
    if cfg.dataset.source == "synthetic":
        for t in tasks:
            specs[t] = PromptSpec(
                template=synthetic.SYNTHETIC_PROMPTS[t],
                max_new_tokens=override or synthetic.SYNTHETIC_MAXLEN[t],
                chat=True,
            )
        return specs
    if cfg.dataset.source == "longbench_v2":
        v2 = cfg.dataset.longbench_v2
        template = longbench_v2.load_template(v2.prompt_config, paths.data_root, v2.cot)
        for t in tasks:
            specs[t] = PromptSpec(template=template, max_new_tokens=override or longbench_v2.max_new_tokens(v2.cot),
                                  chat=True)
        return specs
    kvpress_rows: dict[str, list[Example]] = {}
    for e in examples:
        if e.meta.get("layout") == longbench.LAYOUT_KVPRESS:
            kvpress_rows.setdefault(e.task, []).append(e)
    for t, rows in kvpress_rows.items():
        prefixes = {str(e.meta.get("answer_prefix") or "") for e in rows}
        if len(prefixes) != 1:
            raise DataError(f"kvpress LongBench task {t!r}: rows disagree on answer_prefix ({sorted(prefixes)})")
        budgets = [int(e.meta["max_new_tokens"]) for e in rows if e.meta.get("max_new_tokens")]
        if not budgets and override is None:
            raise DataError(f"kvpress LongBench task {t!r}: no max_new_tokens column; set decoding.max_new_tokens")
        specs[t] = PromptSpec(template="{context}{input}", max_new_tokens=override or max(budgets), chat=True,
                              answer_prefix=prefixes.pop(), question_after_template=True)
    official = [t for t in tasks if t not in specs]
    if official:
        d2p, d2m = longbench.load_prompt_config(cfg.dataset.longbench.prompt_config, paths.data_root)
        for t in official:
            key = longbench.prompt_key(t)
            specs[t] = PromptSpec(
                template=d2p[key],
                max_new_tokens=override or int(d2m[key]),
                chat=t not in longbench.NO_CHAT_TEMPLATE_TASKS,
            )
    return specs


def followups(cfg: Config, paths: Paths) -> dict[str, dict[str, Any]]:
    """Per task, the second request an example asks for once its first response is in (LongBench v2 with
    ``cot: true``: pred.py --cot's 0shot_cot_ans request carrying the reasoning), or {} (one request each)."""
    if cfg.dataset.source == "longbench_v2" and cfg.dataset.longbench_v2.cot:
        from kv_transition.datasets import longbench_v2

        fu = longbench_v2.followup(cfg.dataset.longbench_v2.prompt_config, paths.data_root)
        if isinstance(cfg.decoding.max_new_tokens, int):  # an explicit budget overrides every request's
            fu["max_new_tokens"] = cfg.decoding.max_new_tokens
        return {longbench_v2.TASK: fu}
    return {}


def _provenance(cfg: Config, paths: Paths) -> list[dict[str, Any]]:
    from kv_transition.datasets import provenance

    return provenance(cfg.dataset, paths.data_root)


def _no_count(text: str) -> int:
    raise AssertionError("only synthetic datasets count tokens while loading")


def load_examples(cfg: Config, paths: Paths, tok: Tokenizer, progress: Progress = _noop) -> list[Example]:
    from kv_transition.datasets import load_examples as _load

    return _load(cfg.dataset, paths.data_root, tok.count, progress)


@dataclass
class PrepareResult:
    manifest: dict[str, Any]
    paths: Paths
    n_loaded: int


def build_manifest(
    cfg: Config, paths: Paths, tok: Tokenizer, examples: list[Example], progress: Progress = _noop
) -> dict[str, Any]:
    specs = prompt_specs(cfg, paths, examples)
    second = followups(cfg, paths)
    builder = PromptBuilder(tok, cfg.model.max_context, use_chat=cfg.model.chat_template)
    built: list[BuiltPrompt] = []
    chunk = 256
    progress("tokenize", 0, len(examples))
    for i in range(0, len(examples), chunk):
        part = examples[i: i + chunk]
        built.extend(builder.build_all(part, specs))
        progress("tokenize", len(part), len(examples))

    by = cfg.binning.by
    lengths = [b.final_tokens if by == "final_tokens" else b.original_tokens for b in built]
    bins = make_bins(cfg.binning, lengths)
    ids_by_bin: dict[int, list[str]] = defaultdict(list)
    for ex, n in zip(examples, lengths):
        ids_by_bin[assign(bins, n)].append(ex.example_id)
    chosen = select(ids_by_bin, cfg.binning.n_per_bin, cfg.binning.seed)
    chosen_ids = {i for ids in chosen.values() for i in ids}

    by_id = {e.example_id: (e, b) for e, b in zip(examples, built)}
    if len(by_id) != len(examples):
        raise ValueError("duplicate example ids in the dataset")
    entries = []
    for b in bins:
        for eid in chosen.get(b.bin_id, []):
            ex, bp = by_id[eid]
            entries.append({
                "example_id": eid, "task": ex.task, "bin_id": b.bin_id, "prompt": bp.prompt, "chat": bp.chat,
                "add_special_tokens": bp.add_special_tokens, "original_tokens": bp.original_tokens,
                "final_tokens": bp.final_tokens, "truncated": bp.truncated, "max_new_tokens": bp.max_new_tokens,
                "question_start": bp.question_start,
            })
    manifest = {
        "format": FORMAT,
        "dataset_id": paths.dataset_id,
        "dataset": {"source": cfg.dataset.source, "inputs": manifest_inputs(cfg), "n_loaded": len(examples),
                    "files": _provenance(cfg, paths)},
        "tokenizer": tok.info(),
        "model": {"id": cfg.model.id, "max_context": cfg.model.max_context},
        "binning": {"strategy": cfg.binning.strategy, "by": by, "edges": [b.lo for b in bins],
                    "n_per_bin": cfg.binning.n_per_bin, "seed": cfg.binning.seed},
        "bins": [
            {"bin_id": b.bin_id, "label": b.label, "lo": b.lo, "hi": b.hi,
             "n_candidates": len(ids_by_bin.get(b.bin_id, [])), "n_selected": len(chosen.get(b.bin_id, []))}
            for b in bins
        ],
        "entries": entries,
        "examples": [by_id[i][0].to_dict() for i in sorted(chosen_ids)],
    }
    if second:  # only then: manifests of one-request datasets keep their content hash
        manifest["followups"] = second
    return seal(manifest)


def record_experiment(conn: Any, cfg: Config) -> None:
    from kv_transition.config.secrets import masked_config

    cfg_json = dumps(masked_config(cfg))  # never a secret at rest
    h = "sha256:" + hashlib.sha256(cfg_json.encode()).hexdigest()
    now = utcnow()
    with transaction(conn):
        conn.execute(
            "INSERT INTO experiments(group_id, name, created_at, updated_at, config_json, config_hash)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT(group_id) DO UPDATE SET name=excluded.name,"
            " updated_at=excluded.updated_at, config_json=excluded.config_json, config_hash=excluded.config_hash",
            (cfg.experiment.group_id, cfg.experiment.name, now, now, cfg_json, h),
        )


def prepare(cfg: Config, paths: Paths, progress: Progress = _noop, tok: Optional[Tokenizer] = None) -> PrepareResult:
    if cfg.dataset.source == "synthetic":  # the generator sizes contexts with the tokenizer
        progress("tokenizer", 0, None)
        tok = tok or load_tokenizer(cfg.model.tokenizer, paths.tokenizer_cache)
        progress("load", 0, None)
        examples = load_examples(cfg, paths, tok, progress)
    else:  # data first: a source that cannot be read fails before anything (a tokenizer cache) is written
        from kv_transition.datasets import load_examples as _load

        progress("load", 0, None)
        examples = _load(cfg.dataset, paths.data_root, _no_count, progress)
        progress("tokenizer", 0, None)
        tok = tok or load_tokenizer(cfg.model.tokenizer, paths.tokenizer_cache)
    manifest = build_manifest(cfg, paths, tok, examples, progress)
    # the file first (atomic rename), then the DB in one transaction: both or a clear error
    write_json(manifest, paths.manifest)
    conn = connect(paths.db)
    try:
        record_experiment(conn, cfg)
        write_db(conn, manifest, paths.manifest, cfg.experiment.group_id)
    finally:
        conn.close()
    return PrepareResult(manifest=manifest, paths=paths, n_loaded=len(examples))
