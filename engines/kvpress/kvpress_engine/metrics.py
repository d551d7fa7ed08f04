"""A small Prometheus text-format registry (no client library needed). Pure Python, thread-safe."""

from __future__ import annotations

import threading
from typing import Iterable

PREFIX = "kvpress:"
KV_USAGE_GAUGE = PREFIX + "kv_cache_usage_perc"


def _fmt_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"'.replace("\n", " ") for k, v in labels)
    return "{" + inner + "}"


def _fmt_value(v: float) -> str:
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Metrics:
    """Counters and gauges, each with a help text, rendered in Prometheus exposition format 0.0.4."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    def declare(self, name: str, kind: str, help_text: str) -> None:
        assert kind in ("counter", "gauge")
        with self._lock:
            self._kinds[PREFIX + name] = (kind, help_text)
            self._values.setdefault(PREFIX + name, {})

    def _key(self, labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((labels or {}).items()))

    def inc(self, name: str, amount: float = 1.0, labels: dict[str, str] | None = None) -> None:
        full = PREFIX + name
        with self._lock:
            assert self._kinds[full][0] == "counter", full
            series = self._values[full]
            k = self._key(labels)
            series[k] = series.get(k, 0.0) + amount

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        full = PREFIX + name
        with self._lock:
            assert self._kinds[full][0] == "gauge", full
            self._values[full][self._key(labels)] = float(value)

    def get(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values[PREFIX + name].get(self._key(labels), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in self._kinds.items():
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                series = self._values[name] or {(): 0.0}
                for labels, v in series.items():
                    lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(v)}")
        return "\n".join(lines) + "\n"


def engine_metrics() -> Metrics:
    m = Metrics()
    decl: Iterable[tuple[str, str, str]] = [
        ("requests_total", "counter", "API requests to the generation endpoints, by endpoint and HTTP status"),
        ("prompt_tokens_total", "counter", "prompt tokens of served requests"),
        ("generation_tokens_total", "counter", "generated (completion) tokens"),
        ("kv_tokens_offered_total", "counter", "KV tokens per layer before compression, summed over requests"),
        ("kv_tokens_kept_total", "counter", "KV tokens per layer kept after compression, summed over requests"),
        ("kv_tokens_offered_last", "gauge", "KV tokens per layer before compression, last request"),
        ("kv_tokens_kept_last", "gauge", "KV tokens per layer (mean over layers) after compression, last request"),
        ("kv_bytes_after_compression_last", "gauge", "KV cache bytes (all layers) after compression, last request"),
        ("kv_bytes_after_compression_total", "counter", "KV cache bytes after compression, summed over requests"),
        ("prefill_seconds_total", "counter", "seconds spent in prefill (press included)"),
        ("decode_seconds_total", "counter", "seconds spent decoding"),
        ("press_seconds_total", "counter", "seconds spent inside the press (scoring and pruning)"),
        ("prefill_seconds_last", "gauge", "prefill seconds of the last request"),
        ("decode_seconds_last", "gauge", "decode seconds of the last request"),
        ("num_requests_running", "gauge", "requests admitted and not finished (prefilling or decoding; <= max_batch)"),
        ("num_requests_waiting", "gauge", "requests queued, not yet admitted"),
        ("batch_size", "gauge", "sequences in the last decoding step (0 when idle)"),
        ("max_batch", "gauge", "the engine's --max-batch (sequences decoding together at most)"),
        ("decode_steps_total", "counter", "batched decoding steps run"),
        ("batch_size_sum", "counter", "sum over decoding steps of the sequences in the step (/ decode_steps_total: "
         "mean batch size)"),
        ("cuda_graph_captures_total", "counter", "decoding-step CUDA graphs captured (one per batch-size bucket and "
         "KV buffer generation; --decode-step graph)"),
        ("cuda_graph_capture_seconds_total", "counter", "seconds spent capturing decoding-step CUDA graphs"),
        ("kv_admission_deferred_total", "counter", "prefilled requests that waited for KV memory (free device memory "
         "or --kv-cache-limit-gib) before joining the decoding batch"),
        ("kv_cache_allocated_bytes", "gauge", "bytes of the batch's preallocated KV slots (held by the engine)"),
        ("queue_depth", "gauge", "requests waiting plus running"),
        ("kv_cache_tokens", "gauge", "KV tokens per layer held by the decoding requests now, summed (0 when idle)"),
        ("kv_cache_bytes", "gauge", "KV cache bytes held by the decoding requests now (0 when idle)"),
        (
            "kv_cache_usage_perc",
            "gauge",
            "KV cache usage: KV tokens held now / max_model_len (fraction 0..1; 0 when idle)",
        ),
    ]
    for name, kind, help_text in decl:
        m.declare(name, kind, help_text)
    return m
