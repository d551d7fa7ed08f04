"""The one rule for what counts as a secret in an environment mapping, and masking it wherever a copy
of the config or an engine's environment is stored or printed."""

from __future__ import annotations

import re
from typing import Any, Mapping

SECRET_ENV = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)", re.I)
MASK = "***"


def is_secret_name(name: str) -> bool:
    return bool(SECRET_ENV.search(name))


def mask_env(env: Mapping[str, Any]) -> dict[str, Any]:
    """Values of secret-looking names → '***' (empty values stay empty: nothing to hide)."""
    return {k: (MASK if is_secret_name(k) and v else v) for k, v in env.items()}


def masked_config(cfg: Any) -> dict[str, Any]:
    """cfg.model_dump(mode='json') with engine.env secrets masked: the only form a config is stored in
    (cells, experiments) or printed (`kvt resolve --print-config`)."""
    d = cfg.model_dump(mode="json")
    eng = d.get("engine") or {}
    if isinstance(eng.get("env"), dict):
        eng["env"] = mask_env(eng["env"])
    return d
