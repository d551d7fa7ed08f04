"""Methods the GPUs cannot run: a method's `requires` (engine.yaml) against the compute capability of the GPUs
the matrix will use — from --gpu-arch, else `matrix.gpu_arch` in the config, else NVML. Checked by
`kvt matrix plan` and `kvt matrix run` before anything starts: one clear line, exit 2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from kv_transition.engines.spec import load_engine, parse_cc
from kv_transition.errors import ConfigError


@dataclass(frozen=True)
class GpuArch:
    cc: tuple[int, int]
    source: str          # "--gpu-arch 9.0", "matrix.gpu_arch 9.0", "GPU 0 (NVIDIA H200)"

    @property
    def label(self) -> str:
        return f"{self.cc[0]}.{self.cc[1]}"


def _nvml_ccs(ids: tuple[int, ...]) -> dict[int, tuple[str, tuple[int, int]]]:
    from kv_transition.telemetry.gpu import compute_capabilities

    return compute_capabilities(ids)


def gpu_arch(cli: Optional[str], cfg: Any, inv: Any,
             probe: Optional[Callable[[tuple[int, ...]], dict[int, tuple[str, tuple[int, int]]]]] = None
             ) -> Optional[GpuArch]:
    """The compute capability to check against (the lowest of the GPUs used), or None when unknown."""
    for value, where in ((cli, "--gpu-arch"), (getattr(cfg.matrix, "gpu_arch", None), "matrix.gpu_arch")):
        if value:
            try:
                return GpuArch(parse_cc(value), f"{where} {value}")
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
    if not inv.real:
        return None
    try:
        ccs = (probe or _nvml_ccs)(tuple(inv.devices))
    except Exception:  # noqa: BLE001 - no NVML here (planning on a laptop): unknown, not an error
        return None
    if not ccs:
        return None
    i, (name, cc) = min(ccs.items(), key=lambda kv: kv[1][1])
    return GpuArch(cc, f"GPU {i} ({name})")


def refuse_cell(engine: str, method: Optional[str], arch: Optional[GpuArch], where: str) -> None:
    """ConfigError when one cell's method (`kvt run`) is one the GPU cannot run (nothing when arch is unknown or
    the engine does not list the method: its own checks name that)."""
    if arch is None or not method:
        return
    md = load_engine(engine).methods.get(method)
    why = md.requires.refusal(arch.cc) if md is not None else None
    if why:
        raise ConfigError(f"{where}: {engine}/{method} {why.replace('the GPU has', f'{arch.source} has')}; "
                          f"pick another method or run on a GPU that has it")


def refuse_unrunnable(exp: Any, arch: Optional[GpuArch]) -> None:
    """ConfigError naming the first cell whose method the GPU cannot run (nothing when arch is unknown)."""
    if arch is None:
        return
    bad = []
    for c in exp.cells:
        md = load_engine(c.engine).methods[c.method]
        why = md.requires.refusal(arch.cc)
        if why and (c.engine, c.method) not in {(e, m) for e, m, _ in bad}:
            bad.append((c.engine, c.method, why))
    if bad:
        e, m, why = bad[0]
        more = f" (and {len(bad) - 1} more: {', '.join(f'{x}/{y}' for x, y, _ in bad[1:])})" if len(bad) > 1 else ""
        raise ConfigError(f"matrix {exp.matrix.name}: {e}/{m} {why.replace('the GPU has', f'{arch.source} has')}"
                          f"{more}; exclude it or run on a GPU that has it")


def describe(arch: Optional[GpuArch]) -> str:
    return f"compute capability {arch.label} ({arch.source})" if arch else \
        "compute capability unknown (no NVML GPU; --gpu-arch to check methods' hardware)"
