"""`dcfeat info`: a store's splits, failures and verification, or a run folder's check."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.cli.common import DEFAULT_STORE, stdout
from dcfeat.errors import DamagedStore


@click.command()
@click.argument("store", metavar="STORE|RUN|DB", type=click.Path(path_type=Path), default=DEFAULT_STORE)
@click.option("--failures", "show_failures", is_flag=True, help="List every skipped image with its reason.")
@click.option("--verify", is_flag=True, help="Open every shard and check its rows and checksum and the labels; "
              "list each problem with what to do (exit code 3 when the store is damaged).")
def info(store, show_failures, verify):
    """Show the splits of a feature store (rows, dim, model, completeness, size, failures), check a run folder,
    or describe a database `dcfeat index` wrote (rows, cells, segments, the run it belongs to)."""
    from dcfeat.cli.tables import database_lines, problems_table, run_table, splits_table
    from dcfeat.database import MANIFEST, CellDatabase
    from dcfeat.run import verified_run
    from dcfeat.store import list_splits, read_failures
    from dcfeat.verify import verify_store

    if (store / MANIFEST).is_file():
        stdout.print(database_lines(CellDatabase.open(store)), highlight=False, soft_wrap=True)
        return
    if store.is_dir():
        run, checked = verified_run(store)
        stdout.print(run_table(run))
        sums = (f"{', '.join(checked)} match the checksums dcfeat recorded when it wrote them" if checked else
                "no checksums to compare (a run written before dcfeat recorded them in checksums.json)")
        stdout.print(f"verified: run {store} loads ({len(run.classes)} classes) and finished training; {sums}",
                     highlight=False)
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
