"""`dcfeat index`: options of the indexing stage (a cell-sorted database of a split's photos), its summary."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.choices import SPACES
from dcfeat.cli.common import DEFAULT_RUN, DEFAULT_STORE, no_progress, stdout, warn
from dcfeat.cli.options import device_option, split_name


@click.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=DEFAULT_RUN, show_default=True,
              help="Run folder written by `dcfeat train`: its cells file the photos, its projection embeds them.")
@click.option("--feats", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store holding the split.")
@click.option("--split", default="test-db", show_default=True, callback=split_name,
              help="The database photos' split.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Database folder to write (new), or with --add to append to.")
@click.option("--space", type=click.Choice(list(SPACES)), default=None,
              help="Descriptors the database holds: " + "; ".join(f"{name}: {what}" for name, what in SPACES.items())
              + ". [default: projected; with --add the database's own]")
@click.option("--add", is_flag=True, help="Append the split's photos to the database at --out (atomic; run again "
              "after a crash: the same database results; a split added already adds nothing).")
@device_option
@no_progress
def index(run_dir, feats, split, out, space, add, device, no_progress):
    """Write a database of a split's photos sorted by the run's cells, for the hybrids (`evaluate --database`,
    `predict --database`, `serve --database`: the fused hybrid's answers).

    Every photo is filed under its cell's class, or the nearest class's cell where its own cell is none;
    the hybrid then reads only the rows of its candidate cells, from disk.
    """
    from dcfeat.indexing import add_files, index_files

    if add:
        result = add_files(feats, run_dir, split, out, space=space, device=device, progress=not no_progress)
    else:
        result = index_files(feats, run_dir, split, out, space=space or "projected", device=device,
                             progress=not no_progress)
    db = result.database
    stdout.print(f"{'added' if add else 'indexed'} {result.added:,} photos of '{split}' "
                 f"({result.outside:,} outside every class cell, filed under the nearest); database {out}: "
                 f"{db.rows:,} rows in {db.cells():,} cells, {len(db.segments)} segment(s), {db.space}, "
                 f"{db.dim} dims", highlight=False, soft_wrap=True)
    warn(result.warnings)
