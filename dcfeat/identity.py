"""What makes features compatible: the attributes that identify them, compared between a store's splits and a run.

Features made with other weights, pooling or crop live in another space and must not be mixed: not in one store (the split writer refuses), not between a run's training
features and the features it is applied to (evaluate, calibrate, predict refuse). Each
refusal names what differs and the `dcfeat extract` option that makes features that fit.

The weights are compared by their fingerprint (every tensor and the architecture), never by
the name they were loaded under: `facebook/dinov2-base` on one machine and `./dinov2-base`
on another, or a checkpoint folder copied elsewhere, are the same model. The name is recorded
for people, and compared only where a side has no fingerprint (stores of other programs).

Descriptors another tool computed (`dcfeat import`) come without the function that made them,
which dcfeat therefore cannot hash. Their fingerprint is a hash of the name the user gives them
(`--model-name`) and their width: splits imported under one name mix, splits of another name or
width are refused. It is only as true as the names: two different descriptors imported under one
name and width are not told apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from dcfeat.choices import CROPS, DESCRIPTOR_POOLING, NO_POOLING, POOLINGS, UNKNOWN_CROP
from dcfeat.errors import IncompatibleFeatures, OlderLayout, check_keys

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


# The model name (and fingerprint) of imported descriptors start with this: `imported:MegaLoc`.
IMPORTED = "imported:"


def imported_identity(name: str, dim: int) -> dict:
    """The identity of descriptors named `name` (what `dcfeat import --model-name` records), `dim` wide:
    a fingerprint that is a stable function of the name and the width, and no backbone pooling."""
    digest = hashlib.sha256(f"{name}\n{dim}".encode()).hexdigest()[:16]
    return {"model": f"{IMPORTED}{name}", "model_source": f"{IMPORTED}{name}",
            "model_fingerprint": f"{IMPORTED}{digest}", "pooling": NO_POOLING, "dim": int(dim)}


def is_imported(attrs: dict) -> bool:
    """Whether features were brought in by `dcfeat import` (their fingerprint says so)."""
    return str(attrs.get("model_fingerprint") or "").startswith(IMPORTED)


def imported_name(attrs: dict) -> str:
    """The `--model-name` imported features were recorded under."""
    return str(attrs.get("model", "")).removeprefix(IMPORTED)


def weights_fingerprint(architecture: str, state: Mapping, *, hash_name: str = "sha256") -> str:
    """Identifies the function some weights compute: a text that names the architecture, then every
    tensor of the state dict (name, shape, dtype, bytes), never a path.

    Hash the tensors in the dtype they are stored in, before any cast to the run's dtype, so a bf16 GPU
    run and an fp32 CPU run of one checkpoint agree. sha256 because OpenSSL's SHA-NI path hashes ~2.5x
    faster than blake2b on these CPUs (`python -m pipelines.benchmarks run fingerprint`).
    """
    import torch  # here, not at import: the store and run readers that import this module need no torch

    h = hashlib.new(hash_name, architecture.encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        # Raw bytes through the buffer protocol: no float copy; a uint8 view also covers bf16.
        h.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return f"{FINGERPRINT_VERSION}-{h.hexdigest()[:16]}"


def model_source(attrs: dict) -> str | None:
    """What to load the features' backbone from again: the recorded source (hub id, folder or torch.hub
    string), else the model's name (stores and runs written before `model_source` existed)."""
    return attrs.get("model_source") or attrs.get("model")


def with_defaults(attrs: dict) -> dict:
    """Split, plan or run-feature attributes with ATTR_DEFAULTS where they predate an attribute."""
    return {**ATTR_DEFAULTS, **attrs}


