"""`dcfeat train`: options of the training stage, and its summary line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from dcfeat.cli.common import DEFAULT_STORE, TRAIN_DEFAULTS, no_progress, stdout
from dcfeat.errors import human_bytes
from dcfeat.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    MARGIN,
    POSITIVE,
    Size,
    split_name,
)
from dcfeat.train import TrainConfig, train_files


@click.command()
@click.option("--feats", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store to train on.")
@click.option("--split", default="train", show_default=True, callback=split_name, help="Training split.")
@click.option("--val-split", default=None, callback=split_name, help="Split for LR@1 after every epoch; the best epoch is kept.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder [default: runs/<timestamp> beside the store, and runs/latest points to it].")
@click.option("--M", "M", type=POSITIVE, default=TRAIN_DEFAULTS.M, show_default=True, help="Cell side in metres.")
@click.option("--N", "N", type=AT_LEAST_1, default=TRAIN_DEFAULTS.N, show_default=True, help="N² groups; no two neighbouring cells "
              "share a group. N=1: one classifier over all cells.")
@click.option("--min-images-per-class", type=AT_LEAST_1, default=TRAIN_DEFAULTS.min_images_per_class, show_default=True,
              help="Cells with fewer training images are not classes.")
@click.option("--head", type=click.Choice(["aamc", "lmcc", "softmax"]), default=TRAIN_DEFAULTS.head, show_default=True,
              help="AAMC (ArcFace, D&C), LMCC (CosFace, CosPlace) or a plain softmax layer.")
@click.option("--s", "s", type=POSITIVE, default=TRAIN_DEFAULTS.s, show_default=True, help="Logit scale s.")
@click.option("--m", "m", type=MARGIN, default=TRAIN_DEFAULTS.m, show_default=True, help="Margin m.")
@click.option("--dim", type=AT_LEAST_1, default=TRAIN_DEFAULTS.dim, show_default=True, help="Embedding dimension after projection.")
@click.option("--epochs", type=AT_LEAST_1, default=TRAIN_DEFAULTS.epochs, show_default=True, help="Epochs (one epoch draws as "
              "many samples as there are images in classes).")
@click.option("--batch-size", type=AT_LEAST_1, default=TRAIN_DEFAULTS.batch_size, show_default=True, help="Samples per step.")
@click.option("--lr-projection", type=POSITIVE, default=TRAIN_DEFAULTS.lr_projection, show_default=True,
              help="AdamW learning rate of the projection.")
@click.option("--lr-heads", type=POSITIVE, default=TRAIN_DEFAULTS.lr_heads, show_default=True,
              help="AdamW learning rate of the prototypes.")
@click.option("--finetune-blocks", type=AT_LEAST_0, default=TRAIN_DEFAULTS.finetune_blocks, show_default=True, help="Also tune the last K DINOv2 blocks and "
              "the final layer norm on the split's cached tokens (`dcfeat extract --cache-tokens K` or more).")
@click.option("--lr-blocks", type=POSITIVE, default=TRAIN_DEFAULTS.lr_blocks, show_default=True,
              help="AdamW learning rate of the tuned blocks.")
@click.option("--negative-fraction", type=FRACTION, default=TRAIN_DEFAULTS.negative_fraction, show_default=True,
              help="Score the batch's classes plus this share of the group's other classes per step (PartialFC); "
              "below 1 only for groups of ~100 k classes or more, where the exact loss dominates a step.")
@click.option("--memory-budget", type=Size(), default=None, help="Largest split held in memory, e.g. 512MB, "
              "2GB; a larger one is streamed from disk in shuffled chunks [default: half the free memory].")
@click.option("--seed", type=int, default=TRAIN_DEFAULTS.seed, show_default=True, help="Seed of initialisation and sampling.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@no_progress
def train(feats, split, val_split, out, M, N, min_images_per_class, head, s, m, dim, epochs, batch_size,
          lr_projection, lr_heads, finetune_blocks, lr_blocks, negative_fraction, memory_budget, seed, device,
          no_progress):
    """Train the projection and one classifier per group on cached features."""
    config = TrainConfig(M=M, N=N, min_images_per_class=min_images_per_class, head=head, s=s, m=m, dim=dim,
                         epochs=epochs, batch_size=batch_size, lr_projection=lr_projection, lr_heads=lr_heads,
                         finetune_blocks=finetune_blocks, lr_blocks=lr_blocks, seed=seed,
                         negative_fraction=negative_fraction)
    result = train_files(feats, split, config, out=out, val_split=val_split, device=device,
                         progress=not no_progress, command=shlex.join(["dcfeat", *sys.argv[1:]]),
                         memory_budget=memory_budget)
    last = result.epochs[-1]
    val = f", val LR@1 {100 * result.epochs[result.best_epoch - 1]['val_lr1']:.1f} % (best epoch " \
          f"{result.best_epoch})" if "val_lr1" in last else ""
    stdout.print(f"run {result.out}: {result.classes} classes from {result.images_used} images, "
                 f"{len(result.epochs)} epochs in {result.seconds:.1f} s "
                 f"({last['seconds']:.2f} s/epoch), train accuracy {100 * last['train_accuracy']:.1f} %{val}; "
                 f"split {'streamed from disk' if result.streamed else 'in memory'}, "
                 f"budget {human_bytes(result.memory_budget)}; confidence {result.calibration}")
