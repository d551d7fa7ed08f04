"""Configuration: files → merged → interpolated → overridden → validated `Config`."""

from kv_transition.config.loader import load_config
from kv_transition.config.paths import Paths, resolve_paths
from kv_transition.config.schema import Config

__all__ = ["Config", "Paths", "load_config", "resolve_paths"]
