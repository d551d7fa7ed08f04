"""kv-transition kvpress engine: an OpenAI-compatible server for KV-cache eviction methods (transformers + kvpress).

Run with ``python -m kvpress_engine --model ... --host 127.0.0.1 --port ...``. The pure modules (cli, methods,
metrics, protocol) import no torch; ``engine`` and ``loader`` do.
"""

__version__ = "0.1.0"
