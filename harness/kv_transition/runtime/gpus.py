"""GPUs are always explicit: a GPU engine (engine.yaml `gpu: true` and `engine.device` not cpu, or
`gpu: optional` and device cuda) starts with the GPU ids the harness resolved — engine.gpus / --gpus, else
the first tp GPUs NVML sees — never with none (a container without a DeviceRequest would run vLLM on no
GPU). None resolvable = exit 2 before anything starts. An optional-GPU engine (kvpress) on device auto gets
GPUs when NVML sees some and runs on the CPU otherwise. The chosen GPUs' UUIDs are what engine_instances
records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from kv_transition.engines.spec import ResolvedSpec
from kv_transition.errors import ConfigError


class GpuRequiredError(ConfigError):
    """A GPU engine with no GPU to run on (exit 2)."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    mem_total: int
    mem_free: int


def nvml_gpus() -> list[GpuInfo]:
    """Every GPU NVML sees; raises telemetry.gpu.NvmlUnavailable with the reason."""
    from kv_transition.telemetry.gpu import _s, nvml_acquire, nvml_release

    nv = nvml_acquire()
    try:
        out = []
        for i in range(int(nv.nvmlDeviceGetCount())):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuInfo(i, _s(nv.nvmlDeviceGetUUID(h)), _s(nv.nvmlDeviceGetName(h)), int(mem.total),
                               int(mem.free)))
        return out
    finally:
        nvml_release()


def uuids_for(indices: Sequence[int], lister: Optional[Callable[[], list[GpuInfo]]] = None) -> list[str]:
    """The UUIDs of GPU indices (best effort: [] when NVML is unavailable)."""
    if not indices:
        return []
    try:
        by_index = {g.index: g.uuid for g in (lister or nvml_gpus)()}
    except Exception:  # noqa: BLE001 - no NVML: nothing to record
        return []
    return [by_index[i] for i in indices if i in by_index]


def needs_gpu_message(spec: ResolvedSpec) -> str:
    return f"engine {spec.engine!r} needs a GPU (engine.yaml gpu: {str(spec.gpu).lower()}, engine.device {spec.device})"


def require_gpus(spec: ResolvedSpec, tp: int = 1, *, runtime: str = "docker",
                 lister: Optional[Callable[[], list[GpuInfo]]] = None) -> ResolvedSpec:
    """spec with explicit GPU ids when it needs them: its own, else the first `tp` NVML GPUs; raises
    GpuRequiredError when none can be resolved. Engines on the CPU and external servers pass as they are."""
    if runtime == "external" or not spec.wants_gpu or spec.gpus:
        return spec
    try:
        gpus = (lister or nvml_gpus)()
        why = f"NVML sees {len(gpus)} GPU(s)"
    except Exception as e:  # noqa: BLE001 - NvmlUnavailable or a driver error: say why
        gpus, why = [], f"NVML unavailable: {e}"
    n = max(1, tp)
    if len(gpus) < n and not spec.needs_gpu:  # gpu: optional on device auto: the CPU it is
        return spec
    if len(gpus) < n:
        raise GpuRequiredError(
            f"engine.gpus: {needs_gpu_message(spec)} and {n} could not be resolved: engine.gpus / --gpus is empty "
            f"and {why}; set engine.gpus (or --gpus), or engine.device: cpu for an engine that runs on the CPU")
    return dataclasses.replace(spec, gpus=[g.index for g in gpus[:n]])
