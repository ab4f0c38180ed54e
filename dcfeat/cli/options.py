"""Checked command-line values (range-checked by click before anything is created) and how user errors print."""

from __future__ import annotations

import errno
import math
import re
from pathlib import Path

import click

from dcfeat.choices import DEVICE_PATTERN, DEVICES
from dcfeat.errors import BadInput, DcfeatError, is_disk_full, write_problem
from dcfeat.layout import check_split_name


class Finite(click.FloatRange):
    """A float in a range that is also finite (click's FloatRange lets NaN through every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class KList(click.ParamType):
    """Comma-separated k of LR@k, each >= 1: "1,5,10,20" → (1, 5, 10, 20), sorted, unique."""

    name = "k,k,…"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            ks = tuple(sorted({int(k) for k in str(value).split(",")}))
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated integers like 1,5,10,20", param, ctx)
        if ks[0] < 1:
            self.fail(f"{value!r}: every k must be at least 1", param, ctx)
        return ks


class Size(click.ParamType):
    """A size in bytes with a unit: 512MB, 2GB, 1.5G, 800k (binary multiples); or "auto" (None)."""

    name = "size"
    UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
             "t": 1 << 40, "tb": 1 << 40}

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or str(value).lower() == "auto":
            return None if value is None or str(value).lower() == "auto" else value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgtb")
        try:
            size = float(number) * self.UNITS[text[len(number):]]
        except (ValueError, KeyError):
            self.fail(f"{value!r}: expected a size with a unit, like 512MB or 2GB", param, ctx)
        if not math.isfinite(size) or size < 1:
            self.fail(f"{value!r}: a size must be positive", param, ctx)
        return int(size)


class Device(click.ParamType):
    """--device: auto, cpu, cuda or cuda:N, the devices dcfeat's kernels and precision know."""

    name = "device"

    def convert(self, value, param, ctx):
        if not re.fullmatch(DEVICE_PATTERN, str(value)):
            self.fail(f"{value!r}: choose {DEVICES} (torch's other devices, such as mps or meta, are not "
                      "supported)", param, ctx)
        return str(value)


def device_option(f):
    """The --device option every computing command shares."""
    return click.option("--device", type=Device(), default="auto", show_default=True, help=f"{DEVICES}.")(f)


def workers_option(f):
    """The --workers option of the commands that decode images (dcfeat.images.decoding_workers)."""
    return click.option("--workers", type=AT_LEAST_0, default=None,
                        help="DataLoader processes decoding images (0: the main process) [default: one per core, at "
                             "most 16, and none beyond the batches after the first, so that a few images decode in "
                             "the main process].")(f)


def split_name(ctx, param, value):
    """click callback: a split name that is safe as an HDF5 group and a folder name (or None)."""
    if value is None:
        return None
    try:
        return check_split_name(value)
    except BadInput as e:
        raise click.BadParameter(str(e).split(": ", 1)[1].replace("a split name", f"{value!r}: a split name", 1),
                                 ctx, param) from None


POSITIVE = Finite(min=0, min_open=True)
FRACTION = Finite(min=0, max=1, min_open=True)
AT_LEAST_1 = click.IntRange(min=1)
AT_LEAST_0 = click.IntRange(min=0)
# Near π/2 an additive angular margin pushes every target past the orthogonal, and CosFace's margin
# lives on cosines in [-1, 1]: either way a margin that large cannot train (the papers use 0.1-0.5).
MARGIN = Finite(min=0, max=1.5)
# Seeds torch's generators take (CPU and CUDA): 0 to 2^63 - 1.
SEED = click.IntRange(min=0, max=2 ** 63 - 1)
# Exit code of a command stopped with Ctrl-C: 128 + SIGINT, what shells report (1 is for bugs).
INTERRUPTED = 130


class _UserError(click.ClickException):
    """A DcfeatError as click shows it: "Error: <message>", exit code of its kind (dcfeat.errors)."""

    def __init__(self, error: DcfeatError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


class UserErrorsGroup(click.Group):
    """Runs a command; a DcfeatError (or a full disk, a read-only folder) becomes one message and its
    kind's exit code; Ctrl-C prints "interrupted" and exits 130. Lists its commands in the order they
    were added (the pipeline's), not alphabetically."""

    def list_commands(self, ctx):
        return list(self.commands)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DcfeatError as e:
            raise _UserError(e) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None
        except OSError as e:
            # Only errors a write alone raises: a refused read (EACCES) may be anything, and stays a bug.
            if not (is_disk_full(e) or e.errno == errno.EROFS):
                raise
            raise _UserError(write_problem(Path(e.filename).parent if e.filename else Path.cwd(), e)) from None
