"""`dcfeat extract`: options of the extraction stage, and its summary line."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.choices import (
    CROPS,
    DEFAULT_MODEL,
    DEFAULT_SHARD_ROWS,
    DESCRIPTOR_POOLING,
    HUB_PREFIX,
    POOLINGS,
    STORE_DTYPES,
)
from dcfeat.cli.common import DEFAULT_STORE, no_progress, random_backbone_model, random_backbone_option, stdout
from dcfeat.cli.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    device_option,
    split_name,
    workers_option,
)


@click.command()
@click.option("--images", type=click.Path(path_type=Path), help="Folder searched recursively for images "
              "named @UTM_east@UTM_north@zone@letter@lat@lon@…@.jpg (SF-XL style) or, whatever their names, carrying "
              "EXIF GPS (phone photos); with --manifest, the folder its paths are relative to.")
@click.option("--manifest", type=click.Path(path_type=Path), help="CSV/Parquet with a path column and "
              "utm_east, utm_north, utm_zone, utm_letter or lat, lon (optional heading) columns; a row that gives "
              "no position takes its image's SF-XL name's or EXIF GPS'.")
@click.option("--path-column", default="path", show_default=True, help="Manifest column holding image paths.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store (HDF5); labels go to OUT's .labels/ folder beside it.")
@click.option("--split", default="train", show_default=True, callback=split_name,
              help="Split to write (train, val, test, test-db, …).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="DINOv2 or DINOv3 ViT hub id (facebook/dinov2-small|base|large|giant, …-with-registers-…, "
              "facebook/dinov3-vit*16-…) or local directory; or a torch.hub VPR model (MegaLoc, CosPlace, "
              f"EigenPlaces, BoQ, SALAD): {HUB_PREFIX}OWNER/REPO:ENTRY or {HUB_PREFIX}/path/to/clone:ENTRY, the "
              "entry's keyword arguments after a ? (ENTRY?key=value&key=value). Loading runs the repository's "
              "hubconf.py: name only repositories you trust.")
@random_backbone_option("To try the pipeline offline; a run trained on these features predicts and serves with "
                        "--random-backbone.")
@click.option("--pooling", type=click.Choice(list(POOLINGS)), default=None,
              help="; ".join(f"{name}: {what}" for name, what in POOLINGS.items()) + " [default: cls; a torch.hub "
              f"model pools its own features, recorded as '{DESCRIPTOR_POOLING}', and takes no --pooling].")
@click.option("--image-size", type=AT_LEAST_1, default=224, show_default=True,
              help="Centre crop size (--crop centre) or shorter side of the whole image (--crop full), a multiple "
              "of the model's patch size (14 for DINOv2, 16 for DINOv3; any size for a torch.hub model unless it "
              "needs multiples).")
@click.option("--crop", type=click.Choice(list(CROPS)), default="centre", show_default=True,
              help="centre: " + CROPS["centre"] + "; full: " + CROPS["full"] + ", the backbone interpolating its "
              "position embeddings. Part of the split's identity: a run refuses features cropped the other way.")
@click.option("--batch-size", type=AT_LEAST_1, default=64, show_default=True,
              help="Images per forward pass (--crop full: per batch, which runs one forward pass per image shape).")
@workers_option
@device_option
@click.option("--draft/--no-draft", default=True, show_default=True,
              help="Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale before the bicubic resize.")
@click.option("--dtype", type=click.Choice(STORE_DTYPES), default=STORE_DTYPES[0], show_default=True,
              help="Storage type of the embeddings.")
@click.option("--shard-rows", type=AT_LEAST_1, default=DEFAULT_SHARD_ROWS, show_default=True, help="Images per shard (the unit of resume).")
@click.option("--unlabelled", is_flag=True, help="Photos whose positions are unknown, any file names: cached for "
              "`dcfeat predict --feats OUT --split SPLIT` (train, calibrate and evaluate refuse such a split).")
@click.option("--overwrite", is_flag=True, help="Replace an existing split made from other images or settings.")
@click.option("--cache-tokens", type=AT_LEAST_0, default=0, show_default=True, help="Also store every image's tokens entering "
              "the last K blocks, for `dcfeat train --finetune-blocks K` (ViT-B/14 at 224: 386 KB per image; "
              "a shard's tokens are held in memory, so lower --shard-rows, e.g. 1024). Not with --crop full (token "
              "counts differ between image shapes).")
@no_progress
def extract(images, manifest, path_column, out, split, model, random_backbone, pooling, image_size, crop, batch_size,
            workers, device, draft, dtype, shard_rows, unlabelled, overwrite, cache_tokens, no_progress):
    """Compute frozen DINOv2/DINOv3 features (or a torch.hub VPR model's descriptors) of images once and cache
    them in a feature store.

    Resumable: after a crash, run the same command again. For several GPUs or
    nodes run it under `torchrun --nproc-per-node K -m dcfeat extract …`.
    """
    from dcfeat.checkpoints import check_obtainable

    if random_backbone:
        given = click.get_current_context().get_parameter_source("model") != click.core.ParameterSource.DEFAULT
        model = random_backbone_model(model_given=given)
    else:
        check_obtainable(model)  # offline, a hub id is refused here, before torch is imported (seconds)
    from dcfeat.backbone import RANDOM_NOTICE
    from dcfeat.extract import extract_files
    from dcfeat.progress import stderr

    result = extract_files(images, out, split, manifest=manifest, path_column=path_column, model=model,
                           pooling=pooling, device=device, image_size=image_size, batch_size=batch_size,
                           workers=workers, draft=draft, dtype=dtype, shard_rows=shard_rows, overwrite=overwrite,
                           progress=not no_progress, cache_tokens=cache_tokens, crop=crop, labelled=not unlabelled)
    if result.rank:
        return
    if result.already_complete:
        stdout.print(f"{out} split '{split}' is already complete ({result.rows} rows); nothing to do.")
    else:
        stdout.print(f"{out} split '{split}': {result.rows} rows written, {result.failures} failures, "
                     f"{result.seconds:.1f} s, {result.images_per_s:.1f} images/s")
    for image_id, reason in [*result.failed_examples, *result.unread]:
        stderr.print(f"skipped {image_id}: {reason}", markup=False, highlight=False)
    if result.random_init:
        stderr.print(f"[yellow]{RANDOM_NOTICE}[/yellow]")
