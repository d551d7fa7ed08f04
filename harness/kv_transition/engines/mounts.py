"""What the engine needs to see, as bind mounts (docker runtime) — pure apart from `stat`.

* a local `model.path` (a directory or a file on this host) → mounted read-only at
  `<engine mounts.model_dir>/<basename>`; the rendered args use that container path. A local path that
  does not exist is a ConfigError (exit 2) before anything starts; a Hub id (`org/name`) passes.
* `engine.hf_cache` → one host HF cache shared by every container (read-write, HF_HOME points there), so
  N containers download a Hub model once. `auto`: only when the model is not a local path, at
  $HF_HOME or ~/.cache/huggingface; a path: always; `none`: never.
* `engine.mounts` → extra mounts from the config (each source must exist).

The process runtime mounts nothing (the engine sees the host paths); the model path check still applies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from kv_transition.config.checks import looks_local, model_path_problem
from kv_transition.engines.spec import EngineDef, Mount
from kv_transition.errors import ConfigError


def is_local_path(src: Optional[str]) -> bool:
    """True for what must be a path on this host (config.checks.looks_local: absolute, ~, ./, a .gguf,
    more than one '/'), or an existing path. Hub ids (`org/name`) and `package:` sources are not."""
    if not src or src.startswith("package:"):
        return False
    return Path(src).expanduser().exists() or looks_local(src)


def check_model_path(src: Optional[str], key: str = "model.path") -> None:
    """The same rule as `kvt validate` (config.checks), for callers below the CLI (run_cell, expand)."""
    why = model_path_problem(src)
    if why:
        raise ConfigError(f"{key}: {why}")
    p = Path(src or "").expanduser()
    if is_local_path(src) and (not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK))):
        raise ConfigError(f"{key}: {src}: not readable by this user")


def default_hf_cache(host_env: Optional[dict[str, str]] = None) -> str:
    env = host_env if host_env is not None else dict(os.environ)
    if env.get("HF_HOME"):
        return env["HF_HOME"]
    return str(Path(env.get("HOME") or Path.home()) / ".cache" / "huggingface")


def plan_mounts(eng: EngineDef, runtime: str, model_src: Optional[str], *, hf_cache: Optional[str] = "auto",
                extra: Optional[list[Any]] = None, host_env: Optional[dict[str, str]] = None,
                ) -> tuple[Optional[str], list[Mount], dict[str, str]]:
    """→ (the model path the engine args get, the mounts, env for the engine). Raises ConfigError for a
    missing local model path or extra mount source."""
    if runtime == "external":
        return model_src, [], {}
    check_model_path(model_src)
    if runtime != "docker":
        return model_src, [], {}
    mounts: list[Mount] = []
    env: dict[str, str] = {}
    model_arg = model_src
    local = is_local_path(model_src)
    if local:
        host = Path(os.path.expanduser(model_src or "")).resolve()
        target = f"{eng.mounts.model_dir.rstrip('/')}/{host.name}"
        mounts.append(Mount(str(host), target, True, "model"))
        model_arg = target
    want_cache = (hf_cache not in (None, "", "none")) and (hf_cache != "auto" or not local)
    if want_cache and eng.mounts.hf_cache:
        src = default_hf_cache(host_env) if hf_cache == "auto" else os.path.expanduser(str(hf_cache))
        mounts.append(Mount(str(Path(src).absolute()), eng.mounts.hf_cache, False, "hf_cache"))
        env["HF_HOME"] = eng.mounts.hf_cache
    for i, m in enumerate(extra or []):
        src = Path(os.path.expanduser(m.source)).absolute()
        if not src.exists():
            raise ConfigError(f"engine.mounts[{i}].source: {m.source}: no such file or directory")
        mounts.append(Mount(str(src), m.target, bool(m.read_only), "extra"))
    targets = [m.target for m in mounts]
    dup = next((t for t in targets if targets.count(t) > 1), None)
    if dup:
        raise ConfigError(f"engine.mounts: two mounts share the container path {dup}")
    return model_arg, mounts, env
