"""`dcfeat train`: options of the training stage, and its summary line."""

from __future__ import annotations

import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import click

from dcfeat.choices import HEADS, TRAIN_CHOICES
from dcfeat.cli.common import DEFAULT_STORE, TRAIN_DEFAULTS, no_progress, stdout, warn
from dcfeat.cli.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    MARGIN,
    POSITIVE,
    SEED,
    Finite,
    Size,
    device_option,
    split_name,
)
from dcfeat.errors import human_bytes
from dcfeat.presets import PRESETS, preset_config, preset_values


def preset_option(*decls: str, field: str, help: str, **kwargs):
    """An option whose default is its preset's value (None here), each preset's shown in --help."""
    return click.option(*decls, field, default=None, help=f"{help}  [{preset_values(field)}]", **kwargs)


# N² groups: 100 gives 10,000 classifiers, each cell's group neighbours 2 km apart at M = 20 m; more only
# costs memory (a count per group) and time.
MAX_N = 100


def choice(field: str) -> click.Choice:
    return click.Choice(TRAIN_CHOICES[field])


@click.command()
@click.option("--feats", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store to train on.")
@click.option("--split", default="train", show_default=True, callback=split_name, help="Training split.")
@click.option("--val-split", default=None, callback=split_name, help="Split for LR@1 after every epoch (the epoch kept: --keep).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder [default: runs/<timestamp> beside the store, and runs/latest points to it].")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="dcfeat", show_default=True,
              help="Starting values of the options marked with both presets' values: dcfeat's defaults, or the "
              "official D&C code's (dc-paper; extract its features with `--crop full`). Each such option overrides "
              "its preset's value.")
@click.option("--M", "M", type=POSITIVE, default=TRAIN_DEFAULTS.M, show_default=True, help="Cell side in metres.")
@click.option("--N", "N", type=click.IntRange(1, MAX_N), default=TRAIN_DEFAULTS.N, show_default=True, help="N² groups; no two neighbouring cells "
              "share a group. N=1: one classifier over all cells.")
@click.option("--min-images-per-class", type=AT_LEAST_1, default=TRAIN_DEFAULTS.min_images_per_class, show_default=True,
              help="Cells with fewer training images are not classes.")
@click.option("--head", type=click.Choice(list(HEADS)), default=TRAIN_DEFAULTS.head, show_default=True,
              help="; ".join(f"{name}: {what}" for name, what in HEADS.items()) + ".")
@preset_option("--s", field="s", type=POSITIVE, help="Logit scale s.")
@preset_option("--m", field="m", type=MARGIN, help="Margin m.")
@preset_option("--easy-margin/--no-easy-margin", field="easy_margin", help="AAMC: no margin where cos θ ≤ 0 (D&C's "
               "code), instead of keeping the target logit falling past θ = π − m (insightface).")
@preset_option("--dim", field="dim", type=AT_LEAST_1, help="Embedding dimension after projection.")
@preset_option("--epochs", field="epochs", type=AT_LEAST_1, help="Epochs (at most, with --lr-schedule plateau).")
@preset_option("--iterations-per-epoch", field="iterations_per_epoch", type=AT_LEAST_0,
               help="Steps per epoch; 0: one pass, as many samples as there are images in classes.")
@preset_option("--batch-size", field="batch_size", type=AT_LEAST_1, help="Samples per step.")
@preset_option("--group-rotation", field="group_rotation", type=choice("group_rotation"),
               help="Groups take turns every step, or one group trains a whole epoch (D&C's code).")
@preset_option("--group-order", field="group_order", type=choice("group_order"),
               help="The order groups take turns in: by group id, or as each is first met in the split's sorted "
               "images (D&C's code).")
