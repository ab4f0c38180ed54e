"""The CPU measurements behind BENCHMARKS.md, recorded as pipelines/results/cpu.json (about 15 minutes on 2 cores)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from dcfeat.backbone import save_random_vit
from dcfeat.synthetic.features import make_city
from dcfeat.train import TrainConfig
from pipelines.bench import speed
from pipelines.bench.quality import city_benchmark
from pipelines.bench.render import rendered_with


def measure(plots_dir: Path | None = None) -> dict:
    """Every CPU figure of BENCHMARKS.md, with the date and the software that measured them."""
    out = {"date": time.strftime("%Y-%m-%d"), "env": rendered_with()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = speed.make_jpegs(tmp / "jpegs", 256)
        out["decode"] = speed.bench_decode(paths)
        vits = save_random_vit("vits14", tmp / "vits14")
        out["extract"] = speed.bench_extraction(vits, paths[:96], batch_size=32, device="cpu", workers=2, repeats=3)
    out["train_200k"] = speed.bench_train(200_000, 768, 10_000, batch_size=256, epochs=3)
    out["step"] = speed.bench_step(batch_size=256, in_dim=768, classes_per_group=2_500)
    out["backbone_in_loop"] = speed.bench_backbone_in_loop(batch_size=32, classes_per_group=2_500)
    out["city"] = city_benchmark(make_city(seed=0), TrainConfig(), plots_dir=plots_dir)
    out["city_1m"] = city_benchmark(make_city(seed=0, streets=40, db_spacing_m=1.0), TrainConfig())
    return out