@dataclass(frozen=True)
class FeatureIdentity:
    """What a run records of its training features (config.json's `features`): what features it is applied
    to must match (IDENTITY_ATTRS), and what the backbone is loaded from again. A field that is None was not
    recorded (a run trained from arrays, a store of another program) and is not compared."""

    dim: int  # values per descriptor
    model: str | None = None  # the backbone's name, for people
    model_source: str | None = None  # what to load the backbone from again (`model_source`)
    model_fingerprint: str | None = None
    pooling: str | None = None
    image_size: int | None = None
    crop: str | None = ATTR_DEFAULTS["crop"]  # what features of a crop not recorded are read as
    dtype: str | None = None  # how the store kept the embeddings (for the model card)
    backbone_random_init: bool | None = None  # a randomly initialised backbone: numbers measure the pipeline
    images_root: str | None = None  # where the training images were (for the model card)

    @classmethod
    def of_split(cls, attrs: dict) -> FeatureIdentity:
        """The identity of a split's features, from its attributes (ATTR_DEFAULTS where it predates one)."""
        attrs = with_defaults(attrs)
        return cls(**{f.name: attrs.get(f.name) for f in fields(cls)})

    def attrs(self) -> dict:
        """The recorded fields as split attributes are (`check_features`, `identity_diff`, `model_source`)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_dict(self) -> dict:
        """config.json's `features`: every field, null where not recorded."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> FeatureIdentity:
        """From config.json's `features`; ValueError naming every field that is wrong, OlderLayout where
        fields are missing (an older dcfeat's run)."""
        names = tuple(f.name for f in fields(cls))
        check_keys(d, names, "features")
        missing = [k for k in names if k not in d]
        if missing:
            raise OlderLayout(f"`features` lacks {', '.join(f'`{k}`' for k in missing)}")
        problems = feature_problems(d)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**d)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def feature_problems(features: dict) -> list[str]:
    """What is wrong with a run's recorded `features`, field by field. A field that is absent or null was
    not recorded and is not checked."""
    pooling, size, crop = features.get("pooling"), features.get("image_size"), features.get("crop")
    problems = []
    if not (_whole(features.get("dim")) and features["dim"] > 0):
        problems.append(f"`features.dim` is {features.get('dim')!r} (expected the features' width, a positive "
                        "integer)")
    if pooling is not None and pooling not in (*POOLINGS, DESCRIPTOR_POOLING, NO_POOLING):
        problems.append(f"`features.pooling` is {pooling!r} (expected one of {', '.join(POOLINGS)}, "
                        f"{DESCRIPTOR_POOLING} for a torch.hub model's descriptors, or {NO_POOLING} for features no "
                        "backbone pooled)")
    backbone = pooling != NO_POOLING
    if size is not None and not (_whole(size) and (size > 0 if backbone else size >= 0)):
        problems.append(f"`features.image_size` is {size!r} (expected the crop size in pixels, a positive integer"
                        + (", or 0 for features no backbone pooled)" if not backbone else ")"))
    crops = (*CROPS, UNKNOWN_CROP) if not backbone else tuple(CROPS)  # another tool's descriptors: maybe unknown
    if crop is not None and crop not in crops:
        problems.append(f"`features.crop` is {crop!r} (expected one of {', '.join(crops)})")
    for key in ("model", "model_source", "model_fingerprint", "dtype", "images_root"):
        if features.get(key) is not None and not isinstance(features[key], str):
            problems.append(f"`features.{key}` is {features[key]!r} (expected a text, or null)")
    if features.get("backbone_random_init") not in (None, True, False):
        problems.append(f"`features.backbone_random_init` is {features['backbone_random_init']!r} (expected true, "
                        "false or null)")
    return problems


def identity_diff(a: dict, b: dict) -> dict[str, tuple]:
    """Identity attributes whose values differ between `a` and `b`; one that either lacks is not compared.
    The model's name counts only where either side lacks the fingerprint."""
    keys = IDENTITY_ATTRS if a.get("model_fingerprint") and b.get("model_fingerprint") else ("model", *IDENTITY_ATTRS)
    return {k: (a[k], b[k]) for k in keys if k in a and k in b and a[k] != b[k]}


def _shown(diff: dict[str, tuple], first: str = "", models: tuple = ()) -> str:
    """The differences, with the models' names beside differing fingerprints (a hash says nothing to people)."""
    named = {k: (f"{a!r} ({models[0]!r})", f"{b!r} ({models[1]!r})") if k == "model_fingerprint" and all(models)
             else (repr(a), repr(b)) for k, (a, b) in diff.items()}
    return "; ".join(f"{k}: {first}{a} vs {b}" for k, (a, b) in named.items())


def _models(a: dict, b: dict) -> tuple:
    return a.get("model"), b.get("model")


def import_fix(attrs: dict) -> str:
    """How to make features that fit imported ones: import them under the same name and width."""
    return (f"import them with `dcfeat import --model-name {imported_name(attrs)}` ({attrs.get('dim')} values per "
            "descriptor), computed by the same tool and model")


def check_compatible(existing: dict, new: dict, *, what: str, fix: str) -> None:
    """Refuse mixing the splits of one store that do not belong together."""
    diff = identity_diff(existing, new)
    if diff:
        if is_imported(existing) or is_imported(new):
            fix = f"A store holds one kind of descriptor: {import_fix(existing)}, or write to another --out."
        raise IncompatibleFeatures(f"{what} do not belong together ({_shown(diff, models=_models(existing, new))}). "
                                   f"{fix}")


def check_features(run: FeatureIdentity, split_attrs: dict, *, what: str) -> None:
    """Refuse to apply a run to features from other weights, pooling, crop or dim (fields it recorded)."""
    run_features = run.attrs()
    diff = identity_diff(run_features, split_attrs)
    if not diff:
        return
    shown = _shown(diff, "run ", _models(run_features, split_attrs))
    if is_imported(run_features):
        raise IncompatibleFeatures(f"{what} holds other features than the run's training features ({shown}); "
                                   f"{import_fix(run_features)}")
    name = model_source(run_features)
    value = {**run_features, "model": name, "model_fingerprint": name}
    options = " ".join(dict.fromkeys(f"{IDENTITY_OPTIONS[k]} {value[k]}" for k in diff if k in IDENTITY_OPTIONS))
    raise IncompatibleFeatures(f"{what} was made by another backbone or setting than the run's training "
                               f"features ({shown}); extract it with the run's "
                               f"{options or '--model/--pooling/--image-size/--crop'}")
