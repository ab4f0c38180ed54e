"""Where a Hugging Face hub checkpoint's weights come from: the local cache, else the hub if it answers now.

Torch-free, so that `dcfeat extract` can refuse a checkpoint it cannot get before it imports torch
(seconds): offline, the hub's own client retries a missing file for ~26 s before it gives up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dcfeat.choices import HUB_PREFIX, RANDOM_VIT_DIR
from dcfeat.errors import EnvironmentProblem

PROBE_TIMEOUT_S = 2.0  # the one request asking whether the hub answers (hub_unreachable)


def looks_like_path(model: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else the user typed is meant as a folder."""
    return (Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
            or (os.sep != "/" and os.sep in model))


def cached_checkpoint(model: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of hub id `model` when it holds a whole safetensors
    checkpoint (config.json and every weights file), else None. Reads only the disk."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid repo id
        return None
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    if (folder / "model.safetensors").is_file():
        return folder
    try:  # a sharded checkpoint: every shard its index names
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folder if shards and all((folder / s).is_file() for s in shards) else None


def hub_unreachable(timeout_s: float | None = None) -> str | None:
    """Why the Hugging Face hub cannot be asked for weights now, or None when it answers.

    One request, no retries, within `timeout_s` (default PROBE_TIMEOUT_S, or HF_HUB_ETAG_TIMEOUT where
    it is set): offline, the hub's own client retries a missing file for ~26 s before it gives up.
    """
    from huggingface_hub import constants, get_session, is_offline_mode

    if is_offline_mode():
        return "offline: HF_HUB_OFFLINE is set"
    timeout_s = timeout_s or float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)  # any HTTP answer means it is reachable
    except Exception as e:  # noqa: BLE001  no route, DNS, proxy, TLS, timeout: each means no weights from the hub
        first = str(e).splitlines()[0][:120] if str(e) else ""
        return f"no connection to {constants.ENDPOINT} ({type(e).__name__}: {first})"
    return None


def missing_weights(model: str, why: str) -> EnvironmentProblem:
    """The hub checkpoint `model` is neither in the local cache nor downloadable (`why`): the fixes that need
    no network."""
    return EnvironmentProblem(
        f"--model {model}: its weights are not in the local Hugging Face cache and cannot be downloaded ({why}). "
        f"Without network: pass --random-backbone (a randomly initialised DINOv2-S/14, saved once under "
        f"data/{RANDOM_VIT_DIR}/; every number it gives is labelled RANDOM BACKBONE and measures the pipeline, "
        f"not DINOv2), or --model DIR with a checkpoint folder: `dcfeat demo` saves the same random model in "
        f"data/demo/{RANDOM_VIT_DIR}/, and a pretrained one is `hf download {model} --local-dir DIR` run once where "
        "there is network (or set HF_HOME to a cache that holds it)")


def hub_source(model: str) -> str:
    """What to load hub id `model` from: its snapshot folder in the local cache when that holds the whole
    checkpoint (no request), else the id itself once the hub answers; offline, `missing_weights` at once."""
    cached = cached_checkpoint(model)
    if cached is not None:
        return str(cached)
    why = hub_unreachable()
    if why:
        raise missing_weights(model, why)
    return model


def check_obtainable(model: str) -> None:
    """Refuse at once a --model naming a hub checkpoint that is neither cached nor downloadable now; a
    folder, a path or a torch.hub entry is checked where it loads."""
    if not (model.startswith(HUB_PREFIX) or looks_like_path(model) or Path(model).expanduser().exists()):
        hub_source(model)
