"""Reading YAML for configs and matrix files: safe types only, duplicate keys are an error (file:line),
and every syntax error is one line `file:line: invalid YAML: problem`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kv_transition.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML 1.2 says keys are unique;
    PyYAML silently keeps the last one). Keys merged in with `<<:` may be overridden as usual."""

    source = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            line = key_node.start_mark.line + 1
            if key in seen:
                first = f"first set on line {seen[key]}" if seen[key] != line else "set twice on this line"
                raise ConfigError(f"{self.source}:{line}: duplicate key {key!r} ({first}; keep one)")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, source: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}{at}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path, what: str = "config") -> dict[str, Any]:
    """The file's top-level mapping ({} for an empty file); one-line ConfigError otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} file ({e})") from None
    data = load_yaml_text(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data
