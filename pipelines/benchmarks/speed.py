"""Speed measurements behind BENCHMARKS.md; the `cpu` and `gpu` benchmarks run them.

Each function returns plain numbers (medians of several runs); none asserts a
time. The random DINOv2 models used here have the real architectures and
shapes, so speed figures hold for pretrained weights too; accuracy figures
made with them are labelled as random.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image

from dcfeat.backbone import load_backbone, save_random_vit
from dcfeat.devices import synchronize
from dcfeat.evaluate import evaluate
from dcfeat.extract import extract
from dcfeat.identity import FeatureIdentity
from dcfeat.images import load_image
from dcfeat.labels import collect_images
from dcfeat.model import DCModel
from dcfeat.partition import partition
from dcfeat.retrieval import topk_cosine
from dcfeat.run import Run, RunConfig, new_model
from dcfeat.store import Split
from dcfeat.train import TrainConfig, train, train_step


def _sfxl_name(i: int, rng: np.random.Generator) -> str:
    e, n = 550000 + rng.uniform(0, 2000), 4180000 + rng.uniform(0, 2000)
    return f"@{e:010.2f}@{n:010.2f}@10@S@@@b{i}@@{int(rng.integers(0, 360))}@@@@@@.jpg"


def make_jpegs(folder: Path, n: int, *, size: int = 512, width: int | None = None, seed: int = 0,
               quality: int = 90) -> list[Path]:
    """SF-XL-named photo-like JPEGs, `size` high and `width` (default `size`) wide: smooth gradients,
    edges and mild texture. White noise would be an unrealistic worst case for the JPEG decoder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = width or size
    yy, xx = np.mgrid[0:size, 0:width].astype(np.float32) / size
    paths = []
    for i in range(n):
        f = rng.uniform(1, 12, (3, 2))
        ph = rng.uniform(0, 6.3, 3)
        img = np.stack([np.sin(f[c, 0] * xx * 6.3 + ph[c]) * np.cos(f[c, 1] * yy * 6.3) for c in range(3)], -1)
        img = (img * 90 + 128 + rng.normal(0, 8, (size, width, 3))).clip(0, 255).astype(np.uint8)
        img[int(size * rng.uniform(0.3, 0.7)):, :] //= 2  # a horizon edge
        path = folder / _sfxl_name(i, rng)
        Image.fromarray(img).save(path, quality=quality)
        paths.append(path)
    return paths


