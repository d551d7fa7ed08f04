"""docs/engines.md stays true: every key of the engine.yaml schema has a row, and the engines it lists exist."""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel

from kv_transition.engines.spec import EngineDef, EngineRuntimeDef, list_engines

DOC = Path(__file__).resolve().parents[2] / "docs" / "engines.md"


def _models_in(annotation: object) -> list[tuple[bool, type[BaseModel]]]:
    """(inside a dict?, model) for each pydantic model in a field's annotation."""
    out = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(False, annotation)]
    origin = typing.get_origin(annotation)
    for a in typing.get_args(annotation):
        if origin is dict and isinstance(a, type) and issubclass(a, BaseModel):
            out.append((True, a))
        else:
            out.extend(_models_in(a))
    return out


def schema_keys() -> list[str]:
    keys: list[str] = []

    def walk(m: type[BaseModel], prefix: str) -> None:
        for name, f in m.model_fields.items():
            subs = _models_in(f.annotation)
            if not subs or m is EngineRuntimeDef:  # per-runtime replacements are rows of their own
                keys.append(prefix + name)
                continue
            for in_dict, sub in subs:
                key = f"{prefix}{name}" + (f".<{'runtime' if name == 'runtimes' else 'name'}>" if in_dict else "")
                if sub is EngineRuntimeDef:
                    keys.append(key)
                walk(sub, key + ".")

    walk(EngineDef, "")
    return keys


def test_every_engine_yaml_key_is_documented() -> None:
    doc = DOC.read_text()
    keys = schema_keys()
    assert "methods.<name>.runtimes.<runtime>.unsupported" in keys and "health.fallback_paths" in keys
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"undocumented in docs/engines.md: {missing}"


def test_the_documented_engines_exist() -> None:
    doc = DOC.read_text()
    for name in list_engines():
        assert f"| `{name}` |" in doc, f"engines/{name} is not in the table of docs/engines.md"
