"""Terminal rendering (rich). Pure formatting of values the stages return."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    # piped / CI output: rich defaults to 80 columns, which wraps the report tables; use 120
    return c if c.is_terminal else Console(stderr=stderr, width=120)


console = _console()
err_console = _console(stderr=True)


@contextmanager
def stage_progress(enabled: bool = True) -> Iterator[Any]:
    """A callback(stage, advance, total) backed by one rich progress bar per stage."""
    if not enabled:
        yield lambda stage, advance, total: None
        return
    prog = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    tasks: dict[str, Any] = {}

    def cb(stage: str, advance: int, total: Optional[int]) -> None:
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total)
        elif total is not None:
            prog.update(tasks[stage], total=total)
        if advance:
            prog.advance(tasks[stage], advance)

    with prog:
        yield cb


def bins_table(manifest: dict[str, Any]) -> Table:
    t = Table(title=f"manifest {manifest['dataset_id']} — bins by {manifest['binning']['by']}")
    for col, just in (("bin", "left"), ("range (tokens)", "left"), ("candidates", "right"), ("selected", "right"),
                      ("tokens min/mean/max", "right"), ("truncated", "right"), ("tasks", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    by = manifest["binning"]["by"]
    key = "final_tokens" if by == "final_tokens" else "original_tokens"
    for b in manifest["bins"]:
        es = [e for e in manifest["entries"] if e["bin_id"] == b["bin_id"]]
        toks = [e[key] for e in es]
        stats = f"{min(toks)}/{sum(toks) / len(toks):.0f}/{max(toks)}" if toks else "-"
        tasks = sorted({e["task"] for e in es})
        t.add_row(str(b["bin_id"]), b["label"], str(b["n_candidates"]), str(b["n_selected"]), stats,
                  str(sum(1 for e in es if e["truncated"])), ", ".join(tasks) or "-")
    t.caption = (f"{len(manifest['entries'])} entries from {manifest['dataset']['n_loaded']} examples · tokenizer "
                 f"{manifest['tokenizer']['name']} ({manifest['tokenizer']['revision']}) · {manifest['content_hash'][:19]}…")
    return t
