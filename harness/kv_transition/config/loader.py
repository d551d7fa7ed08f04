"""Load a configuration: YAML files (with `extends:`), deep merge, ${VAR} interpolation,
--override a.b.c=value, then typed validation. Pure apart from reading the files named."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from kv_transition.config.schema import Config
from kv_transition.config.yamlio import read_yaml_mapping
from kv_transition.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_MAX_EXTENDS = 8


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value in `over` replaces the base's."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; '#' comments; optional quotes; `export ` prefix allowed."""
    env: dict[str, str] = {}
    if not path.is_file():
        return env
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        if "=" not in line:
            raise ConfigError(f"{path}:{n}: expected KEY=VALUE")
        k, v = line.split("=", 1)
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        env[k.strip()] = v
    return env


def interpolate(node: Any, env: Mapping[str, str], where: str, source: str) -> Any:
    """Replace ${VAR} / ${VAR:-default} in every string; a missing VAR is an error naming it."""
    if isinstance(node, dict):
        return {k: interpolate(v, env, f"{where}.{k}" if where else str(k), source) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, f"{where}[{i}]", source) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: {where}: environment variable {name} is not set (and has no default)")

    whole = _VAR.fullmatch(node)
    value = _VAR.sub(sub, node)
    # a value that is exactly one ${VAR} takes the YAML scalar type of what it expands to
    return _scalar(value) if whole else value


def _scalar(text: str) -> Any:
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return v if isinstance(v, (str, int, float, bool)) or v is None else text


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "config")


def load_layers(path: Path, _depth: int = 0) -> dict[str, Any]:
    """The file deep-merged over the chain of files it `extends:` (paths relative to it)."""
    if _depth > _MAX_EXTENDS:
        raise ConfigError(f"{path}: 'extends' chain deeper than {_MAX_EXTENDS} (a cycle?)")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: must be a path string")
    base = load_layers((path.parent / parent).resolve(), _depth + 1)
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], YAML scalar of value)."""
    if "=" not in text:
        raise ConfigError(f"-o {text}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"-o {text}: bad key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"-o {text}: value is not a valid YAML scalar") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"-o {text}: {'.'.join(parts[: i + 1])} is not a mapping")
            else:
                nxt = node[p] = dict(nxt)
            node = nxt
        node[parts[-1]] = value
    return out


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Optional[list[str]]:
    """Field names of the sub-model that `loc` (without its last part) points into."""
    cur: Any = model
    skip_key = False  # the previous field was a dict[str, Model]: this part is a user key
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if skip_key:
            skip_key = False
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return None
        nxt = _model_in(field.annotation)
        if nxt is None:
            return None
        skip_key = _is_dict(field.annotation)
        cur = nxt
    return list(getattr(cur, "model_fields", {}).keys())


def _is_dict(ann: Any) -> bool:
    import typing

    if typing.get_origin(ann) is dict:
        return True
    return any(_is_dict(a) for a in typing.get_args(ann) if typing.get_origin(a) is not list)


def _model_in(ann: Any) -> Optional[type[BaseModel]]:
    """The BaseModel inside Optional[...] / list[...] / dict[str, ...] / Union[...], if any."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()) or ():
        m = _model_in(a)
        if m is not None:
            return m
    return None


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _is_model_type_tag(part: Any) -> bool:
    """pydantic puts the union member's type in the location (`list[str]`, `float`, …): not a key."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def dotted_loc(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if not _is_model_type_tag(p)]
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in parts).replace(".[", "[")


def _blame(loc: tuple[Any, ...], overrides: Sequence[tuple[list[str], str]]) -> Optional[str]:
    """The `-o` override a validation error at `loc` came from (the last one touching that key)."""
    keys = [str(p) for p in loc if not isinstance(p, int) and not _is_model_type_tag(p)]
    for parts, text in reversed(list(overrides)):
        n = min(len(parts), len(keys))
        if n and parts[:n] == keys[:n]:
            return f"-o {text}"
    return None


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] = Config,
                            overrides: Sequence[tuple[list[str], str]] = ()) -> str:
    """ONE line: `<file or -o override>: <key path>: <problem> (<suggestion>)`. An unknown key is
    reported first (a misspelt key also makes the real one 'missing')."""
    # an unknown key first; then the deepest location (of a union, the member that got furthest)
    errors = sorted(err.errors(), key=lambda x: (x["type"] != "extra_forbidden", -len(x["loc"])))
    e = errors[0]
    loc = tuple(e["loc"])
    dotted = dotted_loc(loc)
    if e["type"] == "extra_forbidden":
        clean = tuple(p for p in loc if not _is_model_type_tag(p))
        valid = _fields_at(model, clean) or []
        near = difflib.get_close_matches(str(clean[-1]), valid, n=1, cutoff=0.5)
        hint = f" (did you mean '{near[0]}'?)" if near else (f" (valid: {', '.join(valid)})" if valid else "")
        msg = f"unknown key{hint}"
    elif e["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = str(e["msg"]).splitlines()[0]
        if e["type"] not in ("value_error", "assertion_error") and "input" in e and not isinstance(
            e["input"], (dict, list)
        ):
            msg += f" (got {e['input']!r})"
        msg = msg.replace("Value error, ", "").replace("Assertion failed, ", "")
    more = len(err.errors()) - 1
    tail = f" [+{more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{_blame(loc, overrides) or source}: {dotted or '<root>'}: {msg}{tail}"


def load_config(
    path: str | Path,
    overrides: Iterable[str] = (),
    env: Optional[Mapping[str, str]] = None,
    dotenv: Optional[Path] = None,
) -> Config:
    """Read, merge, interpolate, override and validate. Raises ConfigError with one clear line."""
    p = Path(path)
    data = load_layers(p)
    if env is None:
        merged_env = read_dotenv(dotenv if dotenv is not None else Path.cwd() / ".env")
        merged_env.update({k: v for k, v in os.environ.items()})
    else:
        merged_env = dict(env)
    data = interpolate(data, merged_env, "", str(p))
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        parsed = [(parse_override(t)[0], t) for t in overrides]
        raise ConfigError(format_validation_error(err, str(p), overrides=parsed)) from None
