"""Every GPU check and benchmark of the project, in one run (for a lent H100/H200).

Inputs: none (images and features are generated, backbones are randomly
initialised DINOv2 architectures: speed only). Output: JSON lines on stdout and
in --out, one per step, written as soon as each step ends so a timeout keeps
what finished. Run from the repository root: `python pipelines/gpu_bench.py --out
$OUT/gpu_bench.jsonl` (a CPU smoke test: `--device cpu` with small sizes); the default
--steps leave out `check` (CUDA against the CPU): name it in --steps to run it. Like every
script that uses pipelines/bench/, it is run by path and puts the repository root on sys.path.
"""

import json
import os
import platform
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `pipelines.bench`, the measurement code

import click
import torch

from dcfeat.backbone import save_random_vit
from dcfeat.synthetic.features import make_city
from dcfeat.train import TrainConfig
from pipelines.bench import speed
from pipelines.bench.quality import city_benchmark


def _jpegs(args):
    folder, n, seed = args
    return speed.make_jpegs(Path(folder), n, seed=seed)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--images", default=65536, show_default=True, help="512×512 JPEGs for the extraction benchmark.")
@click.option("--unique", default=2048, show_default=True, help="How many of them are distinct images.")
@click.option("--train-rows", default=5_600_000, show_default=True)
@click.option("--train-classes", default=150_000, show_default=True)
@click.option("--db-rows", default=2_800_000, show_default=True)
@click.option("--train-batches", default="4096,16384", show_default=True, help="Batch sizes of the epoch benchmark.")
@click.option("--device", default="cuda", show_default=True, help="cpu only for a smoke test of this script.")
@click.option("--shape", default="vitb14", show_default=True, help="Backbone shape for extraction.")
@click.option("--steps", default="env,queries,train,step,extract,loop,quality", show_default=True,
              help="Comma-separated, run in this order (also: check).")
def main(out, images, unique, train_rows, train_classes, db_rows, train_batches, device, shape, steps):
    steps = steps.split(",")
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(name, result):
        if callable(result):  # a failing step is reported and the next ones still run
            try:
                result = result()
            except Exception as e:  # noqa: BLE001
                result = {"error": f"{type(e).__name__}: {e}"}
        line = json.dumps({"step": name, **result})
        print(line, flush=True)
        with open(out, "a") as f:
            f.write(line + "\n")

    tmp = Path(tempfile.mkdtemp())
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
    for name in steps:  # in the order given: the most wanted first, so a timeout keeps them
        known[name]()

if __name__ == "__main__":
    sys.exit(main())
