"""What a matrix run ends with: one outcome per cell, and the run's summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kv_transition.matrix.expand import MatrixCell


@dataclass
class CellOutcome:
    cell: MatrixCell
    status: str                 # completed | incomplete | failed | skipped
    reason: Optional[str] = None
    n_ok: int = 0
    n_requests: int = 0
    gpus: tuple[int, ...] = ()
    group_id: str = ""
    elapsed_s: float = 0.0


@dataclass
class MatrixSummary:
    matrix_run_id: Optional[int]
    outcomes: list[CellOutcome]
    engine_loads: dict[str, int]          # group id → engine starts in this run
    wall_s: float
    status: str                           # completed | failed | interrupted

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out
