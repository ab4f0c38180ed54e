"""What every command shares: default paths, the consoles, warnings, the --no-progress flag."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from dcfeat.presets import TrainConfig

DATA = Path("data")
DEFAULT_STORE = DATA / "feats.h5"
DEFAULT_RUN = DATA / "runs" / "latest"  # `dcfeat train` points it at the newest run
TRAIN_DEFAULTS = TrainConfig()
# Wide enough for the tables when piped (rich falls back to 80 columns without a terminal).
stdout = Console(width=None if sys.stdout.isatty() else 160)

no_progress = click.option("--no-progress", is_flag=True, help="Do not draw progress bars on stderr.")


def warn(warnings: list[str]) -> None:
    """Each warning a stage's result carries, on stderr (stdout carries the results)."""
    from dcfeat.progress import stderr  # rich.progress: not loaded for `dcfeat --help`

    for line in warnings:
        stderr.print(f"[yellow]warning: {escape(line)}[/yellow]", highlight=False, soft_wrap=True)  # one line
