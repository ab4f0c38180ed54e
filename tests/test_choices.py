"""The registries of dcfeat.choices agree with what implements each choice, and drive the command line."""

import click
import pytest

from dcfeat import backbone, choices, heads, presets
from dcfeat.cli import cli


def test_every_named_choice_has_an_implementation_and_no_other():
    assert list(heads.HEAD_CLASSES) == list(choices.HEADS)
    assert list(backbone.POOLERS) == list(choices.POOLINGS)
    assert choices.TRAIN_CHOICES["head"] == tuple(choices.HEADS)
    assert choices.TRAIN_CHOICES["test_prototypes"] == tuple(choices.TEST_PROTOTYPES)


def _choices(command: str, option: str) -> list[str]:
    param = next(p for p in cli.commands[command].params if f"--{option}" in p.opts)
    assert isinstance(param.type, click.Choice)
    return list(param.type.choices)


@pytest.mark.parametrize("command,option,registry", [
    ("train", "head", choices.HEADS), ("train", "test-prototypes", choices.TEST_PROTOTYPES),
    ("evaluate", "space", choices.SPACES), ("evaluate", "scoring", choices.SCORINGS),
    ("predict", "scoring", choices.SCORINGS), ("extract", "pooling", choices.POOLINGS),
    ("extract", "crop", choices.CROPS), ("extract", "dtype", choices.STORE_DTYPES),
    ("train", "optimizer", choices.OPTIMIZERS), ("train", "lr-schedule", choices.LR_SCHEDULES),
    ("train", "group-rotation", choices.GROUP_ROTATIONS), ("train", "group-order", choices.GROUP_ORDERS),
    ("train", "prototype-init", choices.PROTOTYPE_INITS), ("train", "keep", choices.KEEPS)])
def test_the_command_line_offers_exactly_the_registered_choices(command, option, registry):
    assert _choices(command, option) == list(registry)


def test_evaluate_offers_every_mode_and_all():
    assert _choices("evaluate", "mode") == [*choices.MODES, "all"]


def test_defaults_come_from_the_package():
    params = {p.name: p for c in ("extract", "evaluate") for p in cli.commands[c].params}
    assert params["shard_rows"].default == choices.DEFAULT_SHARD_ROWS
    assert params["model"].default == choices.DEFAULT_MODEL
    assert params["cells"].default is None  # the run's posterior-mass gate
    assert params["threshold"].default == choices.THRESHOLD_M
