"""What the backbone fingerprint (every tensor + the architecture) costs on a ViT-B/14.

Inputs: none (a random DINOv2 ViT-B/14, hidden 768, 12 layers, 12 heads, saved to a
temporary folder like a real checkpoint). Output: pipelines/results/fingerprint.json with
the fingerprint's seconds (median of 3) with sha256, the hash it uses, and with blake2b
for comparison, and the seconds of the whole `load_backbone` on the CPU (median of 3).
Run from the repository root: `python pipelines/bench_fingerprint.py` (~20 s on 2 cores,
~1 GB of memory); it needs only the package, so unlike the scripts using pipelines/bench/
it leaves sys.path alone.
"""

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dcfeat.backbone import _fingerprint, load_backbone, save_random_vit

RESULTS = Path(__file__).resolve().parents[1] / "pipelines" / "results"
REPEATS = 3


def median_seconds(fn) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_vit("vitb14", Path(tmp) / "dinov2-base-random")
        load_s = median_seconds(lambda: load_backbone(str(model), device="cpu"))
        net = load_backbone(str(model), device="cpu").model
        out = {"date": time.strftime("%Y-%m-%d"), "model": "random DINOv2 ViT-B/14 (hidden 768, 12 layers, 12 heads)", "device": "cpu",
               "cpu": platform.processor() or platform.machine(), "repeats": REPEATS,
               "tensor_bytes": sum(t.numel() * t.element_size() for t in net.state_dict().values()),
               "fingerprint_s": {name: median_seconds(lambda name=name: _fingerprint(net, hash_name=name))
                                 for name in ("sha256", "blake2b")},
               "load_backbone_s": load_s}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fingerprint.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
