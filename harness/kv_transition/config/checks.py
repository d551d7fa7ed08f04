"""Checks of a validated config against the machine, run before any engine starts or any row is
written: a local model path must exist (a Hub id passes: it is fetched by the engine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

from kv_transition.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_local(path: str) -> bool:
    """A filesystem path rather than a Hub id (`org/name` or `name`): absolute, ~, ./ ../, a .gguf
    file, a Windows separator or more than one '/'."""
    p = path.strip()
    return (p.startswith(("/", "~", "./", "../", ".\\")) or p in (".", "..") or p.lower().endswith(".gguf")
            or "\\" in p or not _HUB_ID.match(p))


def model_path_problem(path: Optional[str], cwd: Optional[Path] = None) -> Optional[str]:
    """Why `model.path` cannot be loaded on this machine, or None."""
    if not path or path.startswith("package:"):
        return None
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = (cwd or Path.cwd()) / p
    if p.exists():
        return None
    if looks_local(path):
        return (f"{path!r} does not exist (a local model directory or GGUF file must exist on this host; "
                "a Hugging Face Hub id looks like org/name)")
    return None  # a Hub id: the engine resolves it (from its cache offline, or the Hub)


def check_model_path(cfg: Any, source: str, overrides: Sequence[str] = (), cwd: Optional[Path] = None) -> None:
    """Raise one ConfigError line when the config's model.path is a local path that does not exist.
    Skipped for runtime external (the server loaded its model itself)."""
    if cfg.engine.runtime == "external":
        return
    why = model_path_problem(cfg.model.path, cwd)
    if why:
        blame = next((f"-o {o}" for o in reversed(list(overrides)) if o.split("=", 1)[0].strip() == "model.path"),
                     source)
        raise ConfigError(f"{blame}: model.path: {why}")
