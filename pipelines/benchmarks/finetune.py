"""Fine-tuning the last DINOv2 blocks from cached tokens: BENCHMARKS.md's step speed and city comparison.

`step_speed` times one training step on cached tokens against the same step
with the frozen first L − K blocks run on decoded images; `city_comparison`
extracts the rendered street city once with tokens and trains K = 0, 1, 2
side by side, each training in its own process so its peak memory is its own.

Inputs: none (the street city is rendered, the backbone is the demo's random DINOv2-S/14). Run from the
repository root: `python -m pipelines.benchmarks run finetune` (~10 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from dcfeat.backbone import load_backbone, save_random_vit
from dcfeat.finetune import load_tail
from dcfeat.images import normalize
from dcfeat.model import DCModel
from dcfeat.store import split_info
from dcfeat.synthetic.photos import render_city
from dcfeat.train import train_step
from pipelines.benchmarks.markdown import machine_load, measured, not_measured, table


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_speed(model_dir: Path, K: int, *, batch_size: int = 32, image_size: int = 224, classes: int = 1000,
               repeats: int = 3) -> dict:
    """Samples/s of a K-block fine-tuning step on cached tokens vs on decoded images (CPU)."""
    backbone = load_backbone(str(model_dir), device="cpu")
    tail = load_tail({"model_source": str(model_dir), "pooling": "cls", "model_fingerprint": backbone.fingerprint},
                     K, K)
    model = DCModel(backbone.dim, 512, [classes], head="aamc", s=30.0, m=0.4)
    params = [*model.parameters(), *tail.tuned.parameters(), *tail.layernorm.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    crops = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8)
    labels = torch.randint(classes, (batch_size,))
    net = backbone.model
    L = backbone.num_layers
    with torch.no_grad():
        tokens = net.embeddings(normalize(crops, torch.float32))
        for layer in net.encoder.layer[:L - K]:
            tokens = layer(tokens)

    def update(feats):  # the step `train` runs; gradients reach the tuned blocks through feats
        train_step(model, opt, 0, feats, labels)

    def from_images():
        with torch.no_grad():
            x = net.embeddings(normalize(crops, torch.float32))
            for layer in net.encoder.layer[:L - K]:
                x = layer(x)
        update(tail(x))

    cached = _median_seconds(lambda: update(tail(tokens)), repeats)
    full = _median_seconds(from_images, repeats)
    return {"K": K, "layers": L, "batch_size": batch_size, "tokens_samples_per_s": batch_size / cached,
            "images_samples_per_s": batch_size / full, "speedup": full / cached, "ideal": L / K}


def _dcfeat(*args) -> dict:
    """Run a dcfeat command in a child process; its wall time and its own peak RSS (wait4)."""
    t = time.perf_counter()
    quiet = ["--no-progress"] if args[0] in ("extract", "train") else []
    proc = subprocess.Popen([sys.executable, "-m", "dcfeat", *map(str, args), *quiet], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": usage.ru_maxrss / 1024}


# (tuned blocks K, their learning rate; None = the default): K = 0, 1, 2, and K = 2 at a rate
# high enough to move blocks that start from random weights.
SETTINGS = ((0, None), (1, None), (2, None), (2, 1e-3))


def city_comparison(root: Path, model_dir: Path, *, image_size: int = 112, epochs: int = 10,
                    settings: tuple[tuple[int, float | None], ...] = SETTINGS) -> dict:
    """LR@1 on the rendered city's test queries after training with each (K, lr_blocks) setting."""
    root = Path(root)
    images, store = root / "images", root / "feats.h5"
    if not (images / "city.json").is_file():
        render_city(images)
    depth = max(k for k, _ in settings)
    for split in ("train", "val", "test"):
        _dcfeat("extract", "--images", images / split, "--out", store, "--split", split, "--model", model_dir,
                "--image-size", image_size, "--cache-tokens", depth)
    info = split_info(store, "train")
    out = {"image_size": image_size, "epochs": epochs, "train_rows": info.rows,
           "token_bytes_per_image": int(info.attrs["tokens_shape"][0]) * int(info.attrs["tokens_shape"][1]) * 2,
           "runs": {}}
    for K, lr in settings:
        run = root / f"run-K{K}-lr{lr}"
        stats = _dcfeat("train", "--feats", store, "--val-split", "val", "--epochs", epochs, "--out", run,
                        "--finetune-blocks", K, *(["--lr-blocks", lr] if lr else []))
        _dcfeat("evaluate", "--feats", store, "--run", run, "--split", "test")
        report = json.loads((run / "eval" / "test" / "report.json").read_text())
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        recall = report["methods"]["classify"]["recall"]
        out["runs"][f"{K}@{lr or 'default'}"] = {
            **stats, "K": K, "lr_blocks": lr, "test_lr1": recall["1"], "test_lr5": recall["5"],
            "best_val_lr1": max(e["val_lr1"] for e in log),
            "seconds_per_epoch": statistics.median(e["seconds"] for e in log)}
    return out


OPTIONS = [click.Option(["--image-size"], default=112, show_default=True, type=click.IntRange(14),
                        help="Crop size of the city comparison."),
           click.Option(["--epochs"], default=5, show_default=True, type=click.IntRange(1))]


def measure(*, image_size: int = 112, epochs: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_vit("vits14", Path(tmp) / "dinov2-small-random")
        return {"step": [step_speed(model, K) for K in (1, 2)],
                "city": city_comparison(Path(tmp) / "city", model, image_size=image_size, epochs=epochs)}


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("finetune")
    ft = results[-1]
    c = ft["city"]
    runs = table(["tuned blocks K", "block lr", "test LR@1", "test LR@5", "best val LR@1", "s/epoch",
                  "peak RSS of `dcfeat train`"],
                 [[r["K"], r["lr_blocks"] or "1e-05 (default)", f"{100 * r['test_lr1']:.1f}", f"{100 * r['test_lr5']:.1f}",
                   f"{100 * r['best_val_lr1']:.1f}", f"{r['seconds_per_epoch']:.2f}", f"{r['peak_rss_mb']:.0f} MB"]
                  for r in c["runs"].values()])
    steps = table(["K", "step on cached tokens", "same step from decoded images (first L − K blocks frozen)",
                   "speed-up", "L/K", "(L + 2K)/3K"],
                  [[s["K"], f"{s['tokens_samples_per_s']:.1f} samples/s", f"{s['images_samples_per_s']:.1f} samples/s",
                    f"**{s['speedup']:.1f}×**", f"{s['layers'] / s['K']:.0f}",
                    f"{(s['layers'] + 2 * s['K']) / (3 * s['K']):.1f}"] for s in ft["step"]])
    return (f"Rendered street city (`dcfeat.synthetic.streets`, {c['train_rows']:,} train images, 40 test queries at dusk), "
            f"crop {c['image_size']}, the demo's **randomly initialised** DINOv2-S/14 (no pretrained weights here: "
            f"these LR@1 measure whether tuning works through the pipeline, not what it gains on DINOv2), "
            f"{c['epochs']} epochs, default projection and head rates, one process per run{measured(ft)}{machine_load(ft)}:\n\n{runs}"
            f"\n\nDisk per image for the cached tokens: {c['token_bytes_per_image']:,} B at this crop (the tokens "
            "entering block L − K have the same shape for every K; ViT-B/14 at 224: 257 × 768 × 2 B = 394,752 B)."
            f"\n\n{steps}\n\nViT-S/14 at 224, batch 32, CPU, median of 3 steps after a warm-up{machine_load(ft)}.")
