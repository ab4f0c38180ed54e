"""Command line: parses options and calls one core function per stage.

Exit codes: 0 success; 2 bad input (click's usage errors too); 3 damaged store; 4 damaged run;
5 incompatible features; 6 environment (missing weights, no CUDA, full disk, store locked) —
the kinds of dcfeat.errors, each printed as one message. 1 with a traceback is a bug.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
from rich.console import Console

from dcfeat.backbone import DEFAULT_MODEL, POOLINGS
from dcfeat.demo import run_demo
from dcfeat.errors import DamagedStore, human_bytes
from dcfeat.evaluate import evaluate_files
from dcfeat.extract import extract_files
from dcfeat.heads import SCORINGS
from dcfeat.info import problems_table, splits_table
from dcfeat.metrics import DEFAULT_KS, THRESHOLD_M
from dcfeat.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    MARGIN,
    POSITIVE,
    KList,
    Size,
    UserErrorsGroup,
    split_name,
)
from dcfeat.predict import predict_files
from dcfeat.reports import RANDOM_NOTICE, recall_table
from dcfeat.runs import verified_run
from dcfeat.store import list_splits, read_failures
from dcfeat.train import TrainConfig, train_files
from dcfeat.verify import verify_store

DATA = Path("data")
DEFAULT_STORE = DATA / "feats.h5"
TRAIN_DEFAULTS = TrainConfig()
# Wide enough for the tables when piped (rich falls back to 80 columns without a terminal).
stdout = Console(width=None if sys.stdout.isatty() else 160)


@click.group(cls=UserErrorsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dcfeat")
def cli():
    """Visual place recognition by classification (Divide&Classify) on cached DINOv2 features."""


no_progress = click.option("--no-progress", is_flag=True, help="Do not draw progress bars on stderr.")


@cli.command()
@click.option("--images", type=click.Path(path_type=Path), help="Folder searched recursively for images "
              "named @UTM_east@UTM_north@zone@letter@lat@lon@…@.jpg (SF-XL style); with --manifest, "
              "the folder its paths are relative to.")
@click.option("--manifest", type=click.Path(path_type=Path), help="CSV/Parquet with a path column and "
              "utm_east, utm_north, utm_zone, utm_letter or lat, lon (optional heading) columns.")
@click.option("--path-column", default="path", show_default=True, help="Manifest column holding image paths.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store (HDF5); labels go to OUT's .labels/ folder beside it.")
@click.option("--split", default="train", show_default=True, callback=split_name,
              help="Split to write (train, val, test, test-db, …).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="DINOv2 or DINOv3 ViT hub id (facebook/dinov2-small|base|large|giant, …-with-registers-…, "
              "facebook/dinov3-vit*16-…) or local directory.")
@click.option("--pooling", type=click.Choice(list(POOLINGS)), default="cls", show_default=True,
              help="CLS token, mean or GeM of patch tokens, or CLS and mean concatenated.")
@click.option("--image-size", type=AT_LEAST_1, default=224, show_default=True,
              help="Centre crop size, a multiple of the model's patch size (14 for DINOv2, 16 for DINOv3); "
              "the shortest edge is first resized to size·256/224.")
@click.option("--batch-size", type=AT_LEAST_1, default=64, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=AT_LEAST_0, default=None,
              help="DataLoader decoding processes [default: min(16, CPUs)].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--draft/--no-draft", default=True, show_default=True,
              help="Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale before the bicubic resize.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the embeddings.")
@click.option("--shard-rows", type=AT_LEAST_1, default=8192, show_default=True, help="Images per shard (the unit of resume).")
@click.option("--overwrite", is_flag=True, help="Replace an existing split made from other images or settings.")
@click.option("--cache-tokens", type=AT_LEAST_0, default=0, show_default=True, help="Also store every image's tokens entering "
              "the last K blocks, for `dcfeat train --finetune-blocks K` (ViT-B/14 at 224: 386 KB per image; "
              "a shard's tokens are held in memory, so lower --shard-rows, e.g. 1024).")
@no_progress
def extract(images, manifest, path_column, out, split, model, pooling, image_size, batch_size, workers, device,
            draft, dtype, shard_rows, overwrite, cache_tokens, no_progress):
    """Compute frozen DINOv2/DINOv3 features of images once and cache them in a feature store.

    Resumable: after a crash, run the same command again. For several GPUs or
    nodes run it under `torchrun --nproc-per-node K -m dcfeat extract …`.
    """
    result = extract_files(images, out, split, manifest=manifest, path_column=path_column, model=model,
                           pooling=pooling, device=device, image_size=image_size, batch_size=batch_size,
                           workers=workers, draft=draft, dtype=dtype, shard_rows=shard_rows, overwrite=overwrite,
                           progress=not no_progress, cache_tokens=cache_tokens)
    if result.rank:
        return
    if result.already_complete:
        stdout.print(f"{out} split '{split}' is already complete ({result.rows} rows); nothing to do.")
    else:
        stdout.print(f"{out} split '{split}': {result.rows} rows written, {result.failures} failures, "
                     f"{result.seconds:.1f} s, {result.images_per_s:.1f} images/s")
    for image_id, reason in result.failed_examples:
        stdout.print(f"  skipped {image_id}: {reason}", markup=False, highlight=False)
    if result.random_init:
        stdout.print(f"[yellow]{RANDOM_NOTICE}[/yellow]")


@cli.command()
@click.argument("store", metavar="STORE|RUN", type=click.Path(path_type=Path), default=DEFAULT_STORE)
@click.option("--failures", "show_failures", is_flag=True, help="List every skipped image with its reason.")
@click.option("--verify", is_flag=True, help="Open every shard and check its rows and checksum and the labels; "
              "list each problem with what to do (exit code 3 when the store is damaged).")
def info(store, show_failures, verify):
    """Show the splits of a feature store (rows, dim, model, completeness, size, failures), or check a run folder."""
    if store.is_dir():
        run = verified_run(store)
        stdout.print(f"verified: run {store} loads ({len(run.classes)} classes) and finished training")
        return
    splits = list_splits(store)
    stdout.print(splits_table(store, splits))
    if show_failures:
        for s in splits:
            for image_id, reason in read_failures(store, s.name):
                stdout.print(f"{s.name}\t{image_id}\t{reason}", markup=False, highlight=False)
    if not splits:
        stdout.print("no splits")
    if verify:
        _, problems = verify_store(store)
        if problems:
            stdout.print(problems_table(problems))
        serious = [p for p in problems if p.serious]
        if serious:
            first = serious[0]
            raise DamagedStore(f"{store}: {len(serious)} problem(s) found, each listed above with what to do; "
                               f"the first: {first.where}: {first.what}")
        stdout.print(f"verified: every shard of {store} opens, holds the rows the store expects and matches "
                     "its checksum; the labels match the embeddings")


@cli.command()
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
                 f"budget {human_bytes(result.memory_budget)}")


@cli.command()
@click.option("--split", default="test", show_default=True, callback=split_name, help="Query split.")
@click.option("--feats", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store holding the query (and database) split.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=DATA / "runs" / "latest",
              show_default=True, help="Run folder written by `dcfeat train`.")
@click.option("--database-split", default=None, callback=split_name, help="Database split for retrieval and the hybrid "
              "(e.g. test-db).")
@click.option("--mode", type=click.Choice(["classify", "retrieve", "hybrid", "all"]), default=None,
              help="[default: all with --database-split, else classify]")
@click.option("--space", type=click.Choice(["projected", "raw"]), default="projected", show_default=True,
              help="Retrieval descriptors: the run's learned embedding or the raw backbone features.")
@click.option("--scoring", type=click.Choice(SCORINGS), default="cosine", show_default=True,
              help="Rank cells by cosine to the prototypes, or by each group's softmax probability (D&C Eq. 4.19-4.20).")
@click.option("--cells", type=AT_LEAST_1, default=5, show_default=True, help="Hybrid: retrieve among the top-c cells' images.")
@click.option("--threshold", type=POSITIVE, default=THRESHOLD_M, show_default=True, help="Metres within which a prediction is right.")
@click.option("--k", "ks", type=KList(), default=",".join(map(str, DEFAULT_KS)), show_default=True, help="Comma-separated k of LR@k.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: RUN/eval/SPLIT].")
def evaluate(split, feats, run_dir, database_split, mode, space, scoring, cells, threshold, ks, device, out):
    """Localisation recall LR@k of classification, retrieval and the hybrid, with plots."""
    modes = None if mode is None else (("classify", "retrieve", "hybrid") if mode == "all" else (mode,))
    report, paths = evaluate_files(feats, run_dir, split, database_split=database_split, modes=modes, ks=ks,
                                   threshold_m=threshold, cells=cells, space=space, scoring=scoring,
                                   device=device, out=out)
    stdout.print(recall_table(report))
    stdout.print(f"coverage {100 * report['coverage']:.1f} % of queries lie in a class cell; device {report['device']}")
    for name, path in paths.items():
        stdout.print(f"{name}: {path}", highlight=False)


@cli.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=DATA / "runs" / "latest",
              show_default=True, help="Run folder written by `dcfeat train`.")
@click.option("--images", type=click.Path(path_type=Path), help="Folder of new images (any file names).")
@click.option("--manifest", type=click.Path(path_type=Path), help="CSV/TSV/Parquet listing the images to predict.")
@click.option("--path-column", default="path", show_default=True, help="Manifest column holding image paths.")
@click.option("--feats", type=click.Path(path_type=Path), help="Predict from a cached split of this store instead.")
@click.option("--split", default=None, callback=split_name, help="With --feats: the split to predict.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("predictions.parquet"), show_default=True,
              help="Output file: .parquet, .csv or .geojson.")
@click.option("--k", type=AT_LEAST_1, default=5, show_default=True, help="Cells per image, best first.")
@click.option("--scoring", type=click.Choice(SCORINGS), default="cosine", show_default=True,
              help="cosine: probability = softmax at scale s over all cells; group-softmax: each cell's probability "
              "under its own group's classifier (D&C Eq. 4.19-4.20), also used to rank.")
@click.option("--model", default=None, help="Backbone [default: the one the run's features came from]; its "
              "weights must be the same (checked).")
@click.option("--batch-size", type=AT_LEAST_1, default=64, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=AT_LEAST_0, default=0, show_default=True, help="DataLoader decoding processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@no_progress
def predict(run_dir, images, manifest, path_column, feats, split, out, k, scoring, model, batch_size, workers,
            device, no_progress):
    """Predict where new photos were taken: top-k cells with probabilities, UTM and lat/lon."""
    result = predict_files(run_dir, out, images=images, manifest=manifest, path_column=path_column, feats=feats,
                           split=split, k=k, model=model, batch_size=batch_size, workers=workers, device=device,
                           progress=not no_progress, scoring=scoring)
    stdout.print(f"{result.frame['image_id'].n_unique()} images, top-{k} cells each → {result.path}")
    for image_id, reason in result.skipped:
        stdout.print(f"  skipped {image_id}: {reason}", markup=False, highlight=False)
    if result.random_backbone:
        stdout.print(f"[yellow]{RANDOM_NOTICE}[/yellow]")
    if result.run.status_line():
        stdout.print(f"[yellow]{result.run.status_line()}[/yellow]")


@cli.command()
@click.option("--root", type=click.Path(path_type=Path), default=DATA / "demo", show_default=True,
              help="Folder for the rendered images, the store and the runs.")
@click.option("--streets", type=click.IntRange(min=2), default=4, show_default=True, help="Streets per side of the city grid.")
@click.option("--image-size", type=AT_LEAST_1, default=224, show_default=True,
              help="Backbone crop size (a multiple of the model's patch size).")
@click.option("--epochs", type=AT_LEAST_1, default=10, show_default=True, help="Training epochs.")
@click.option("--workers", type=AT_LEAST_0, default=None, help="Decoding processes [default: min(16, CPUs)].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--random-backbone", is_flag=True, help="Use a random DINOv2-S/14 instead of pretrained "
              "facebook/dinov2-small (downloaded once, ~90 MB, where the network allows).")
@no_progress
def demo(root, streets, image_size, epochs, workers, device, random_backbone, no_progress):
    """Render a synthetic city, then extract, train and evaluate on it."""
    result = run_demo(root, streets=streets, image_size=image_size, epochs=epochs, workers=workers, device=device,
                      progress=not no_progress, prefer_pretrained=not random_backbone)
    stdout.print(recall_table(result.report))
    stdout.print("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
                 + f"; backbone {result.model}")
    for name, path in result.paths.items():
        stdout.print(f"{name}: {path}", highlight=False)


def main(argv=None):
    cli.main(args=argv, prog_name="dcfeat")


if __name__ == "__main__":
    sys.exit(main())
