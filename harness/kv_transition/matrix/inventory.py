"""What the matrix runs on: real GPUs (--gpus, NVML) or simulated CPU slots, and the rule that GPU engines
never fall back to a CPU slot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from kv_transition.matrix.expand import Expansion


@dataclass(frozen=True)
class Inventory:
    devices: tuple[int, ...]
    real: bool                # real GPUs (engines get CUDA_VISIBLE_DEVICES / DeviceRequests) or CPU slots

    @property
    def kind(self) -> str:
        return "gpu" if self.real else "slot"


def inventory(gpus: Optional[str | list[int]] = None, slots: Optional[int] = None,
              nvml: Callable[[], int] | None = None) -> Inventory:
    """--gpus 0,1,2,3 > --slots N (simulated, CPU) > NVML device count > 1 slot."""
    if gpus not in (None, "", []):
        ids = [int(x) for x in gpus.split(",")] if isinstance(gpus, str) else [int(x) for x in gpus]
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            from kv_transition.errors import ConfigError

            raise ConfigError(f"--gpus {gpus!r}: distinct non-negative GPU indices expected")
        return Inventory(tuple(ids), True)
    if slots:
        return Inventory(tuple(range(slots)), False)
    try:
        n = (nvml or _nvml_count)()
    except Exception:  # noqa: BLE001 - no driver / no NVML: CPU
        n = 0
    return Inventory(tuple(range(n)), True) if n else Inventory((0,), False)


def require_gpu_inventory(exp: Expansion, inv: Inventory) -> None:
    """GPU engines never fall back to a CPU slot: a matrix with a GPU cell needs real GPUs (--gpus or
    NVML); exit 2 naming the first such cell otherwise."""
    if inv.real:
        return
    from kv_transition.runtime.gpus import GpuRequiredError, needs_gpu_message

    for c in exp.cells:
        if c.runtime != "external" and c.spec.needs_gpu:
            raise GpuRequiredError(
                f"cell {c.cell_id} ({c.label} on {c.model}): {needs_gpu_message(c.spec)} but no GPU was resolved "
                f"(no --gpus, NVML sees none, or --slots simulates CPU slots); pass --gpus 0,1,… or set "
                f"device: cpu for that engine in the matrix")


def _nvml_count() -> int:
    from kv_transition.telemetry.gpu import nvml_acquire, nvml_release

    nv = nvml_acquire()
    try:
        return int(nv.nvmlDeviceGetCount())
    finally:
        nvml_release()
