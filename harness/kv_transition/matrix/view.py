"""The global live view: one row per GPU/slot (engine group, cell, its request progress, status)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kv_transition.db import connect


@dataclass
class SlotState:
    group: str = ""
    cell: str = ""
    cell_id: str = ""
    status: str = "idle"
    done: int = 0               # cells of the group finished
    total: int = 0


class Board:
    """Shared state for the live view: one row per GPU/slot."""

    def __init__(self, inv: Any):
        self.inv = inv
        self.slots: dict[int, SlotState] = {d: SlotState() for d in inv.devices}
        self.lock = threading.Lock()
        self.finished: list[Any] = []
        self.total_cells = 0

    def set(self, gpus: tuple[int, ...], **kw: Any) -> None:
        with self.lock:
            for g in gpus:
                for k, v in kw.items():
                    setattr(self.slots[g], k, v)

    def done(self, o: Any) -> None:
        with self.lock:
            self.finished.append(o)


def render(board: Any, progress: dict[str, tuple[int, int, int]]) -> Any:
    with board.lock:
        slots = {k: (v.group, v.cell, v.cell_id, v.status, v.done, v.total) for k, v in board.slots.items()}
        finished = list(board.finished)
        total = board.total_cells
    t = Table(title=f"kvt matrix — {len(finished)}/{total} cells finished", expand=False)
    for col in (board.inv.kind, "engine group", "cell", "requests", "group cells", "status"):
        t.add_column(col)
    for dev, (group, cell, cid, status, done, tot) in slots.items():
        n, ok, failed = progress.get(cid, (0, 0, 0)) if cid else (0, 0, 0)
        req = f"{ok}/{n}" + (f" ([red]{failed} failed[/])" if failed else "") if cid else ""
        colour = "green" if status == "running" else "dim"
        t.add_row(str(dev), group, cell, req, f"{done}/{tot}" if tot else "", f"[{colour}]{status}[/]")
    counts: dict[str, int] = {}
    for o in finished:
        counts[o.status] = counts.get(o.status, 0) + 1
    line = Text(" · ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "starting…")
    return Group(t, line)


@contextmanager
def null_ctx() -> Iterator[None]:
    yield


@contextmanager
def live_view(runner: Any) -> Iterator[None]:
    from rich.live import Live

    cache: dict[str, Any] = {"t": 0.0, "progress": {}}

    def get() -> Any:
        now = time.monotonic()
        if now - cache["t"] > 1.0:
            cache["t"] = now
            cache["progress"] = progress(runner.paths.db)
        return render(runner.board, cache["progress"])

    with Live(get_renderable=get, console=runner.console, refresh_per_second=2, transient=False):
        yield


def progress(db: Path) -> dict[str, tuple[int, int, int]]:
    try:
        conn = connect(db, readonly=True)
    except Exception:  # noqa: BLE001
        return {}
    try:
        return {r[0]: (int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)) for r in conn.execute(
            "SELECT c.cell_id, c.n_requests, SUM(q.status='ok'), SUM(q.status='failed') FROM cells c"
            " LEFT JOIN requests q ON q.cell_id = c.cell_id GROUP BY c.cell_id")}
    except Exception:  # noqa: BLE001 - a locked/partial DB never breaks the view
        return {}
    finally:
        conn.close()
