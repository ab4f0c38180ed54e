"""`dcfeat demo`: the whole method on a rendered synthetic city, offline.

Renders street photos (dcfeat.synthetic), extracts features of train, val, test
queries and test database, trains, and evaluates classification, retrieval and
the hybrid side by side. The backbone is pretrained `facebook/dinov2-small`,
from the local Hugging Face cache or downloaded where the network allows;
offline (HF_HUB_OFFLINE, no connection) or with --random-backbone a randomly
initialised DINOv2 of the same architecture, and every number is labelled as such.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download, try_to_load_from_cache

from dcfeat.backbone import load_backbone, save_random_vit
from dcfeat.evaluate import evaluate_files
from dcfeat.extract import extract_files
from dcfeat.progress import stderr
from dcfeat.synthetic.photos import CITY_FILE, is_incomplete_rendering, render_city
from dcfeat.train import TrainConfig, train_files

PRETRAINED = "facebook/dinov2-small"
SPLITS = ("train", "val", "test", "test-db")


@dataclass
class DemoResult:
    report: dict
    paths: dict
    seconds: dict  # per stage
    model: str
    random_backbone: bool


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")


def demo_backbone(root: Path, *, prefer_pretrained: bool = True) -> str:
    """Pretrained `facebook/dinov2-small` (downloaded once, ~90 MB, with progress, where the network
    allows), else a saved random DINOv2-S/14; says which, and why, on stderr."""
    if prefer_pretrained:
        if isinstance(try_to_load_from_cache(PRETRAINED, "model.safetensors"), str):
            stderr.print(f"backbone: pretrained {PRETRAINED}, from the local Hugging Face cache")
            return PRETRAINED
        if _offline():
            why = "offline: HF_HUB_OFFLINE is set and the weights are not in the local cache"
        else:
            try:
                snapshot_download(PRETRAINED, allow_patterns=["*.json", "*.safetensors"])
                stderr.print(f"backbone: pretrained {PRETRAINED}, downloaded to the Hugging Face cache")
                return PRETRAINED
            except Exception as e:  # noqa: BLE001  any failure to fetch (no route, DNS, proxy, HTTP) means offline
                why = f"no connection to the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    else:
        why = "--random-backbone"
    stderr.print(f"[yellow]backbone: a randomly initialised DINOv2-S/14 ({why})[/yellow]")
    path = root / "dinov2-small-random"
    if not (path / "config.json").is_file():
        save_random_vit("vits14", path)
    return str(path)


def run_demo(root: Path = Path("data/demo"), *, streets: int = 4, spacing_m: float = 4.0, image_size: int = 224,
             epochs: int = 10, workers: int | None = None, device: str = "auto", progress: bool = True,
             prefer_pretrained: bool = True, model: str | None = None) -> DemoResult:
    """Render (once; an interrupted rendering is rendered again), extract (resumable), train a new run,
    evaluate all modes."""
    root = Path(root)
    images = root / "images"
    store = root / "feats.h5"
    seconds = {}
    t = time.perf_counter()
    if (images / CITY_FILE).is_file():
        stderr.print(f"[bold]1/4 render[/bold] reusing the synthetic city in {images} ({CITY_FILE})")
    else:
        if is_incomplete_rendering(images):
            stderr.print(f"[yellow]{images} holds an interrupted rendering (no {CITY_FILE}): rendering it "
                         "again[/yellow]")
            shutil.rmtree(images)
        stderr.print(f"[bold]1/4 render[/bold] synthetic city → {images}")
        render_city(images, streets=streets, spacing_m=spacing_m)
    seconds["render"] = time.perf_counter() - t

    t = time.perf_counter()
    model = model or demo_backbone(root, prefer_pretrained=prefer_pretrained)
    backbone = load_backbone(model, device=device)
    for split in SPLITS:
        stderr.print(f"[bold]2/4 extract[/bold] {split} with {model}")
        extract_files(images / split, store, split, backbone=backbone, image_size=image_size,
                                  workers=workers, progress=progress)
    if backbone.random_init:
        stderr.print(f"[yellow]Backbone {model} is randomly initialised: the numbers below measure the pipeline, "
                     "not DINOv2.[/yellow]")
    seconds["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    stderr.print("[bold]3/4 train[/bold]")
    result = train_files(store, "train", TrainConfig(epochs=epochs), val_split="val", device=device,
                         progress=progress, command="dcfeat demo")
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    stderr.print("[bold]4/4 evaluate[/bold] test queries against test-db")
    evaluation = evaluate_files(store, result.out, "test", database_split="test-db", device=device)
    seconds["evaluate"] = time.perf_counter() - t
    return DemoResult(report=evaluation.report, paths=evaluation.paths, seconds=seconds, model=backbone.name,
                      random_backbone=backbone.random_init)
