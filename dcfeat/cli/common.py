"""What every command shares: default paths, the consoles, warnings, the --no-progress flag."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from dcfeat.choices import RANDOM_VIT_DIR
from dcfeat.errors import BadInput, IncompatibleFeatures
from dcfeat.presets import TrainConfig

DATA = Path("data")
DEFAULT_STORE = DATA / "feats.h5"
DEFAULT_RUN = DATA / "runs" / "latest"  # `dcfeat train` points it at the newest run
RANDOM_BACKBONE = DATA / RANDOM_VIT_DIR  # --random-backbone's checkpoint, saved on first use
TRAIN_DEFAULTS = TrainConfig()
# Wide enough for the tables when piped (rich falls back to 80 columns without a terminal).
stdout = Console(width=None if sys.stdout.isatty() else 160)

no_progress = click.option("--no-progress", is_flag=True, help="Do not draw progress bars on stderr.")


def random_backbone_option(what: str):
    """--random-backbone of extract, predict and serve; `what`: the sentence on what it is good for there."""
    return click.option("--random-backbone", is_flag=True, help=f"Use a randomly initialised DINOv2-S/14 (saved once "
                        f"in {RANDOM_BACKBONE}/, the same weights as `dcfeat demo`'s) instead of --model: no network "
                        f"needed. {what} Every number it gives is labelled RANDOM BACKBONE.")


def random_backbone_model(*, model_given: bool, run_dir: Path | None = None) -> str:
    """--random-backbone: the folder of the random DINOv2-S/14 (saved on first use).

    `run_dir` (predict, serve): refused at once for a run whose features no random backbone made; for one
    that a random backbone made, the weights' fingerprint decides when the backbone loads.
    """
    if model_given:
        raise BadInput("--random-backbone and --model both name a backbone: pass one of them")
    if run_dir is not None:
        from dcfeat.run import check_folder, read_config

        check_folder(Path(run_dir))
        features = read_config(Path(run_dir)).feature_identity
        if not features.backbone_random_init:
            raise IncompatibleFeatures(
                f"--random-backbone: the run {run_dir} was trained on features of `{features.model}`, not of a "
                "random backbone, and a backbone answers only for a run trained on its own features. Drop "
                "--random-backbone (the run loads its own backbone), or train a run on features that `dcfeat extract "
                "--random-backbone` made")
    from dcfeat.backbone import random_vit

    return str(random_vit(RANDOM_BACKBONE).resolve())


def warn(warnings: list[str]) -> None:
    """Each warning a stage's result carries, on stderr (stdout carries the results)."""
    from dcfeat.progress import stderr  # rich.progress: not loaded for `dcfeat --help`

    for line in warnings:
        stderr.print(f"[yellow]warning: {escape(line)}[/yellow]", highlight=False, soft_wrap=True)  # one line
