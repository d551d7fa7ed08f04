"""The cell's rich progress bar: done/failed/in-flight, tokens/s, ETA. Refreshed from the runner's
counters on a timer (nothing per request)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kv_transition.runner.core import Counters


@contextmanager
def cell_progress(label: str, total: int, *, enabled: bool = True, console: Optional[Console] = None
                  ) -> Iterator[Optional[Callable[[Counters], None]]]:
    if not enabled:
        yield None
        return
    prog = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("[green]ok {task.fields[ok]}[/] · [red]failed {task.fields[failed]}[/] · "
                   "in-flight {task.fields[inflight]} · retries {task.fields[retries]} · {task.fields[tps]:.1f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False, refresh_per_second=5,
    )
    task = prog.add_task(label, total=total, ok=0, failed=0, inflight=0, retries=0, tps=0.0)

    def tick(c: Counters) -> None:
        prog.update(task, completed=c.done, ok=c.ok, failed=c.failed, inflight=c.in_flight,
                    retries=c.retries, tps=c.tokens_per_s())

    with prog:
        yield tick


def noop(*_: Any) -> None:
    return None
