"""Training settings (TrainConfig) and the presets that fill them (torch-free: the command line reads them for its defaults).

Two presets: `dcfeat` (the defaults, chosen by the sweep of BENCHMARKS.md) and `dc-paper`, the
choices of the official D&C code (github.com/ga1i13o/Divide-and-Classify: parser.py, train.py,
classifiers.py, test.py) wherever they differ from dcfeat's. Any field can still be set on its own
on top of a preset. The one D&C choice no preset can make is the test-time image (the whole image
resized, not a centre crop): it belongs to the features, `dcfeat extract --crop full`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dcfeat.choices import DEFAULT_M, DEFAULT_N, MIN_IMAGES_PER_CLASS, THRESHOLD_M, TRAIN_CHOICES
from dcfeat.errors import BadInput


@dataclass
class TrainConfig:
    """Every setting of `dcfeat train`; the defaults are the `dcfeat` preset (`preset_config` for another)."""

    preset: str = "dcfeat"  # the preset the other fields started from, recorded with the run
    M: float = DEFAULT_M
    N: int = DEFAULT_N
    min_images_per_class: int = MIN_IMAGES_PER_CLASS
    head: str = "aamc"
    # Defaults chosen by val LR@1 in the sweep of BENCHMARKS.md ("Training defaults").
    s: float = 30.0
    m: float = 0.4
    # Past θ = π − m: False keeps the target logit falling (insightface); True drops the margin
    # wherever cos θ ≤ 0 ("easy margin", D&C). AAMC only.
    easy_margin: bool = False
    dim: int | None = 512  # None: the features' own width (D&C's projection keeps the backbone's)
    epochs: int = 10
    iterations_per_epoch: int | None = None  # None: one epoch draws as many samples as there are images in classes
    batch_size: int = 256
    group_rotation: str = "step"  # groups take turns every step, or one group trains a whole epoch
    # The order groups take turns in: by group id, or as each is first met in the split's rows (sorted
    # by image id), which is D&C's code's (its datasets.py builds the groups while reading the images).
    group_order: str = "id"
    optimizer: str = "adamw"
    lr_projection: float = 1e-3
    lr_heads: float = 1e-3
    weight_decay: float = 1e-4
    lr_schedule: str = "none"
    prototype_init: str = "class-means"
    test_prototypes: str = "normalised"  # inference scores cos θ, or h·w with the prototypes as trained
    keep: str = "best-val"  # the epoch saved: best val LR@1 (the last without a val split), or lowest train loss
    seed: int = 0
    threshold_m: float = THRESHOLD_M
    # K > 0: also tune the last K DINOv2 blocks on cached tokens (dcfeat.finetune). Their rate is
    # 100× below the projection's, as CosPlace tunes its backbone (1e-5) beside 1e-2 heads: the
    # pretrained blocks move little, so the prototypes initialised on their output stay valid.
    finetune_blocks: int = 0
    lr_blocks: float = 1e-5
    # r < 1: each step scores the batch's classes plus a random r of the group's other classes
    # (PartialFC); for groups of hundreds of thousands of classes. 1 is the exact loss.
    negative_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise BadInput(f"preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        for name, allowed in TRAIN_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise BadInput(f"{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")


PRESETS: dict[str, dict] = {
    "dcfeat": {},
    # D&C's parser.py defaults and train.py. epochs: its --epochs_num 500, a ceiling: training also
    # ends once the plateau schedule's third cut takes the projection's rate below 1e-6. Its Adam
    # takes torch's default weight decay, 0. Its projection keeps the backbone's width (dim None:
    # the features' own), and it trains the groups in the order it first meets them in its sorted images.
    "dc-paper": {"s": 100.0, "m": 0.2, "easy_margin": True, "optimizer": "adam", "lr_projection": 1e-4,
                 "lr_heads": 1e-2, "weight_decay": 0.0, "lr_schedule": "plateau", "batch_size": 64,
                 "epochs": 500, "iterations_per_epoch": 2000, "group_rotation": "epoch",
                 "prototype_init": "xavier", "test_prototypes": "raw", "keep": "lowest-train-loss",
                 "group_order": "first-seen", "dim": None},
}


def preset_config(preset: str = "dcfeat", **overrides) -> TrainConfig:
    """The preset's settings, then each override that is not None."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(TrainConfig(), preset=preset, **{**PRESETS.get(preset, {}), **given})  # checked there


# What a field set to None means, for --help.
NONE_MEANS = {"iterations_per_epoch": "one pass", "dim": "the features' width"}


def preset_values(name: str) -> str:
    """A field's value in every preset, for --help: "dcfeat: 30, dc-paper: 100"."""
    def show(v):
        return NONE_MEANS[name] if v is None else f"{v:g}" if isinstance(v, float) else str(v).lower()
    return ", ".join(f"{p}: {show(getattr(preset_config(p), name))}" for p in PRESETS)
