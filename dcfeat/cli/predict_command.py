"""`dcfeat predict`: options of the prediction stage, and what it wrote or skipped."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from dcfeat.choices import SCORINGS
from dcfeat.cli.common import DATA, no_progress, random_backbone_model, random_backbone_option, stdout
from dcfeat.cli.options import (
    AT_LEAST_1,
    FRACTION,
    device_option,
    split_name,
    workers_option,
)


@click.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=DATA / "runs" / "latest",
              show_default=True, help="Run folder written by `dcfeat train`.")
@click.option("--images", type=click.Path(path_type=Path), multiple=True, help="An image file or a folder of images "
              "(searched recursively; any file names); repeat for several. With --manifest: the one folder its paths "
              "are relative to.")
@click.option("--manifest", type=click.Path(path_type=Path), help="CSV/TSV/Parquet listing the images to predict "
              "(optional lat/lon or UTM columns: each answer's error_m).")
@click.option("--path-column", default="path", show_default=True, help="Manifest column holding image paths.")
@click.option("--feats", type=click.Path(path_type=Path), help="Predict from a cached split of this store instead.")
@click.option("--split", default=None, callback=split_name, help="With --feats: the split to predict.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("predictions.parquet"), show_default=True,
              help="Output file: .parquet, .csv or .geojson.")
@click.option("--k", type=AT_LEAST_1, default=5, show_default=True, help="Cells per image, best first.")
@click.option("--scoring", type=click.Choice(list(SCORINGS)), default="cosine", show_default=True,
              help="cosine: probability = softmax at scale s over all cells' cosines (dot products for runs trained "
              "with --test-prototypes raw); group-softmax: each cell's probability "
              "under its own group's classifier (D&C Eq. 4.19-4.20), also used to rank.")
@click.option("--model", default=None, help="Backbone [default: the one the run's features came from]: a "
              "checkpoint folder or a torch.hub model string (torchhub:/path/to/clone:ENTRY…) whose weights must be "
              "the same (checked by fingerprint).")
@random_backbone_option("Only for a run trained on features that `dcfeat extract --random-backbone` made (the "
                        "weights' fingerprint is checked).")
@click.option("--batch-size", type=AT_LEAST_1, default=64, show_default=True, help="Images per forward pass.")
@workers_option
@click.option("--min-confidence", type=FRACTION, default=None, help="Abstain below this calibrated confidence: "
              "such images stay in the output with abstained = true (needs a calibrated run).")
@click.option("--database", type=click.Path(path_type=Path), default=None,
              help="A database `dcfeat index` wrote for the run: answer with the fused hybrid, its photos of the "
              "candidate cells weighed with the cells (each answer names the photo it stands on).")
@click.option("--geojson-radius", is_flag=True, help="GeoJSON: draw each answer as its 90 % circle (a polygon) "
              "instead of a point (needs a calibrated run).")
@device_option
@no_progress
def predict(run_dir, images, manifest, path_column, feats, split, out, k, scoring, model, random_backbone, batch_size,
            workers, min_confidence, database, geojson_radius, device, no_progress):
    """Predict where new photos were taken: top-k cells with probabilities, UTM and lat/lon, with the
    answer's calibrated confidence and the radius holding the true position with probability 0.9."""
    from dcfeat.backbone import RANDOM_NOTICE
    from dcfeat.cli.tables import answers_table
    from dcfeat.predict import predict_files
    from dcfeat.progress import stderr

    if random_backbone:
        model = random_backbone_model(model_given=model is not None, run_dir=run_dir)
    result = predict_files(run_dir, out, images=images, manifest=manifest, path_column=path_column, feats=feats,
                           split=split, k=k, model=model, batch_size=batch_size, workers=workers, device=device,
                           progress=not no_progress, scoring=scoring, min_confidence=min_confidence,
                           geojson_radius=geojson_radius, database=database)
    first = result.frame.filter(result.frame["rank"] == 1)
    cells = int(result.frame["rank"].max() or 0)
    stdout.print(answers_table(result.frame))
    abstained = f", {int(first['abstained'].sum())} abstained (confidence < {min_confidence:g})" \
        if min_confidence is not None else ""
    if database is not None:
        fewer = f" (it weighs {cells} candidate photos at most)" if cells < k else ""
        what = f"{cells} fused-hybrid answers"
    else:
        fewer = f" (the run has {cells} classes)" if cells < k else ""
        what = f"top-{cells} cells"
    stdout.print(f"{first.height} images, {what} each{fewer}{abstained} → {result.path}", highlight=False)
    errors = result.errors
    if errors is not None:
        stdout.print(f"{errors['known']} of {first.height} images have a known position (manifest, SF-XL name, EXIF "
                     f"GPS or the split's labels): {100 * errors['within']:.1f} % answered within "
                     f"{errors['threshold_m']:g} m, median error {errors['median_m']:.1f} m (column error_m)",
                     highlight=False)
    warnings = [*result.warnings, *(f"skipped {image_id}: {reason}" for image_id, reason in result.skipped)]
    if result.run.calibration is None:
        warnings.append("UNCALIBRATED RUN: confidence and radius_m are empty; fit them with "
                        "`dcfeat calibrate --split val`")
    if geojson_radius and first["radius_m"].is_null().all() and result.path.suffix.lower() == ".geojson":
        warnings.append("--geojson-radius: no radius without a calibration; the answers are points")
    if result.random_backbone:
        warnings.append(RANDOM_NOTICE)
    if result.run.status_line():
        warnings.append(result.run.status_line())
    for line in warnings:
        stderr.print(f"[yellow]{escape(line)}[/yellow]")
