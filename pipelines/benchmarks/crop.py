"""CPU throughput of `dcfeat extract --crop full` against the default centre crop, on the same images.

Inputs: none (photo-like JPEGs and a random ViT-S/14 are generated, seeded). Run from the
repository root: `python -m pipelines.benchmarks run crop` (about 10 minutes on 2 cores). Two image sets: square 512² JPEGs
(SF-XL's database crops: one shape, so one forward per batch) and a mix of 640×480, 480×640, 512×512 and
768×432 in shuffled order (query photos: several shapes, so several forwards per batch). Each figure is
`dcfeat.extract.extract` end to end (decoding in DataLoader workers, forward passes, shard writes) on a
fresh store, median of the timed runs after a warm-up run; the ratio is the median of the ratios of runs made
one after the other (the machine is shared).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from dcfeat.backbone import load_backbone, save_random_vit
from dcfeat.extract import extract
from dcfeat.images import whole_size
from dcfeat.labels import collect_images
from pipelines.benchmarks import speed
from pipelines.benchmarks.markdown import command, measured, not_measured, table
from pipelines.benchmarks.records import software
SETS = {"square": [(512, 512)], "mixed": [(480, 640), (640, 480), (512, 512), (432, 768)]}  # (height, width)
IMAGES, IMAGE_SIZE, PATCH, BATCH, WORKERS, REPEATS = 32, 224, 14, 16, 2, 9


def patches(shape: tuple[int, int], crop: str) -> int:
    """Patch tokens of one image of `shape` (height, width) at IMAGE_SIZE."""
    if crop == "centre":
        return (IMAGE_SIZE // PATCH) ** 2
    width, height = whole_size(shape[1], shape[0], IMAGE_SIZE, PATCH)
    return width * height // PATCH ** 2


def measure() -> dict:
    out = {"env": software(), "model": "random ViT-S/14", "backbone_device": "cpu",
           "images": IMAGES, "image_size": IMAGE_SIZE, "batch_size": BATCH, "workers": WORKERS, "repeats": REPEATS,
           "load_average_before": os.getloadavg()[0], "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = load_backbone(str(save_random_vit("vits14", tmp / "vits14")), device="cpu")
        for name, shapes in SETS.items():
            folder = tmp / name  # one folder: sorted ids interleave the shapes
            for seed, (height, width) in enumerate(shapes):
                speed.make_jpegs(folder, IMAGES // len(shapes), size=height, width=width, seed=seed)
            images = collect_images(folder, None)
            record = {"shapes": [f"{w}×{h}" for h, w in shapes]}
            rates = {"centre": [], "full": []}
            for r in range(REPEATS + 1):  # alternating, so both crops share whatever else loads the machine
                for crop, runs in rates.items():
                    runs.append(extract(images, backbone, tmp / f"{name}-{crop}-{r}.h5", image_size=IMAGE_SIZE,
                                        crop=crop, batch_size=BATCH, workers=WORKERS, progress=False).images_per_s)
            for crop, runs in rates.items():
                record[crop] = {"img_s": statistics.median(runs[1:]), "runs_img_s": runs[1:],
                                "patches_per_image": statistics.mean(patches(s, crop) for s in shapes)}
            # Each full run ÷ the centre run just before it: the pairs share the machine's load at the time.
            record["full_over_centre"] = statistics.median(f / c for c, f in zip(rates["centre"][1:], rates["full"][1:]))
            out["sets"][name] = record
            print(name, json.dumps(record))
    out["load_average_after"] = os.getloadavg()[0]  # other work on this shared machine, 1-minute mean
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("crop")
    cr = results[-1]
    rows = [[f"{name}: {', '.join(r['shapes'])}", *(f"{r[c]['img_s']:.1f} ({r[c]['patches_per_image']:.0f})"
                                                    for c in ("centre", "full")), f"**{r['full_over_centre']:.2f}**"]
            for name, r in cr["sets"].items()]
    return (f"A {cr['model']} on this CPU (shared: 1-minute load average {cr['load_average_before']:.1f} before, "
            f"{cr['load_average_after']:.1f} after), `--image-size {cr['image_size']}`, batch {cr['batch_size']}, "
            f"{cr['workers']} workers, {cr['images']} JPEGs per set; `extract` end to end, median of {cr['repeats']} "
            f"runs after a warm-up, the two crops alternating; full ÷ centre is the median of the ratios of "
            f"consecutive runs{measured(cr)} ({command('crop')}):\n\n"
            + table(["images", "centre: img/s (patches per image)", "full: img/s (patches per image)",
                     "full ÷ centre"], rows))
