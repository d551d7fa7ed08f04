"""NVML through nvidia-ml-py (`pynvml`): init once per process, long-lived handles, devices by UUID."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

_lock = threading.Lock()
_refs = 0


class NvmlUnavailable(RuntimeError):
    pass


def _pynvml() -> Any:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise NvmlUnavailable(f"nvidia-ml-py not importable: {e}") from None
    return pynvml


def nvml_acquire() -> Any:
    """nvmlInit once (reference counted); raises NvmlUnavailable with the reason."""
    global _refs
    nv = _pynvml()
    with _lock:
        if _refs == 0:
            try:
                nv.nvmlInit()
            except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, …
                raise NvmlUnavailable(f"NVML init failed: {e}") from None
        _refs += 1
    return nv


def nvml_release() -> None:
    global _refs
    with _lock:
        if _refs <= 0:
            return
        _refs -= 1
        if _refs == 0:
            try:
                _pynvml().nvmlShutdown()
            except Exception:
                pass


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def compute_capabilities(indices: Iterable[int]) -> dict[int, tuple[str, tuple[int, int]]]:
    """GPU index → (name, (major, minor)) from NVML; raises NvmlUnavailable when NVML is not there."""
    nv = nvml_acquire()
    try:
        out = {}
        for i in indices:
            h = nv.nvmlDeviceGetHandleByIndex(int(i))
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
            out[int(i)] = (_s(nv.nvmlDeviceGetName(h)), (int(major), int(minor)))
        return out
    finally:
        nvml_release()


@dataclass
class Gpu:
    uuid: str
    index: Optional[int]
    name: str
    handle: Any


class GpuSampler:
    """Resolve devices once (UUIDs first; else indices; else every visible GPU) and sample them."""

    def __init__(self, uuids: Iterable[str] = (), indices: Iterable[int] = (), *, all_if_none: bool = True):
        self.nv = nvml_acquire()
        self.gpus: list[Gpu] = []
        self.unsupported: set[str] = set()
        self.errors: list[str] = []
        nv = self.nv
        try:
            uuids = list(uuids)
            indices = list(indices)
            if uuids:
                for u in uuids:
                    try:
                        h = nv.nvmlDeviceGetHandleByUUID(u)
                    except Exception as e:
                        self.errors.append(f"GPU {u}: {e}")
                        continue
                    self.gpus.append(self._gpu(h))
            else:
                if not indices and all_if_none:
                    indices = list(range(nv.nvmlDeviceGetCount()))
                for i in indices:
                    try:
                        h = nv.nvmlDeviceGetHandleByIndex(int(i))
                    except Exception as e:
                        self.errors.append(f"GPU index {i}: {e}")
                        continue
                    self.gpus.append(self._gpu(h))
        except Exception:
            self.close()
            raise

    def _gpu(self, h: Any) -> Gpu:
        nv = self.nv
        idx: Optional[int]
        try:
            idx = int(nv.nvmlDeviceGetIndex(h))
        except Exception:
            idx = None
        return Gpu(uuid=_s(nv.nvmlDeviceGetUUID(h)), index=idx, name=_s(nv.nvmlDeviceGetName(h)), handle=h)

    def _call(self, what: str, fn: Any, *a: Any) -> Any:
        if what in self.unsupported:
            return None
        try:
            return fn(*a)
        except Exception as e:
            if "NotSupported" in type(e).__name__ or "Not Supported" in str(e):
                self.unsupported.add(what)
            return None

    def sample(self) -> list[dict[str, Any]]:
        nv = self.nv
        out = []
        for g in self.gpus:
            mem = self._call("memory", nv.nvmlDeviceGetMemoryInfo, g.handle)
            util = self._call("utilization", nv.nvmlDeviceGetUtilizationRates, g.handle)
            power = self._call("power", nv.nvmlDeviceGetPowerUsage, g.handle)
            temp = self._call("temperature", nv.nvmlDeviceGetTemperature, g.handle, nv.NVML_TEMPERATURE_GPU)
            out.append({
                "gpu_uuid": g.uuid, "gpu_index": g.index,
                "mem_used": int(mem.used) if mem is not None else None,
                "mem_total": int(mem.total) if mem is not None else None,
                "util_gpu": float(util.gpu) if util is not None else None,
                "util_mem": float(util.memory) if util is not None else None,
                "power_w": power / 1000.0 if power is not None else None,
                "temp_c": float(temp) if temp is not None else None,
            })
        return out

    def close(self) -> None:
        if self.nv is not None:
            self.nv = None
            nvml_release()
