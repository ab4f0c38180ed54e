"""The choices a user makes by name, and the defaults the commands show: one registry each, torch-free.

Each registry maps a name to what it means (the command line's help says it), or lists the
names. The modules that implement a choice key their own tables by these names
(`heads.HEAD_CLASSES`, `backbone.POOLERS`; tests check the keys agree), `presets.TrainConfig`
checks its fields against `TRAIN_CHOICES`, and the command line builds its options from here
without loading torch, so `dcfeat --help` answers at once.
"""

from __future__ import annotations

# The partition of D&C (and train's defaults): cells of side M metres, N² groups, a cell a class from this
# many training images.
DEFAULT_M = 20.0
DEFAULT_N = 2
MIN_IMAGES_PER_CLASS = 10

# The threshold of the VPR literature (a query is localised if an answer lies within it), and the k of LR@k.
THRESHOLD_M = 25.0
DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)

# evaluate --weights: which model of a run `run.load_run` reads.
WEIGHTS = ("kept", "last")

# --head: the per-group classifier (dcfeat.heads).
HEADS = {
    "aamc": "additive angular margin, target logit s·cos(θ + m) (ArcFace; D&C's head)",
    "lmcc": "large margin cosine, target logit s·(cos θ − m) (CosFace; CosPlace's head)",
    "softmax": "a plain linear layer with bias, no scale or margin (PlaNet-style ablation)",
}
# train --optimizer, --lr-schedule, --group-rotation, --group-order, --prototype-init, --keep (dcfeat.train).
OPTIMIZERS = ("adamw", "adam")
LR_SCHEDULES = ("none", "plateau")
GROUP_ROTATIONS = ("step", "epoch")
GROUP_ORDERS = ("id", "first-seen")
PROTOTYPE_INITS = ("class-means", "xavier")
KEEPS = ("best-val", "lowest-train-loss")
# --test-prototypes: what "cosine" ranking compares an embedding with.
TEST_PROTOTYPES = {
    "normalised": "the unit prototypes: cells ranked by cos θ (the paper's rule)",
    "raw": "the prototypes as trained: cells ranked by h·w (D&C's code)",
}
# presets.TrainConfig's fields that name a choice → their allowed names (train's options offer these).
TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS,
    "lr_schedule": LR_SCHEDULES,
    "group_rotation": GROUP_ROTATIONS,
    "head": tuple(HEADS),
    "test_prototypes": tuple(TEST_PROTOTYPES),
    "prototype_init": PROTOTYPE_INITS,
    "keep": KEEPS,
    "group_order": GROUP_ORDERS,
}
# --scoring: how a query's cells are ranked across groups (dcfeat.heads.GroupHeads.scores).
SCORINGS = {
    "cosine": "cosine to the prototypes (h·w for runs trained with --test-prototypes raw)",
    "group-softmax": "each cell's softmax probability within its own group (D&C Eq. 4.19-4.20)",
}
# --mode of `dcfeat evaluate` (dcfeat.evaluate).
MODES = {
    "classify": "the top-k cells over every group's prototypes; the answer is a position weighed from the top "
                "cells' centres (the best cell's centre is reported beside it as classify-centre)",
    "retrieve": "exact cosine k-NN against the database split (the NetVLAD/CosPlace way; with no run, over the "
                "raw features)",
    "hybrid": "retrieval among the database images inside the top --cells cells (D&C)",
    "fused": "the database photos of the candidate cells weighed by their cell's posterior and their similarity; "
             "the answer is the weighted centroid of the best-supported neighbourhood (fitted on val)",
    "adaptive": "the gated hybrid, and exact retrieval for the least sure queries (a calibrated run)",
}
# The method `classify` also reports: the D&C paper's answer, the best cell's centre, beside the position.
CENTRE_METHOD = "classify-centre"
# --space: the descriptors retrieval compares.
SPACES = {
    "projected": "the run's learned embedding",
    "raw": "the raw backbone features",
}
# --pooling: the feature of an image from the backbone's final tokens (dcfeat.backbone.POOLERS).
POOLINGS = {
    "cls": "the CLS token (pooler_output)",
    "mean": "the mean of the patch tokens",
    "gem": "generalised mean (p = 3) of the patch tokens",
    "cls+mean": "the CLS token and the patch mean, concatenated (twice the width)",
}
# The pooling of features that no backbone of dcfeat pooled (synthetic cities, other tools' descriptors
# brought in by `dcfeat import`): no image can be embedded into their space here.
NO_POOLING = "none"
# The pooling recorded for features of a torch.hub descriptor model (dcfeat.hub), which pools its own.
DESCRIPTOR_POOLING = "descriptor"
# --model: a torch.hub entry instead of a DINOv2/DINOv3 checkpoint (dcfeat.hub).
HUB_PREFIX = "torchhub:"
# --crop: what part of the image the backbone sees (dcfeat.images); "centre" is what stores
# written before `crop` existed hold.
CROPS = {
    "centre": "shortest edge resized to size·256/224, then a size×size centre crop (DINOv2's evaluation transform)",
    "full": "the whole image, shorter side resized to size and the longer one in proportion, rounded to a "
            "multiple of the patch size (D&C's test images)",
}
# `dcfeat import --crop`: the crop of descriptors another tool computed, where the user knows it.
UNKNOWN_CROP = "unknown"
# --device: where dcfeat computes. Its kernels, precision and memory checks know the CPU and CUDA only.
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"
DEVICES = "auto, cpu, cuda or cuda:N"
# --dtype: how embeddings are stored.
STORE_DTYPES = ("float16", "float32")

DEFAULT_MODEL = "facebook/dinov2-base"
# --random-backbone: the folder name of the saved randomly initialised DINOv2-S/14 (backbone.random_vit).
RANDOM_VIT_DIR = "dinov2-small-random"
DEFAULT_SHARD_ROWS = 8192  # images per shard file: the unit of resume
