"""`python -m pipelines.benchmarks list | run NAME [options] | render` (see the package docstring)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path

import click

from pipelines.benchmarks import BENCHMARKS, records
from pipelines.benchmarks.render import BENCHMARKS_MD, render_all


def module(name: str):
    return importlib.import_module(f"pipelines.benchmarks.{name}")


def record_run(name: str, results: Path, options: dict) -> Path:
    """Measure benchmark `name` with `options` and record it under `results`; the record's path."""
    mod = module(name)
    head = records.header(gpu=getattr(mod, "GPU", False))
    if "rows" in inspect.signature(mod.measure).parameters:  # rows recorded as they come: a timeout keeps them
        path = records.new_path(results, name, head["date"], head["device"], ".jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(head) + "\n")

        def rows(row: dict) -> None:
            records.append_row(path, row)
            print(json.dumps(row), flush=True)

        mod.measure(rows=rows, **options)
        return path
    result = mod.measure(**options)
    head["load"]["after"] = os.getloadavg()[0]
    path = records.new_path(results, name, head["date"], head["device"], ".json")
    records.write(path, {**head, **result})
    if hasattr(mod, "figure"):  # drawn beside its record, named after it
        mod.figure(records.read(path), path.with_suffix(".png"))
    return path


class Runs(click.Group):
    """One subcommand per benchmark, with that benchmark's options."""

    def list_commands(self, ctx):
        return list(BENCHMARKS)

    def get_command(self, ctx, name):
        if name not in BENCHMARKS:
            return None

        def callback(results, **options):
            path = record_run(name, results, options)
            click.echo(f"recorded {path}")

        results = click.Option(["--results"], type=click.Path(file_okay=False, path_type=Path),
                               default=records.RESULTS, show_default=True,
                               help="Folder of the records (on a lent machine: $OUT, then copy the file here).")
        return click.Command(name, params=[*getattr(module(name), "OPTIONS", []), results], callback=callback,
                             help=BENCHMARKS[name], short_help=BENCHMARKS[name])


@click.group()
def main():
    """The project's benchmarks: measure one, or rewrite BENCHMARKS.md from what is recorded."""


@main.command("list")
def list_():
    """Every benchmark, with its latest record."""
    for name, what in BENCHMARKS.items():
        last = records.latest(name)
        click.echo(f"{name:14} {what}\n{'':14} latest: {last['file'] if last else 'none recorded'}")


main.add_command(Runs("run", help="Measure one benchmark and record it in pipelines/results/."))


@main.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=BENCHMARKS_MD, show_default=True)
def render(out):
    """Rewrite BENCHMARKS.md from the recorded results (nothing is measured)."""
    out.write_text(render_all({name: module(name).render for name in BENCHMARKS}))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
