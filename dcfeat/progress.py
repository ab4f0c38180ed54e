"""Progress on stderr (stdout carries results), off with --no-progress: a bar on a terminal, plain lines in a log.

Under nohup or a cluster scheduler stderr is a file, where rich draws nothing: there a line
with done/total, rate and ETA is printed every PLAIN_EVERY_S seconds, and one at the end of
work that took that long.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import timedelta

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


PLAIN_EVERY_S = 30.0


class _Lines:
    """advance(n) for a stderr that is not a terminal: a plain line every PLAIN_EVERY_S seconds."""

    def __init__(self, description: str, total: int, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = timedelta(seconds=round((self.total - self.done) / rate)) if rate > 0 else "?"
        share = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        return (f"{self.description}: {self.done:,}/{self.total:,} {self.unit}{share}, {rate:,.1f} {self.unit}/s, "
                f"elapsed {timedelta(seconds=round(elapsed))}, ETA {eta}")

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            stderr.print(self.line(now), highlight=False, markup=False)

    def finish(self) -> None:
        now = time.monotonic()
        if now - self.start >= PLAIN_EVERY_S:
            stderr.print(self.line(now) + ", done", highlight=False, markup=False)


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True, unit: str = "img"):
    """Yields advance(n); prints nothing when disabled, plain lines when stderr is not a terminal."""
    if not enabled:
        yield lambda n=1: None
        return
    if not stderr.is_terminal:
        lines = _Lines(description, total, unit)
        yield lines
        lines.finish()
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TaskProgressColumn(), _Rate(unit), TimeElapsedColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
