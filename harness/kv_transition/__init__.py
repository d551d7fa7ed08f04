"""kv-transition: find where KV-cache compression starts to cost accuracy as context grows."""

__version__ = "0.1.0"
