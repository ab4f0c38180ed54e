"""`dcfeat demo`: the synthetic city end to end."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.cli.common import DATA, no_progress, stdout
from dcfeat.cli.options import (
    AT_LEAST_1,
    device_option,
    workers_option,
)


@click.command()
@click.option("--root", type=click.Path(path_type=Path), default=DATA / "demo", show_default=True,
              help="Folder for the rendered images, the store and the runs.")
@click.option("--streets", type=click.IntRange(min=2), default=4, show_default=True, help="Streets per side of the city grid.")
@click.option("--image-size", type=AT_LEAST_1, default=224, show_default=True,
              help="Backbone crop size (a multiple of the model's patch size).")
@click.option("--epochs", type=AT_LEAST_1, default=10, show_default=True, help="Training epochs.")
@workers_option
@device_option
@click.option("--random-backbone", is_flag=True, help="Use a random DINOv2-S/14 instead of pretrained "
              "facebook/dinov2-small (downloaded once, ~90 MB, where the network allows).")
@no_progress
def demo(root, streets, image_size, epochs, workers, device, random_backbone, no_progress):
    """Render a synthetic city, then extract, train and evaluate on it; then train and evaluate on the synthetic
    feature city (no images, no backbone), where the method learns even with no pretrained weights."""
    from dcfeat.cli.tables import recall_table
    from dcfeat.demo import FEATURE_CITY_NOTICE, run_demo

    result = run_demo(root, streets=streets, image_size=image_size, epochs=epochs, workers=workers, device=device,
                      progress=not no_progress, prefer_pretrained=not random_backbone)
    stdout.print(recall_table(result.report, what=f"rendered photos, backbone {result.model}"))
    for name, path in result.paths.items():
        stdout.print(f"{name}: {path}", highlight=False)
    if result.city_report is not None:
        stdout.print(recall_table(result.city_report, what=f"feature city: {FEATURE_CITY_NOTICE}"))
        stdout.print(f"feature city report: {result.city_paths['report']}", highlight=False)
    stdout.print("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
                 + f"; backbone {result.model}")