@preset_option("--optimizer", field="optimizer", type=choice("optimizer"), help="AdamW, or Adam (D&C's code).")
@preset_option("--lr-projection", field="lr_projection", type=POSITIVE, help="Learning rate of the projection.")
@preset_option("--lr-heads", field="lr_heads", type=POSITIVE, help="Learning rate of the prototypes.")
@preset_option("--weight-decay", field="weight_decay", type=Finite(min=0), help="Weight decay.")
@preset_option("--lr-schedule", field="lr_schedule", type=choice("lr_schedule"),
               help="plateau: the projection's rate ×0.1 after 10 epochs without a lower train loss, training "
               "stops below 1e-6 (D&C's code); the prototypes keep theirs.")
@preset_option("--prototype-init", field="prototype_init", type=choice("prototype_init"),
               help="Prototypes start at the class means of the initial embeddings, or at random (Xavier).")
@preset_option("--test-prototypes", field="test_prototypes", type=choice("test_prototypes"),
               help="evaluate/predict rank cells by cosine to the prototypes, or by the dot product with the "
               "prototypes as trained (D&C's code); saved with the run.")
@preset_option("--keep", field="keep", type=choice("keep"),
               help="Epoch saved: best val LR@1 (the last without --val-split), or lowest mean train loss.")
@click.option("--finetune-blocks", type=AT_LEAST_0, default=TRAIN_DEFAULTS.finetune_blocks, show_default=True, help="Also tune the last K DINOv2 blocks and "
              "the final layer norm on the split's cached tokens (`dcfeat extract --cache-tokens K` or more).")
@click.option("--lr-blocks", type=POSITIVE, default=TRAIN_DEFAULTS.lr_blocks, show_default=True,
              help="Learning rate of the tuned blocks.")
@click.option("--negative-fraction", type=FRACTION, default=TRAIN_DEFAULTS.negative_fraction, show_default=True,
              help="Score the batch's classes plus this share of the group's other classes per step (PartialFC); "
              "below 1 only for groups of ~100 k classes or more, where the exact loss dominates a step.")
@click.option("--memory-budget", type=Size(), default=None, help="Largest split held in memory, e.g. 512MB, "
              "2GB; a larger one is streamed from disk in shuffled chunks [default: half the free memory].")
@click.option("--restart", is_flag=True, help="With --out holding an unfinished run: train it again from its first "
              "epoch instead of resuming it after its last finished one.")
@click.option("--seed", type=SEED, default=TRAIN_DEFAULTS.seed, show_default=True, help="Seed of initialisation and sampling.")
@device_option
@no_progress
def train(feats, split, val_split, out, preset, iterations_per_epoch, memory_budget, restart, device, no_progress,
          **options):
    """Train the projection and one classifier per group on cached features.

    Resumable: after a crash, run the same command again (with the same --out).
    """
    from dcfeat.train import train_files

    config = preset_config(preset, **options)
    if iterations_per_epoch is not None:  # 0: one pass, which the config spells None (here: the preset's value)
        config = replace(config, iterations_per_epoch=iterations_per_epoch or None)
    result = train_files(feats, split, config, out=out, val_split=val_split, device=device,
                         progress=not no_progress, command=shlex.join(["dcfeat", *sys.argv[1:]]),
                         memory_budget=memory_budget, restart=restart)
    last = result.epochs[-1]
    val = f", val LR@1 {100 * result.epochs[result.best_epoch - 1]['val_lr1']:.1f} % (kept epoch " \
          f"{result.best_epoch})" if "val_lr1" in last else ""
    n = len(result.epochs)
    median = statistics.median(e["seconds"] for e in result.epochs)
    resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from else ""
    stdout.print(f"run {result.out} (preset {config.preset}): {result.classes} classes from {result.images_used} "
                 f"images, {n} epoch{'s' if n != 1 else ''} ({median:.2f} s each, median) in {result.seconds:.1f} s"
                 f"{resumed}, train accuracy {100 * last['train_accuracy']:.1f} %{val}; "
                 f"split {'streamed from disk' if result.streamed else 'in memory'}, "
                 f"budget {human_bytes(result.memory_budget)}; confidence {result.calibration}")
    warn(result.warnings)
