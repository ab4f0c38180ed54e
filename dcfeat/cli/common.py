"""What every command shares: default paths, the console, the --no-progress flag."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from dcfeat.presets import TrainConfig

DATA = Path("data")
DEFAULT_STORE = DATA / "feats.h5"
TRAIN_DEFAULTS = TrainConfig()
# Wide enough for the tables when piped (rich falls back to 80 columns without a terminal).
stdout = Console(width=None if sys.stdout.isatty() else 160)

no_progress = click.option("--no-progress", is_flag=True, help="Do not draw progress bars on stderr.")
