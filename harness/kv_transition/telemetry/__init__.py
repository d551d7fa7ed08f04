"""Telemetry: NVML (GPUs by UUID), psutil (host + engine process tree), the engine's /metrics
KV-usage series — sampled in a background thread into telemetry_* tables."""

from kv_transition.telemetry.gpu import GpuSampler, NvmlUnavailable
from kv_transition.telemetry.host import HostSampler
from kv_transition.telemetry.prom import PromSample, parse_prometheus
from kv_transition.telemetry.sampler import ListSink, SharedTelemetry, TelemetrySampler

__all__ = ["GpuSampler", "HostSampler", "ListSink", "NvmlUnavailable", "PromSample", "SharedTelemetry",
           "TelemetrySampler", "parse_prometheus"]
