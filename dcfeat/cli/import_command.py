"""`dcfeat import`: options of the import stage (descriptors another tool computed), and its summary line."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.choices import CROPS, DEFAULT_SHARD_ROWS, STORE_DTYPES, UNKNOWN_CROP
from dcfeat.cli.common import DEFAULT_STORE, stdout
from dcfeat.cli.options import AT_LEAST_0, AT_LEAST_1, split_name


@click.command("import")
@click.option("--descriptors", type=click.Path(path_type=Path), required=True,
              help="(images, D) descriptors: .npy (ids from --ids), .npz or .h5/.hdf5 (arrays `descriptors` or "
              "`embeddings` and `ids`; a feature store's /SPLIT/embeddings too), or .parquet (an id column and a list "
              "column, or one numeric column per dimension). Rows keep their order.")
@click.option("--ids", type=click.Path(path_type=Path), help="Text file, one image id (path or file name) per line "
              "in row order, for files that hold no ids.")
@click.option("--id-column", default=None, help="Parquet: the id column [default: the first of ids, image_id, path, "
              "id, image].")
@click.option("--model-name", required=True, help="What computed the descriptors (e.g. MegaLoc): the features' "
              "identity. Splits imported under one name and width mix; others are refused.")
@click.option("--manifest", type=click.Path(path_type=Path), help="CSV/Parquet labelling the ids: a path column and "
              "utm_east, utm_north, utm_zone, utm_letter or lat, lon (optional heading) columns, as for extract "
              "[default: labels from SF-XL style ids @UTM_east@UTM_north@zone@letter@lat@lon@…@.jpg].")
@click.option("--path-column", default="path", show_default=True, help="Manifest column holding image paths.")
@click.option("--images", type=click.Path(path_type=Path), help="Folder the ids (and the manifest's paths) are "
              "relative to; absolute ids are made relative to it [default: the manifest's folder; without a "
              "manifest the ids are kept as given].")
@click.option("--unlabelled", is_flag=True, help="Photos whose positions are unknown: cached for `dcfeat predict "
              "--feats OUT --split SPLIT` (train, calibrate and evaluate refuse such a split).")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store (HDF5); labels go to OUT's .labels/ folder beside it.")
@click.option("--split", default="train", show_default=True, callback=split_name,
              help="Split to write (train, val, test, test-db, …).")
@click.option("--image-size", type=AT_LEAST_0, default=0, show_default=True,
              help="The images' size the descriptors were computed at, for the record (0: unknown).")
@click.option("--crop", type=click.Choice([*CROPS, UNKNOWN_CROP]), default=UNKNOWN_CROP, show_default=True,
              help="How the images were cropped, part of the identity (splits of another crop are refused).")
@click.option("--dtype", type=click.Choice(STORE_DTYPES), default=STORE_DTYPES[0], show_default=True,
              help="Storage type of the descriptors.")
@click.option("--shard-rows", type=AT_LEAST_1, default=DEFAULT_SHARD_ROWS, show_default=True,
              help="Descriptors per shard (the unit of resume).")
@click.option("--overwrite", is_flag=True, help="Replace an existing split made from other descriptors or settings.")
def import_command(descriptors, ids, id_column, model_name, manifest, path_column, images, unlabelled, out, split,
                   image_size, crop, dtype, shard_rows, overwrite):
    """Bring descriptors another tool computed (MegaLoc, CosPlace, …) into a feature store split.

    Train, evaluate and predict --feats then use it as an extracted split. A run trained on it has
    no backbone to embed photos: predict and serve take descriptors, not images.
    """
    from dcfeat.ingest import import_descriptors

    result = import_descriptors(descriptors, out, split, model_name=model_name, ids=ids, manifest=manifest,
                                path_column=path_column, images=images, labelled=not unlabelled, id_column=id_column,
                                image_size=image_size, crop=crop, dtype=dtype, shard_rows=shard_rows,
                                overwrite=overwrite)
    if result.already_complete:
        stdout.print(f"{out} split '{split}' already holds these {result.rows:,} descriptors; nothing to do.",
                     highlight=False)
    else:
        stdout.print(f"{out} split '{split}': {result.rows:,} descriptors of {result.dim} values imported as "
                     f"{result.model} ({'unlabelled' if not result.labelled else 'labelled'}), "
                     f"{result.seconds:.1f} s", highlight=False)
