"""`dcfeat calibrate`: fit an existing run's confidence and 90 % radius on a held-out split."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.choices import THRESHOLD_M
from dcfeat.cli.common import DATA, DEFAULT_STORE, stdout, warn
from dcfeat.cli.options import POSITIVE, device_option, split_name


@click.command()
@click.option("--split", default="val", show_default=True, callback=split_name,
              help="Held-out split to fit on: never the training split, nor a test split (one named test…, or one "
              "this run was evaluated on) without --allow-test-split.")
@click.option("--feats", type=click.Path(path_type=Path), default=DEFAULT_STORE, show_default=True,
              help="Feature store holding the split.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=DATA / "runs" / "latest",
              show_default=True, help="Run folder written by `dcfeat train`.")
@click.option("--database-split", default=None, callback=split_name, help="Also fit, against this database split "
              "(e.g. test-db): the fused hybrid's rule and its confidence (used by `evaluate --mode fused` and "
              "`predict`/`serve --database`), the hybrid's gate, and a confidence that uses retrieval's agreement "
              "(`evaluate` uses it when it retrieves from the same split).")
@click.option("--threshold", type=POSITIVE, default=THRESHOLD_M, show_default=True,
              help="Metres within which an answer counts as right.")
@click.option("--allow-test-split", is_flag=True, help="Fit on a test split all the same (its figures in "
              "`dcfeat evaluate` are then optimistic, and the report says so).")
@device_option
def calibrate(split, feats, run_dir, database_split, threshold, allow_test_split, device):
    """Fit the run's confidence (probability that the top-1 answer is right) and its 90 % radius.

    `dcfeat train --val-split` does this at the end of training; run it on a run trained without one,
    or to refit on another held-out split. Writes RUN/calibration.json.
    """
    from dcfeat.calibrate import calibrate_files
    from dcfeat.confidence import DEFAULT_GATE

    result = calibrate_files(feats, run_dir, split, threshold_m=threshold, device=device,
                             database_split=database_split, allow_test_split=allow_test_split)
    cal = result.calibrator
    fitted = cal.fitted_on
    stdout.print(f"calibrated on '{split}' ({fitted.queries} queries, {fitted.right} right at {threshold:g} m): "
                 f"answers weigh the top cells within {cal.rule.radius_m:g} m of the best (temperature "
                 f"{cal.rule.temperature:g}); 90 % radius = {cal.radius_scale:.2f} × the top cells' radius; the hybrid "
                 f"searches the cells holding {100 * (cal.gate or DEFAULT_GATE).mass:g} % of the probability"
                 f"{'' if cal.gate else ' (default: no --database-split to fit it on)'}, the adaptive one the whole "
                 f"database below confidence {cal.hybrid.fallback_below:.2f}")
    if cal.with_database is not None:
        stdout.print(f"and a confidence with retrieval's agreement against '{database_split}', used where "
                     "`dcfeat evaluate` retrieves from it")
    if cal.fused is not None:
        f = cal.fused.rule
        stdout.print(f"the fused hybrid: the photos of the cells holding {100 * f.mass:g} % of the probability, weighed "
                     f"at temperature {f.temperature:g} and posterior power {f.posterior:g}, answered from the best "
                     f"{f.radius_m:g} m neighbourhood; the whole database below confidence {f.fallback_below:.2f} "
                     f"(`dcfeat index` then `--database DB`)")
    stdout.print(f"calibration: {result.path}", highlight=False)
    warn(result.warnings)
