"""`dcfeat export`: a run folder with its model card, ready to share (dcfeat.export)."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.cli.common import stdout


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.argument("out", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--with-backbone", is_flag=True, help="Also copy the run's backbone checkpoint (a local folder: "
              "config.json and safetensors) into DIR/backbone/, which `Localizer` and `dcfeat serve` then load.")
@click.option("--license", "license_id", metavar="SPDX", help="The license of the exported model, an SPDX id (apache-2.0, "
              "mit, cc-by-4.0, cc-by-nc-4.0, …, or `other`), written to the card's metadata `license:` [default: not "
              "stated: the weights learnt from your photos, whose terms you know].")
@click.option("--dataset-name", metavar="NAME", help="The data set the run was trained on (a Hugging Face dataset id "
              "or its name), in the card and its metadata `datasets:`.")
def export(run_dir, out, with_backbone, license_id, dataset_name):
    """Copy a run into a new folder DIR with a model card (README.md with Hugging Face metadata: license, data
    set, backbone, how the features were made, the area its cells cover, training command, calibration, the
    metrics of its evaluations, limits), ready for `hf upload`: no file names a path of this machine.
    `dcfeat serve --run DIR` and `Localizer.from_run(DIR)` load it as it is."""
    from dcfeat.backbone import RANDOM_NOTICE
    from dcfeat.export import export_run
    from dcfeat.progress import stderr

    result = export_run(run_dir, out, with_backbone=with_backbone, license=license_id, dataset_name=dataset_name)
    evaluated = f", metrics of {', '.join(result.reports)}" if result.reports else ", not evaluated"
    stdout.print(f"exported {run_dir} → {result.directory} ({len(result.files)} files{evaluated}); upload it with "
                 f"`hf upload USER/NAME {result.directory}`", highlight=False, soft_wrap=True)
    if result.run.random_backbone:
        stderr.print(f"[yellow]{RANDOM_NOTICE}[/yellow]")
    if result.run.status_line():
        stderr.print(f"[yellow]{result.run.status_line()}[/yellow]")