def clone_jpegs(paths: list[Path], total: int, folder: Path, *, seed: int = 1) -> list[Path]:
    """`total` files under new SF-XL names, cycling through `paths`' bytes: a large
    image set at the decoding cost of real JPEGs without encoding each one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(total):
        dst = folder / _sfxl_name(i, rng)
        shutil.copyfile(paths[i % len(paths)], dst)
        out.append(dst)
    return out


def _median_rate(fn, items: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(items / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_decode(paths: list[Path], *, image_size: int = 224, repeats: int = 3) -> dict:
    """Decode + preprocess images/s in one process (= per CPU core), with and without draft."""
    out = {}
    for draft in (False, True):
        load_image(paths[0], image_size, draft=draft)
        out["draft" if draft else "full"] = _median_rate(
            lambda draft=draft: [load_image(p, image_size, draft=draft) for p in paths], len(paths), repeats)
    full = np.stack([load_image(p, image_size, draft=False) for p in paths[:32]]).astype(np.float32)
    drafted = np.stack([load_image(p, image_size, draft=True) for p in paths[:32]]).astype(np.float32)
    out["draft_mean_abs_diff_grey_levels"] = float(np.abs(full - drafted).mean())
    return out


def bench_extraction(model_dir: Path, paths: list[Path], *, batch_size: int, device: str = "auto",
                     workers: int | None = None, image_size: int = 224, repeats: int = 3) -> dict:
    """End-to-end `extract` images/s over backbone-only images/s on in-memory crops.

    Same model, batch and images; the ratio says how much decoding, transfer and
    writing cost on top of the model.
    """
    backbone = load_backbone(str(model_dir), device=device)
    images = collect_images(paths[0].parent)
    n = len(images)
    crops = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8)
    if backbone.device.type == "cuda":
        crops = crops.pin_memory()
    batches = max(1, min(n, 16384) // batch_size)  # the model's rate settles well within 16 k images

    def backbone_only():
        for _ in range(batches):
            backbone.embed(crops)
        synchronize(backbone.device)

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


def _grid_labels(rows: int, classes: int, M: float = 20.0, seed: int = 0):
    """UTM labels putting `rows` images evenly into `classes` cells of a square grid."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(classes)))
    cell = np.arange(rows) % classes
    east = 550_000 + (cell % side + rng.uniform(0.05, 0.95, rows)) * M
    north = 4_180_000 + (cell // side + rng.uniform(0.05, 0.95, rows)) * M
    return pl.DataFrame({"row": np.arange(rows), "image_id": np.arange(rows).astype(str), "utm_east": east,
                         "utm_north": north, "utm_zone": np.full(rows, 10, np.int8), "utm_letter": ["S"] * rows})


def _random_split(name: str, rows: int, dim: int, classes: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    emb = torch.randn(rows, dim, generator=gen, device=device, dtype=torch.float16)
    return Split(name=name, embeddings=emb, labels=_grid_labels(rows, classes, seed=seed), attrs={})


def bench_train(rows: int, dim: int, classes: int, *, batch_size: int = 256, epochs: int = 3,
                device: str = "cpu") -> dict:
    """Seconds per epoch of `train` on random features with `classes` classes (timing only)."""
    dev = torch.device(device)
    split = _random_split("train", rows, dim, classes, dev)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(split, TrainConfig(epochs=epochs, batch_size=batch_size), Path(tmp), device=device,
                    progress=False)
        steps = json.loads((Path(tmp) / "config.json").read_text())["steps_per_epoch"]  # as train counts them
    seconds = statistics.median(e["seconds"] for e in res.epochs[1:]) if epochs > 1 else res.epochs[0]["seconds"]
    return {"rows": rows, "dim": dim, "classes": res.classes, "batch_size": batch_size, "device": str(dev),
            "steps_per_epoch": steps, "seconds_per_epoch": seconds, "samples_per_s": steps * batch_size / seconds,
            "first_epoch_seconds": res.epochs[0]["seconds"]}


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_step(*, batch_size: int, in_dim: int, dim: int = 512, classes_per_group: int, device: str = "cpu",
               repeats: int = 10) -> dict:
    """One cached training step (`dcfeat.train.train_step`, as `train` runs it) vs the same matrix
    products alone (`torch.mm` at the same shapes)."""
    dev = torch.device(device)
    model = DCModel(in_dim, dim, [classes_per_group], head="aamc", s=30.0, m=0.2).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=dev.type == "cuda")
    x = torch.randn(batch_size, in_dim, device=dev, dtype=torch.float16)
    y = torch.randint(classes_per_group, (batch_size,), device=dev)

    def step():
        train_step(model, opt, 0, x, y)

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the dtype train_step's autocast computes in
    a, w = torch.randn(batch_size, in_dim, device=dev, dtype=dt), torch.randn(dim, in_dim, device=dev, dtype=dt)
    h, p = torch.randn(batch_size, dim, device=dev, dtype=dt), torch.randn(classes_per_group, dim, device=dev, dtype=dt)
    g = torch.randn(batch_size, classes_per_group, device=dev, dtype=dt)

    def mms():  # forward h = a wᵀ, logits = h pᵀ; backward dW = dhᵀa (h stands in for dh), dh = g p, dP = gᵀh
        torch.mm(a, w.t()), torch.mm(h, p.t()), torch.mm(h.t(), a), torch.mm(g, p), torch.mm(g.t(), h)

    flops = 2 * batch_size * (2 * in_dim * dim + 3 * dim * classes_per_group)
    t_step, t_mm = _time(step, repeats, dev), _time(mms, repeats, dev)
    return {"batch_size": batch_size, "in_dim": in_dim, "dim": dim, "classes_per_group": classes_per_group,
            "device": str(dev), "step_ms": 1000 * t_step, "mm_ms": 1000 * t_mm,
            "step_tflops": flops / t_step / 1e12, "mm_tflops": flops / t_mm / 1e12, "fraction_of_mm": t_mm / t_step}


def bench_backbone_in_loop(*, batch_size: int, shape: str = "vits14", in_dim: int = 768,
                           classes_per_group: int = 2500, device: str = "cpu", repeats: int = 3) -> dict:
    """Samples/s of the cached step vs the same step with a DINOv2 forward per sample."""
    dev = torch.device(device)
    cached = bench_step(batch_size=batch_size, in_dim=in_dim, classes_per_group=classes_per_group, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = load_backbone(str(save_random_vit(shape, Path(tmp) / shape)), device=device)
    crops = torch.randint(0, 256, (batch_size, 224, 224, 3), dtype=torch.uint8, device=dev)
    t_backbone = _time(lambda: backbone.embed(crops), repeats, dev)
    t_loop = t_backbone + cached["step_ms"] / 1000
    return {"batch_size": batch_size, "device": str(dev), "backbone": shape,
            "cached_samples_per_s": batch_size / (cached["step_ms"] / 1000),
            "backbone_in_loop_samples_per_s": batch_size / t_loop,
            "ratio": t_loop / (cached["step_ms"] / 1000)}


def bench_queries(*, db_rows: int, queries: int, in_dim: int, classes: int, device: str = "cpu",
                  cells: int = 5, repeats: int = 3) -> dict:
    """ms/query of classify, retrieve (projected) and hybrid at a database size (timing only)."""
    dev = torch.device(device)
    db = _random_split("test-db", db_rows, in_dim, classes, dev, seed=1)
    q = _random_split("test", queries, in_dim, classes, dev, seed=2)
    lab = db.labels
    part = partition(lab["utm_east"].to_numpy(), lab["utm_north"].to_numpy(), lab["utm_zone"].to_numpy(),
                     lab["utm_letter"].to_numpy(), M=20.0, N=2, min_images_per_class=1)
    config = RunConfig(train=TrainConfig(M=20.0, s=30.0, m=0.2, head="aamc", dim=512),
                       features=FeatureIdentity(dim=in_dim),
                       classes_per_group=part.classes_per_group, complete=True)
    run = Run(directory=Path("."), model=new_model(config).to(dev).eval(), config=config, classes=part.classes)
    out = {"db_rows": db_rows, "queries": queries, "classes": len(part.classes), "device": str(dev)}
    for mode in ("classify", "retrieve", "hybrid"):
        secs = []
        for _ in range(repeats + 1):
            report = evaluate(run, q, database=db, modes=(mode,), ks=(1, 5, 10, 20), cells=cells,
                              device=device).report
            secs.append(report["methods"][mode]["seconds"])
        out[f"{mode}_ms_per_query"] = 1000 * statistics.median(secs[1:]) / queries
    out["retrieve_over_classify"] = out["retrieve_ms_per_query"] / out["classify_ms_per_query"]
    out["retrieve_over_hybrid"] = out["retrieve_ms_per_query"] / out["hybrid_ms_per_query"]
    return out


def check_cuda_against_cpu(model_dir: Path, paths: list[Path], *, rows: int = 100_000, dim: int = 768) -> dict:
    """Agreement of the CUDA paths with the CPU reference: bf16 backbone, fp16 retrieval."""
    crops = torch.from_numpy(np.stack([load_image(p, 224) for p in paths[:64]]))
    ref = load_backbone(str(model_dir), device="cpu").embed(crops).double()
    got = load_backbone(str(model_dir), device="cuda").embed(crops).double().cpu()
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=1)
    gen = torch.Generator().manual_seed(0)
    db = torch.randn(rows, dim, generator=gen).half()
    q = torch.randn(1000, dim, generator=gen).half()
    s_cpu, i_cpu = topk_cosine(q.numpy(), db.numpy(), 10)
    s_gpu, i_gpu = topk_cosine(q.cuda(), db.cuda(), 10, device="cuda")
    return {"backbone_bf16_rel_err": float((got - ref).norm() / ref.norm()), "backbone_min_cosine": float(cos.min()),
            "retrieval_top1_agreement": float((i_cpu[:, 0] == i_gpu[:, 0]).mean()),
            "retrieval_top10_set_agreement": float(np.mean([len(set(a) & set(b)) / 10
                                                            for a, b in zip(i_cpu, i_gpu)])),
            "retrieval_max_score_diff": float(np.abs(s_cpu - s_gpu).max())}
