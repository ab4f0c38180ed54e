"""`dcfeat demo`: the whole method on two synthetic cities, offline.

Rendered photos: renders street photos (dcfeat.synthetic), extracts features of train,
val, test queries and test database, trains, and evaluates classification, retrieval
and the hybrid side by side. The backbone is pretrained `facebook/dinov2-small`, from
the local Hugging Face cache or downloaded where the network allows; offline
(HF_HUB_OFFLINE, no connection) or with --random-backbone a randomly initialised DINOv2
of the same architecture, and every number is labelled as such: with it every query
looks alike and nothing is learnt.

Feature city: the synthetic city of backbone features (dcfeat.synthetic.features, the
one BENCHMARKS quotes: no images, no backbone) trained with the default TrainConfig and
evaluated against its database, so the method is seen learning with no network.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from dcfeat.backbone import load_backbone, random_vit
from dcfeat.checkpoints import cached_checkpoint, hub_unreachable
from dcfeat.choices import RANDOM_VIT_DIR
from dcfeat.calibrate import calibrate_files
from dcfeat.evaluate import evaluate_files
from dcfeat.extract import extract_files
from dcfeat.progress import stderr
from dcfeat.synthetic.features import FAMILY, make_city, write_city
from dcfeat.synthetic.photos import CITY_FILE, is_incomplete_rendering, render_city
from dcfeat.train import TrainConfig, train_files

PRETRAINED = "facebook/dinov2-small"
SPLITS = ("train", "val", "test", "test-db")
# The feature city: make_city's options. The default city, whose figures BENCHMARKS quotes (14,480 train
# rows, 745 classes): written, trained and evaluated in ~8 s on 2 CPU cores.
FEATURE_CITY = FAMILY["grid"]
FEATURE_CITY_NOTICE = "synthetic features (no images, no backbone)"


@dataclass
class DemoResult:
    report: dict  # the rendered photos' evaluation
    paths: dict
    seconds: dict  # per stage
    model: str
    random_backbone: bool
    city_report: dict | None = None  # the feature city's evaluation (None: not run)
    city_paths: dict | None = None


def demo_backbone(root: Path, *, prefer_pretrained: bool = True) -> str:
    """Pretrained `facebook/dinov2-small` (downloaded once, ~90 MB, with progress, where the network
    allows), else a saved random DINOv2-S/14; says which, and why, on stderr."""
    if prefer_pretrained:
        if cached_checkpoint(PRETRAINED) is not None:
            stderr.print(f"backbone: pretrained {PRETRAINED}, from the local Hugging Face cache")
            return PRETRAINED
        why = hub_unreachable()
        if why is None:
            try:
                snapshot_download(PRETRAINED, allow_patterns=["*.json", "*.safetensors"])
                stderr.print(f"backbone: pretrained {PRETRAINED}, downloaded to the Hugging Face cache")
                return PRETRAINED
            except Exception as e:  # noqa: BLE001  any failure to fetch (no route, DNS, proxy, HTTP) means offline
                why = f"no connection to the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    else:
        why = "--random-backbone"
    stderr.print(f"[yellow]backbone: a randomly initialised DINOv2-S/14 ({why})[/yellow]")
    return str(random_vit(root / RANDOM_VIT_DIR))


def feature_city(root: Path, city: dict = FEATURE_CITY, *, device: str = "auto", progress: bool = True):
    """The feature city (`make_city(**city)`) as a store in `root` (written once), a new run trained on it with
    the default TrainConfig (val split), calibrated on val against its database (the fused hybrid's rule with
    it), evaluated on its test queries against the database: the evaluation."""
    store = Path(root) / "feats.h5"
    write_city(make_city(**city), store)  # a complete split of the same city is kept as it is
    result = train_files(store, "train", TrainConfig(), val_split="val", device=device, progress=progress,
                         command="dcfeat demo (feature city)")
    calibrate_files(store, result.out, "val", device=device, database_split="test-db")
    return evaluate_files(store, result.out, "test", database_split="test-db", device=device)


def run_demo(root: Path = Path("data/demo"), *, streets: int = 4, spacing_m: float = 4.0, image_size: int = 224,
             epochs: int = 10, workers: int | None = None, device: str = "auto", progress: bool = True,
             prefer_pretrained: bool = True, model: str | None = None,
             city: dict | None = FEATURE_CITY) -> DemoResult:
    """Render (once; an interrupted rendering is rendered again), extract (resumable), train a new run,
    evaluate all modes; then the same on the feature city `make_city(**city)` in root/city (None: skipped)."""
    root = Path(root)
    images = root / "images"
    store = root / "feats.h5"
    seconds = {}
    t = time.perf_counter()
    if (images / CITY_FILE).is_file():
        stderr.print(f"[bold]1/5 render[/bold] reusing the synthetic city in {images} ({CITY_FILE})")
    else:
        if is_incomplete_rendering(images):
            stderr.print(f"[yellow]{images} holds an interrupted rendering (no {CITY_FILE}): rendering it "
                         "again[/yellow]")
            shutil.rmtree(images)
        stderr.print(f"[bold]1/5 render[/bold] synthetic city → {images}")
        render_city(images, streets=streets, spacing_m=spacing_m)
    seconds["render"] = time.perf_counter() - t

    t = time.perf_counter()
    model = model or demo_backbone(root, prefer_pretrained=prefer_pretrained)
    backbone = load_backbone(model, device=device)
    for split in SPLITS:
        stderr.print(f"[bold]2/5 extract[/bold] {split} with {model}")
        extract_files(images / split, store, split, backbone=backbone, image_size=image_size,
                                  workers=workers, progress=progress)
    if backbone.random_init:
        stderr.print(f"[yellow]Backbone {model} is randomly initialised: the numbers of the rendered photos measure "
                     "the pipeline, not DINOv2.[/yellow]")
    seconds["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    stderr.print("[bold]3/5 train[/bold]")
    result = train_files(store, "train", TrainConfig(epochs=epochs), val_split="val", device=device,
                         progress=progress, command="dcfeat demo")
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    stderr.print("[bold]4/5 evaluate[/bold] test queries against test-db")
    evaluation = evaluate_files(store, result.out, "test", database_split="test-db", device=device)
    seconds["evaluate"] = time.perf_counter() - t

    city_evaluation = None
    if city is not None:
        t = time.perf_counter()
        stderr.print(f"[bold]5/5 feature city[/bold] {FEATURE_CITY_NOTICE}: write, train, evaluate → {root / 'city'}")
        city_evaluation = feature_city(root / "city", city, device=device, progress=progress)
        seconds["feature city"] = time.perf_counter() - t
    return DemoResult(report=evaluation.report, paths=evaluation.paths, seconds=seconds, model=backbone.name,
                      random_backbone=backbone.random_init,
                      city_report=city_evaluation.report if city_evaluation else None,
                      city_paths=city_evaluation.paths if city_evaluation else None)
