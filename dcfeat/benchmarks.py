"""Measurements behind BENCHMARKS.md; `pipelines/bench.py` runs them and writes the file.

Each function returns plain numbers (medians of several runs); none asserts a
time. The random DINOv2 models used here have the real architectures and
shapes, so speed figures hold for pretrained weights too; accuracy figures
made with them are labelled as random.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# name → (hidden size, layers, heads): the shapes of the public DINOv2 checkpoints.
VIT_SHAPES = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16)}


def _sfxl_name(i: int, rng: np.random.Generator) -> str:
    e, n = 550000 + rng.uniform(0, 2000), 4180000 + rng.uniform(0, 2000)
    return f"@{e:010.2f}@{n:010.2f}@10@S@@@b{i}@@{int(rng.integers(0, 360))}@@@@@@.jpg"


def make_jpegs(folder: Path, n: int, *, size: int = 512, seed: int = 0, quality: int = 90) -> list[Path]:
    """SF-XL-named photo-like JPEGs: smooth gradients, edges and mild texture.

    White noise would be an unrealistic worst case for the JPEG decoder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        f = rng.uniform(1, 12, (3, 2))
        ph = rng.uniform(0, 6.3, 3)
        img = np.stack([np.sin(f[c, 0] * xx * 6.3 + ph[c]) * np.cos(f[c, 1] * yy * 6.3) for c in range(3)], -1)
        img = (img * 90 + 128 + rng.normal(0, 8, (size, size, 3))).clip(0, 255).astype(np.uint8)
        img[int(size * rng.uniform(0.3, 0.7)):, :] //= 2  # a horizon edge
        path = folder / _sfxl_name(i, rng)
        Image.fromarray(img).save(path, quality=quality)
        paths.append(path)
    return paths


def _median_rate(fn, items: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(items / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_decode(paths: list[Path], *, image_size: int = 224, repeats: int = 3) -> dict:
    """Decode + preprocess images/s in one process (= per CPU core), with and without draft."""
    from dcfeat.images import load_image

    out = {}
    for draft in (False, True):
        load_image(paths[0], image_size, draft=draft)
        out["draft" if draft else "full"] = _median_rate(
            lambda: [load_image(p, image_size, draft=draft) for p in paths], len(paths), repeats)
    full = np.stack([load_image(p, image_size, draft=False) for p in paths[:32]]).astype(np.float32)
    drafted = np.stack([load_image(p, image_size, draft=True) for p in paths[:32]]).astype(np.float32)
    out["draft_mean_abs_diff_grey_levels"] = float(np.abs(full - drafted).mean())
    return out


def random_backbone(shape: str, directory: Path, **kw) -> Path:
    from dcfeat.backbone import save_random_dinov2

    hidden, layers, heads = VIT_SHAPES[shape]
    return save_random_dinov2(directory, hidden_size=hidden, layers=layers, heads=heads, **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_extraction(model_dir: Path, paths: list[Path], *, batch_size: int, device: str = "auto",
                     workers: int | None = None, image_size: int = 224, repeats: int = 3) -> dict:
    """End-to-end `extract` images/s over backbone-only images/s on in-memory crops.

    Same model, batch and images; the ratio says how much decoding, transfer and
    writing cost on top of the model.
    """
    from dcfeat.backbone import load_backbone
    from dcfeat.extract import extract
    from dcfeat.labels import collect_images

    backbone = load_backbone(str(model_dir), device=device)
    images = collect_images(paths[0].parent)
    n = len(images)
    crops = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8)
    if backbone.device.type == "cuda":
        crops = crops.pin_memory()
    batches = max(1, n // batch_size)

    def backbone_only():
        for _ in range(batches):
            backbone.embed(crops)
        _sync(backbone.device)

    backbone_only()  # warm-up: kernels, allocator, SDPA choice
    model_rate = _median_rate(backbone_only, batches * batch_size, repeats)
    e2e = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats + 1):
            res = extract(images, backbone, Path(tmp) / f"f{r}.h5", "train", image_size=image_size,
                          batch_size=batch_size, workers=workers, progress=False)
            if r:  # the first run warms the page cache and the workers' imports
                e2e.append(res.images_per_s)
    e2e_rate = statistics.median(e2e)
    return {"device": str(backbone.device), "batch_size": batch_size, "images": n,
            "workers": workers if workers is not None else min(16, os.cpu_count() or 1),
            "backbone_only_img_s": model_rate, "end_to_end_img_s": e2e_rate, "ratio": e2e_rate / model_rate}
