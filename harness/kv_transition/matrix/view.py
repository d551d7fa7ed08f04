"""The global live view: one row per GPU/slot (engine group, cell, its request progress, status)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


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
