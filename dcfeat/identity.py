"""What makes features compatible: the attributes that identify them, compared between a store's splits and a run.

Features made with other weights, pooling or crop live in another space and must not be mixed: not in one store (the split writer refuses), not between a run's training
features and the features it is applied to (evaluate, calibrate, predict refuse). Each
refusal names what differs and the `dcfeat extract` option that makes features that fit.

The weights are compared by their fingerprint (every tensor and the architecture), never by
the name they were loaded under: `facebook/dinov2-base` on one machine and `./dinov2-base`
on another, or a checkpoint folder copied elsewhere, are the same model. The name is recorded
for people, and compared only where a side has no fingerprint (stores of other programs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from dcfeat.errors import IncompatibleFeatures

FINGERPRINT_VERSION = "v2"  # v1 hashed the path and 8 tensors; the prefix keeps v1 values from ever matching

# Attributes that must agree between splits of one store, and between a run's training features
# and the features it is applied to. The image size is not one: the same weights, pooling and crop
# at another resolution give features of the same space (D&C trains at 224 and tests at Resize(256)),
# so a test split may be extracted at another --image-size; it is recorded with each split and run.
IDENTITY_ATTRS = ("model_fingerprint", "pooling", "crop", "dim")
# What a run records of its training features: the identity, the model's name for people, the size.
RECORDED_ATTRS = ("model", *IDENTITY_ATTRS, "image_size")
# Identity attributes younger than the stores (and runs) that lack them, read as what those were made with.
ATTR_DEFAULTS = {"crop": "centre"}
# The extract option that sets an identity attribute, for messages naming the fix.
IDENTITY_OPTIONS = {"model": "--model", "model_fingerprint": "--model", "pooling": "--pooling",
                    "image_size": "--image-size", "crop": "--crop"}


def weights_fingerprint(architecture: str, state: Mapping, *, hash_name: str = "sha256") -> str:
    """Identifies the function some weights compute: a text that names the architecture, then every
    tensor of the state dict (name, shape, dtype, bytes), never a path.

    Hash the tensors in the dtype they are stored in, before any cast to the run's dtype, so a bf16 GPU
    run and an fp32 CPU run of one checkpoint agree. sha256 because OpenSSL's SHA-NI path hashes ~2.5x
    faster than blake2b on these CPUs (pipelines/bench_fingerprint.py).
    """
    import torch  # here, not at import: the store and run readers that import this module need no torch

    h = hashlib.new(hash_name, architecture.encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        # Raw bytes through the buffer protocol: no float copy; a uint8 view also covers bf16.
        h.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return f"{FINGERPRINT_VERSION}-{h.hexdigest()[:16]}"


def with_defaults(attrs: dict) -> dict:
    """Split, plan or run-feature attributes with ATTR_DEFAULTS where they predate an attribute."""
    return {**ATTR_DEFAULTS, **attrs}


def identity_diff(a: dict, b: dict) -> dict[str, tuple]:
    """Identity attributes whose values differ between `a` and `b`; one that either lacks is not compared.
    The model's name counts only where either side lacks the fingerprint."""
    keys = IDENTITY_ATTRS if a.get("model_fingerprint") and b.get("model_fingerprint") else ("model", *IDENTITY_ATTRS)
    return {k: (a[k], b[k]) for k in keys if k in a and k in b and a[k] != b[k]}


def _shown(diff: dict[str, tuple], first: str = "") -> str:
    return "; ".join(f"{k}: {first}{a!r} vs {b!r}" for k, (a, b) in diff.items())


def check_compatible(existing: dict, new: dict, *, what: str, fix: str) -> None:
    """Refuse mixing the splits of one store that do not belong together."""
    diff = identity_diff(existing, new)
    if diff:
        raise IncompatibleFeatures(f"{what} do not belong together ({_shown(diff)}). {fix}")


def check_features(run_features: dict, split_attrs: dict, *, what: str) -> None:
    """Refuse to apply a run to features from other weights, pooling, size, crop or dim."""
    diff = identity_diff(run_features, split_attrs)
    if diff:
        name = run_features.get("model_source") or run_features.get("model")
        value = {**run_features, "model": name, "model_fingerprint": name}
        options = " ".join(dict.fromkeys(f"{IDENTITY_OPTIONS[k]} {value[k]}" for k in diff if k in IDENTITY_OPTIONS))
        raise IncompatibleFeatures(f"{what} was made by another backbone or setting than the run's training "
                                   f"features ({_shown(diff, 'run ')}); extract it with the run's "
                                   f"{options or '--model/--pooling/--image-size/--crop'}")
