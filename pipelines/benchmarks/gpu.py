"""Every GPU check and benchmark of the project, in one run (for a lent H100/H200), and BENCHMARKS.md's GPU sections.

Inputs: none (images and features are generated, backbones are randomly initialised DINOv2 architectures:
speed only). Output: a `.jsonl` record, one line per step written as soon as each step ends so a timeout keeps
what finished. Run from the repository root on the GPU machine:
`python -m pipelines.benchmarks run gpu --results $OUT` (a CPU smoke test: `--device cpu` with small sizes),
then copy the record into pipelines/results/; the default --steps leave out `check` (CUDA against the CPU):
name it in --steps to run it. A record whose header has `superseded` is left out of the tables.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import click
import torch

from dcfeat.backbone import save_random_vit
from dcfeat.synthetic.features import make_city
from dcfeat.train import TrainConfig
from pipelines.benchmarks import speed
from pipelines.benchmarks.markdown import command, measured, table
from pipelines.benchmarks.quality import city_benchmark

GPU = True  # the record's device is the GPU's name


def _jpegs(args):
    folder, n, seed = args
    return speed.make_jpegs(Path(folder), n, seed=seed)


STEPS = "env,queries,train,step,extract,loop,quality"
OPTIONS = [
    click.Option(["--images"], default=65536, show_default=True, help="512×512 JPEGs for the extraction benchmark."),
    click.Option(["--unique"], default=2048, show_default=True, help="How many of them are distinct images."),
    click.Option(["--train-rows"], default=5_600_000, show_default=True),
    click.Option(["--train-classes"], default=150_000, show_default=True),
    click.Option(["--db-rows"], default=2_800_000, show_default=True),
    click.Option(["--train-batches"], default="4096,16384", show_default=True,
                 help="Batch sizes of the epoch benchmark."),
    click.Option(["--device"], default="cuda", show_default=True, help="cpu only for a smoke test of this benchmark."),
    click.Option(["--shape"], default="vitb14", show_default=True, help="Backbone shape for extraction."),
    click.Option(["--steps"], default=STEPS, show_default=True, help="Comma-separated, run in this order (also: check).")]


def measure(rows, *, images: int = 65536, unique: int = 2048, train_rows: int = 5_600_000, train_classes: int = 150_000,
            db_rows: int = 2_800_000, train_batches: str = "4096,16384", device: str = "cuda", shape: str = "vitb14",
            steps: str = STEPS) -> None:
    """Each step's figures handed to `rows` as soon as the step ends (a failing step is recorded, the next run)."""
    steps = steps.split(",")

    def emit(name, result):
        if callable(result):  # a failing step is reported and the next ones still run
            try:
                result = result()
            except Exception as e:  # noqa: BLE001
                result = {"error": f"{type(e).__name__}: {e}"}
        rows({"step": name, **result})

    workers = min(16, os.cpu_count() or 1)
    made = {}

    def jpegs_and_vit():  # for extract and check, made once
        if not made:
            t = time.perf_counter()
            # Encoding is slow (~70 ms per photo-like 512² image): encode `unique` and copy the rest.
            per = unique // workers
            with Pool(workers) as pool:
                parts = pool.map(_jpegs, [(tmp / "src", per, i) for i in range(workers)])
            made["paths"] = speed.clone_jpegs([p for part in parts for p in part], images, tmp / "img")
            emit("jpegs", {"images": len(made["paths"]), "seconds": time.perf_counter() - t})
            made["vit"] = save_random_vit(shape, tmp / shape)
        return made["paths"], made["vit"]

    def env():
        emit("env", {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none", "torch": torch.__version__,
                     "python": platform.python_version(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")})

    def quality():  # the bf16 training path must learn as well as the float32 CPU one
        emit("quality", lambda: city_benchmark(make_city(seed=0), TrainConfig(), device=device))

    def check():
        paths, vit = jpegs_and_vit()
        emit("check", lambda: speed.check_cuda_against_cpu(vit, paths))

    def extract():
        paths, vit = jpegs_and_vit()
        emit("decode_per_core", lambda: speed.bench_decode(paths[:256]))
        emit(f"extract_{shape}", lambda: speed.bench_extraction(vit, paths, batch_size=256, device=device,
                                                                workers=workers))

    def step():
        for batch in (4096, 16384):
            emit("step", lambda batch=batch: speed.bench_step(
                batch_size=batch, in_dim=768, classes_per_group=train_classes // 4, device=device))

    def train():
        for batch in map(int, train_batches.split(",")):
            emit("train", lambda batch=batch: speed.bench_train(
                train_rows, 768, train_classes, batch_size=batch, epochs=3, device=device))

    def queries():
        emit("queries", lambda: speed.bench_queries(db_rows=db_rows, queries=1000, in_dim=768,
                                                    classes=db_rows // 20, device=device))

    def loop():
        emit("backbone_in_loop", lambda: speed.bench_backbone_in_loop(batch_size=256, device=device))

    known = {"env": env, "quality": quality, "check": check, "extract": extract, "step": step, "train": train,
             "queries": queries, "loop": loop}
    unknown = [s for s in steps if s not in known]
    if unknown:
        raise click.BadParameter(f"unknown steps {unknown}; known: {','.join(known)}", param_hint="--steps")
    tmp = Path(tempfile.mkdtemp())  # the steps' closures read it when they run
    try:
        for name in steps:  # in the order given: the most wanted first, so a timeout keeps them
            known[name]()
    finally:  # the JPEGs (65,536 at the defaults) and the random ViT
        shutil.rmtree(tmp, ignore_errors=True)


def _steps(record: dict) -> dict[str, list[dict]]:
    steps = {}
    for row in record["rows"]:
        steps.setdefault(row["step"], []).append(row)
    return steps


def _gpu_rows(steps: dict, note: str = "") -> list[list[str]]:
    """One table row per figure a GPU run measured (whichever steps it ran), `note` prefixed."""
    rows = []
    if "decode_per_core" in steps:
        dec = steps["decode_per_core"][0]
        rows.append(["decode + preprocess, one core, 512² JPEG",
                     f"{dec['full']:.0f} img/s full, {dec['draft']:.0f} img/s draft", ""])
    if "extract_vitb14" in steps:
        ex = steps["extract_vitb14"][0]
        rows.append([f"extraction ViT-B/14, 224, bf16, batch {ex['batch_size']}, {ex['workers']} workers, "
                     f"{ex['images']:,} images",
                     (f"backbone only {ex['backbone_only_img_s']:,.0f} img/s; end to end {ex['end_to_end_img_s']:,.0f} "
                      f"img/s; ratio **{ex['ratio']:.2f}**"), "≥ 0.85 and ≥ 4000 img/s"])
    rows += [[f"cached training step, batch {s['batch_size']}, 768→512, {s['classes_per_group']:,} classes per group",
              (f"{s['step_ms']:.2f} ms ({s['step_tflops']:.0f} TFLOP/s); the same matmuls alone {s['mm_ms']:.2f} ms "
               f"({s['mm_tflops']:.0f} TFLOP/s); fraction **{s['fraction_of_mm']:.2f}**"), "≥ 0.5"]
             for s in steps.get("step", [])]
    rows += [[f"training epoch, {t['rows']:,} rows × 768, {t['classes']:,} classes, batch {t['batch_size']}",
              f"**{t['seconds_per_epoch']:.1f} s/epoch** ({t['samples_per_s']:,.0f} samples/s)", "≤ 5 s"]
             for t in steps.get("train", [])]
    for q in steps.get("queries", []):
        rows.append([f"{q['db_rows']:,}-row database, {q['queries']} queries, {q['classes']:,} classes",
                     (f"classify {q['classify_ms_per_query']:.4f} ms/query, retrieve {q['retrieve_ms_per_query']:.4f}, "
                      f"hybrid {q['hybrid_ms_per_query']:.4f}; classify **{q['retrieve_over_classify']:.1f}×** and "
                      f"hybrid **{q.get('retrieve_over_hybrid', 0):.1f}×** faster than retrieval"),
                     "classify ≥ 20×, hybrid ≥ 5×"])
    for loop in steps.get("backbone_in_loop", []):
        rows.append([f"training step with a ViT-S/14 forward per sample vs cached, batch {loop['batch_size']}",
                     (f"{loop['backbone_in_loop_samples_per_s']:,.0f} vs {loop['cached_samples_per_s']:,.0f} samples/s: "
                      f"**{loop['ratio']:.0f}×**"), "≥ 100×"])
    for quality in steps.get("quality", []):
        lr1 = {name: 100 * m["recall"]["1"] for name, m in quality["methods"].items()}
        rows.append(["synthetic city trained and evaluated on the GPU (bf16 logits), LR@1",
                     ", ".join(f"{name} {v:.1f}" for name, v in lr1.items()), "as the CPU run"])
    return [[f"{note}{r[0]}" if note else r[0], *r[1:]] for r in rows]


def section(runs: list[dict]) -> str:
    """The GPU figures of one or more runs on one device, the rows of run 2 on prefixed `run 2: `."""
    if not runs:
        return f"No GPU run recorded yet: run {command('gpu')} with `--results $OUT` on a CUDA machine."
    env = _steps(runs[0])["env"][0]
    rows = [row for n, run in enumerate(runs, 1) for row in _gpu_rows(_steps(run), f"run {n}: " if n > 1 else "")]
    return (f"Device: {env['gpu']}, {env['cpus']} CPU cores, torch {env['torch']}, Python {env['python']} "
            f"({len(runs)} run(s) of {command('gpu')}{measured(env)}; each figure a median of 3 "
            "timed repeats after a warm-up). Backbones are randomly initialised DINOv2 architectures: speed only.\n\n"
            + table(["what", "measured", "goal"], rows))


def gpu_check(runs: list[dict]) -> str:
    """CUDA against the CPU, from the latest run that checked it."""
    checks = [c for run in runs for c in _steps(run).get("check", [])]
    if not checks:
        return ""
    c = checks[-1]
    return (f"Correctness on the GPU (first run): bf16 ViT-B/14 embeddings vs fp32 CPU, relative error "
            f"{c['backbone_bf16_rel_err']:.4f}, lowest cosine {c['backbone_min_cosine']:.5f}; CUDA fp16 retrieval vs "
            f"CPU, top-1 agreement {c['retrieval_top1_agreement']:.3f}, top-10 set agreement "
            f"{c['retrieval_top10_set_agreement']:.4f}.")


def render(results: list[dict]) -> dict[str, str]:
    """The H200 section (every current run), the earlier H100 one and the H100's correctness check."""
    current = [r for r in results if "superseded" not in r]
    h200 = [r for r in current if "H200" in r["device"]]
    h100 = [r for r in current if "H100" in r["device"]]
    return {"gpu": section(h200), "gpu_h100": section(h100),
            "gpu_check": gpu_check([r for r in results if "H100" in r["device"]])}
