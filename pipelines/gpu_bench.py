"""Every GPU check and benchmark of the project, in one run (for a lent H100/H200).

Inputs: none (images and features are generated, backbones are randomly
initialised DINOv2 architectures: speed only). Output: JSON lines on stdout and
in --out, one per step, written as soon as each step ends so a timeout keeps
what finished. Run: `python pipelines/gpu_bench.py --out $OUT/gpu_bench.jsonl`.
"""

import json
import os
import platform
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import click
import torch

from dcfeat import benchmarks as B


def _jpegs(args):
    folder, n, seed = args
    return B.make_jpegs(Path(folder), n, seed=seed)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--images", default=16384, show_default=True, help="512×512 JPEGs for the extraction benchmark.")
@click.option("--train-rows", default=5_600_000, show_default=True)
@click.option("--train-classes", default=150_000, show_default=True)
@click.option("--db-rows", default=2_800_000, show_default=True)
@click.option("--device", default="cuda", show_default=True, help="cpu only for a smoke test of this script.")
@click.option("--shape", default="vitb14", show_default=True, help="Backbone shape for extraction.")
@click.option("--steps", default="env,check,extract,step,train,queries,loop", show_default=True)
def main(out, images, train_rows, train_classes, db_rows, device, shape, steps):
    steps = steps.split(",")
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(name, result):
        line = json.dumps({"step": name, **result})
        print(line, flush=True)
        with open(out, "a") as f:
            f.write(line + "\n")

    tmp = Path(tempfile.mkdtemp())
    if "env" in steps:
        emit("env", {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none", "torch": torch.__version__, "python": platform.python_version(),
                     "cpus": os.cpu_count()})
    t = time.perf_counter()
    workers = min(16, os.cpu_count() or 1)
    per = images // workers
    with Pool(workers) as pool:
        paths = [p for part in pool.map(_jpegs, [(tmp / "img", per, i) for i in range(workers)]) for p in part]
    emit("jpegs", {"images": len(paths), "seconds": time.perf_counter() - t})
    vitb = B.random_backbone(shape, tmp / shape)
    if "check" in steps:
        emit("check", B.check_cuda_against_cpu(vitb, paths))
    if "extract" in steps:
        emit("decode_per_core", B.bench_decode(paths[:256]))
        emit(f"extract_{shape}", B.bench_extraction(vitb, paths, batch_size=256, device=device,
                                                    workers=max(1, workers - 1)))
    if "step" in steps:
        emit("step", B.bench_step(batch_size=4096, in_dim=768, classes_per_group=train_classes // 4, device=device))
    if "train" in steps:
        emit("train", B.bench_train(train_rows, 768, train_classes, batch_size=4096, epochs=3, device=device))
    if "queries" in steps:
        emit("queries", B.bench_queries(db_rows=db_rows, queries=1000, in_dim=768, classes=db_rows // 20,
                                        device=device))
    if "loop" in steps:
        emit("backbone_in_loop", B.bench_backbone_in_loop(batch_size=256, device=device))


if __name__ == "__main__":
    sys.exit(main())
