"""Rich progress display for iterative stages, exposed as a simple callback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_display"]


@contextmanager
def progress_display(quiet: bool = False) -> Iterator:
    """Yield a ``(stage, iteration, total, loss)`` callback that drives a rich progress bar."""
    if quiet:
        yield None
        return
    bars = Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, iteration: int, total: int, loss: float) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, loss=loss)
        bars.update(tasks[stage], completed=iteration, loss=loss)

    with bars:
        yield update
