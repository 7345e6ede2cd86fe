"""A rich progress bar for training steps, with live loss and step rate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..drivers.profile import ProgressFn


@contextmanager
def step_progress(
    console: Console, total: int | None, disable: bool = False
) -> Iterator[ProgressFn]:
    """Yields ``update(done, total, loss)``; the loss shown is the last recorded one.
    ``total`` is None when the number of steps is unknown (a training script): the bar then
    counts steps without an end."""
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} steps/s"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=disable, transient=False) as bar:
        task = bar.add_task("train", total=total, loss="-", rate="-")

        def update(done: int, total: int, loss: float | None) -> None:
            speed = bar.tasks[0].speed
            bar.update(
                task,
                completed=done,
                loss="-" if loss is None else f"{loss:.4g}",
                rate="-" if not speed else f"{speed:.1f}",
            )

        yield update
