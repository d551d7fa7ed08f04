"""Canonical on-disk locations. Everything the harness writes lives under runs_root or data_root."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kv_transition.config.schema import Config
from kv_transition.errors import ConfigError


def _inside(child: Path, root: Path) -> bool:
    try:
        child.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def manifest_inputs(cfg: Config) -> dict[str, Any]:
    """The config sections a manifest depends on (and nothing else)."""
    ds = cfg.dataset
    src = {"longbench": ds.longbench, "longbench_v2": ds.longbench_v2}.get(ds.source, ds.synthetic)
    return {
        "source": ds.source,
        "params": src.model_dump(mode="json"),
        "binning": cfg.binning.model_dump(mode="json"),
        "tokenizer": cfg.model.tokenizer.model_dump(mode="json"),
        "max_context": cfg.model.max_context,
        "chat_template": cfg.model.chat_template,
        "max_new_tokens": cfg.decoding.max_new_tokens,
    }


def dataset_id_for(cfg: Config) -> str:
    if cfg.dataset.id != "auto":
        return cfg.dataset.id
    blob = json.dumps(manifest_inputs(cfg), sort_keys=True, separators=(",", ":"))
    return f"{cfg.dataset.source}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class Paths:
    runs_root: Path
    data_root: Path
    run_dir: Path
    db: Path
    dataset_id: str
    processed_dir: Path
    manifest: Path
    raw_dir: Path
    logs_dir: Path
    report_dir: Path
    tokenizer_cache: Path

    def as_dict(self) -> dict[str, str]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def resolve_paths(cfg: Config, cwd: Optional[Path] = None) -> Paths:
    base = cwd or Path.cwd()
    runs_root = (base / cfg.output.runs_root).resolve()
    data_root = (base / cfg.output.data_root).resolve()
    run_dir = runs_root / cfg.experiment.group_id
    if cfg.db.path == "auto":
        db = run_dir / "kv_transition.sqlite"
    else:
        db = (base / cfg.db.path).resolve()
        if not _inside(db, runs_root):
            raise ConfigError(f"db.path: {cfg.db.path!r} is outside output.runs_root ({runs_root})")
    dsid = dataset_id_for(cfg)
    processed = data_root / "processed" / dsid
    return Paths(
        runs_root=runs_root,
        data_root=data_root,
        run_dir=run_dir,
        db=db,
        dataset_id=dsid,
        processed_dir=processed,
        manifest=processed / "manifest.json",
        raw_dir=data_root / "raw",
        logs_dir=run_dir / "logs",
        report_dir=run_dir / "report",
        tokenizer_cache=data_root / "tokenizers",
    )
