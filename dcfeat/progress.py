"""Progress bars on stderr (stdout carries results), off with --no-progress."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True)


class _Rate(TextColumn):
    """Items per second since the start (rich's own speed column is smoothed to noise)."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return f"{rate:,.0f} {self.unit}/s"


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True, unit: str = "img"):
    """Yields advance(n); prints nothing when disabled."""
    if not enabled:
        yield lambda n=1: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TaskProgressColumn(), _Rate(unit), TimeElapsedColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
