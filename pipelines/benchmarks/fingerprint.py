"""What the backbone fingerprint (every tensor + the architecture) costs on a ViT-B/14.

Inputs: none (a random DINOv2 ViT-B/14, hidden 768, 12 layers, 12 heads, saved to a temporary folder like a
real checkpoint). Records the fingerprint's seconds (median of 3) with sha256, the hash it uses, and with
blake2b for comparison, and the seconds of the whole `load_backbone` on the CPU (median of 3). Run from the
repository root: `python -m pipelines.benchmarks run fingerprint` (~20 s on 2 cores, ~1 GB of memory).
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

from dcfeat.backbone import _fingerprint, load_backbone, save_random_vit
from pipelines.benchmarks.markdown import command, machine_load, measured, not_measured, table

REPEATS = 3


def median_seconds(fn) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def measure() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_vit("vitb14", Path(tmp) / "dinov2-base-random")
        load_s = median_seconds(lambda: load_backbone(str(model), device="cpu"))
        net = load_backbone(str(model), device="cpu").model
        return {"model": "random DINOv2 ViT-B/14 (hidden 768, 12 layers, 12 heads)", "backbone_device": "cpu",
                "cpu": platform.processor() or platform.machine(), "repeats": REPEATS,
                "tensor_bytes": sum(t.numel() * t.element_size() for t in net.state_dict().values()),
                "fingerprint_s": {name: median_seconds(lambda name=name: _fingerprint(net, hash_name=name))
                                  for name in ("sha256", "blake2b")},
                "load_backbone_s": load_s}


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("fingerprint")
    fp = results[-1]
    secs = fp["fingerprint_s"]
    return (f"{fp['model']}, {fp['tensor_bytes'] / 1e6:,.0f} MB of tensors, {fp['backbone_device']} ({fp['cpu']}), median "
            f"of {fp['repeats']}{measured(fp)}{machine_load(fp)} ({command('fingerprint')}):\n\n"
            + table(["what", "measured"], [
                ["fingerprint of every tensor + the architecture, sha256 (the hash used)", f"{secs['sha256']:.2f} s"],
                ["the same with blake2b, for comparison", f"{secs['blake2b']:.2f} s"],
                ["`load_backbone` in full (fingerprint included)", f"{fp['load_backbone_s']:.2f} s"]]))
