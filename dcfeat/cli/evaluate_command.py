"""`dcfeat evaluate`: options of the evaluation stage, its recall table and output paths."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.choices import DEFAULT_KS, MODES, SCORINGS, SPACES, THRESHOLD_M, WEIGHTS
from dcfeat.cli.common import DEFAULT_RUN, DEFAULT_STORE, stdout, warn
from dcfeat.cli.options import (
    AT_LEAST_0,
    AT_LEAST_1,
    POSITIVE,
    KList,
    device_option,
    split_name,
)
from dcfeat.errors import BadInput


@click.command()
@click.option("--split", default="test", show_default=True, callback=split_name, help="Query split.")
@click.option("--feats", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store holding the query (and database) split.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help=f"Run folder written by `dcfeat train` [default: {DEFAULT_RUN}]. `none`: no run, with --mode "
              "retrieve only: exact k-NN over the raw features (also what --mode retrieve does when the default "
              "holds no run).")
@click.option("--database-split", default=None, callback=split_name, help="Database split for retrieval and the hybrid "
              "(e.g. test-db), embedded and filed under the run's cells in memory.")
@click.option("--database", type=click.Path(path_type=Path), default=None,
              help="A database `dcfeat index` wrote for the run, in place of --database-split: the hybrid reads only "
              "its candidate cells' rows from disk (retrieval reads every row).")
@click.option("--mode", type=click.Choice([*MODES, "all"]), default=None,
              help="; ".join(f"{name}: {what}" for name, what in MODES.items()) + "; all: every mode the inputs "
              "allow. [default: all with --database-split or --database (adaptive if calibrated), else classify]")
@click.option("--space", type=click.Choice(list(SPACES)), default=None,
              help="Retrieval descriptors: " + "; ".join(f"{name}: {what}" for name, what in SPACES.items())
              + ". [default: projected with a run, raw without]")
@click.option("--scoring", type=click.Choice(list(SCORINGS)), default="cosine", show_default=True,
              help="Rank cells by " + "; ".join(f"{name}: {what}" for name, what in SCORINGS.items()) + ".")
@click.option("--cells", type=AT_LEAST_1, default=None,
              help="Hybrid: retrieve among the top-c cells' images [default: the fewest top cells holding the run's "
              "share of the probability, its gate fitted on val].")
@click.option("--weights", type=click.Choice(WEIGHTS), default=WEIGHTS[0], show_default=True,
              help="The model of the epoch training kept (train --keep), or of its last epoch (what D&C's script "
              "reports; its confidence was fitted for the kept one).")
@click.option("--repeats", type=AT_LEAST_1, default=3, show_default=True,
              help="Time each mode as the median of this many runs over the queries, after a warm-up.")
@click.option("--threshold", type=POSITIVE, default=THRESHOLD_M, show_default=True, help="Metres within which a prediction is right.")
@click.option("--k", "ks", type=KList(), default=",".join(map(str, DEFAULT_KS)), show_default=True, help="Comma-separated k of LR@k.")
@device_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: RUN/eval/SPLIT; without a run STORE_FOLDER/eval/STORE_NAME/SPLIT].")
@click.option("--grid", type=AT_LEAST_0, default=0, show_default=True,
              help="Draw this many queries (spread over the split) beside their top 4 answers' photos, green within "
              "--threshold, red beyond: grid_METHOD.png per method. Retrieval shows the photo it found, "
              "classification the database photo (else training photo) nearest to its answer; read from where "
              "`dcfeat extract` found them.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Draw the PNG plots: error_cdf.png, map_METHOD.png per method, and with a confidence "
              "risk_coverage.png and reliability.png. --no-plots writes only report.json and predictions.parquet "
              "(the same numbers) and loads no matplotlib.")
def evaluate(split, feats, run_dir, database_split, database, mode, space, scoring, cells, weights, repeats, threshold, ks,
             device, out, grid, plots):
    """Localisation recall LR@k of classification, retrieval and the hybrid, with plots.

    With no run (`--run none`, or none trained at the default) `--mode retrieve` evaluates the raw
    features: exact k-NN of the queries among the database split, for descriptors of any model.
    """
    from dcfeat.cli.tables import confidence_table, recall_table
    from dcfeat.evaluate import evaluate_files

    if mode == "all" and database_split is None and database is None:
        raise BadInput("--mode all needs --database-split (the database images' split, e.g. test-db) or --database DB")
    modes = None if mode in (None, "all") else (mode,)
    if run_dir is None:
        run_dir = DEFAULT_RUN if DEFAULT_RUN.exists() else None  # none trained here yet
    elif str(run_dir).lower() == "none":
        run_dir = None
    result = evaluate_files(feats, run_dir, split, database_split=database_split, database=database, modes=modes,
                            ks=ks, threshold_m=threshold, cells=cells, space=space, scoring=scoring, device=device, out=out,
                            repeats=repeats, weights=weights, grid=grid, plots=plots)
    report = result.report
    stdout.print(recall_table(report))
    if report["confidence"] is not None:
        stdout.print(confidence_table(report))
        stdout.print(f"coverage {100 * report['coverage']:.1f} % of queries lie in a class cell; device "
                     f"{report['device']}")
    for name, path in result.paths.items():
        stdout.print(f"{name}: {path}", highlight=False)
    warn(result.warnings)
