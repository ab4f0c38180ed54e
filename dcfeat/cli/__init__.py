"""Command line: parses options and calls one core function per stage (one module per command).

Exit codes: 0 success; 2 bad input (click's usage errors too); 3 damaged store; 4 damaged run;
5 incompatible features; 6 environment (missing weights, no CUDA, full disk, read-only folder, store
locked) — the kinds of dcfeat.errors, each printed as one message; 130 interrupted (Ctrl-C, which
prints "interrupted"). 1 with a traceback is a bug.
"""

from __future__ import annotations

import sys

import click

from dcfeat.cli.calibrate_command import calibrate
from dcfeat.cli.demo_command import demo
from dcfeat.cli.evaluate_command import evaluate
from dcfeat.cli.export_command import export
from dcfeat.cli.extract_command import extract
from dcfeat.cli.import_command import import_command
from dcfeat.cli.index_command import index
from dcfeat.cli.info_command import info
from dcfeat.cli.options import UserErrorsGroup
from dcfeat.cli.predict_command import predict
from dcfeat.cli.serve_command import serve
from dcfeat.cli.train_command import train


@click.group(cls=UserErrorsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dcfeat")
def cli():
    """Visual place recognition by classification (Divide&Classify) on cached DINOv2 features."""


for command in (extract, import_command, info, train, calibrate, index, evaluate, predict, serve, export, demo):
    cli.add_command(command)


def main(argv=None):
    cli.main(args=argv, prog_name="dcfeat")


if __name__ == "__main__":
    sys.exit(main())
