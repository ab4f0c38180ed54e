"""CUDA paths (bf16 backbone, bf16 training logits, GPU retrieval); skipped without a GPU.

Run on a lent GPU with `python -m pytest -q -m gpu`.
"""

import json

import numpy as np
import pytest
import torch

from dcfeat.store import read_split
from tests.conftest import FAST_TRAIN, invoke

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(("family", "crop"), [("dinov2", "centre"), ("dinov3", "centre"), ("dinov2", "full")])
def test_bf16_extraction_matches_the_cpu(images, tiny_model, tmp_path, family, crop):
    from dcfeat.backbone import save_random_dinov3

    model, size = (tiny_model, 56) if family == "dinov2" else (
        save_random_dinov3(tmp_path / "tiny-dinov3", hidden_size=32, layers=2, heads=2, image_size=64), 64)
    for device in ("cpu", "cuda"):
        r = invoke("extract", "--images", images, "--out", tmp_path / f"{device}.h5", "--model", model,
                   "--image-size", size, "--device", device, "--workers", 0, "--no-progress", "--crop", crop)
        assert r.exit_code == 0, r.output
    a = read_split(tmp_path / "cpu.h5", "train", dtype=np.float32).embeddings
    b = read_split(tmp_path / "cuda.h5", "train", dtype=np.float32).embeddings
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_cuda_training_learns_like_the_cpu(city_store, city_run, tmp_path):
    r = invoke("train", "--feats", city_store, "--val-split", "val", "--out", tmp_path / "gpu", "--device", "cuda",
               *FAST_TRAIN)
    assert r.exit_code == 0, r.output
    best = lambda run: max(json.loads(x)["val_lr1"] for x in (run / "train_log.jsonl").read_text().splitlines())
    assert best(tmp_path / "gpu") > best(city_run) - 0.1  # bf16 logits: within 10 points of float32
    r = invoke("evaluate", "--feats", city_store, "--run", tmp_path / "gpu", "--database-split", "test-db",
               "--device", "cuda", "--out", tmp_path / "eval")
    assert r.exit_code == 0, r.output


def test_predict_images_on_cuda(images, tiny_model, tmp_path):
    """The classifier follows the backbone's device: `predict --images --device cuda` end to end."""
    import polars as pl
    from PIL import Image

    store = tmp_path / "f.h5"
    r = invoke("extract", "--images", images, "--out", store, "--model", tiny_model, "--image-size", 56,
               "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("train", "--feats", store, "--M", 200, "--min-images-per-class", 1, "--epochs", 1, "--dim", 8,
               "--out", tmp_path / "run", "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    new = tmp_path / "new"
    new.mkdir()
    for i in range(3):
        Image.fromarray(np.full((70, 90, 3), 60 * i, np.uint8)).save(new / f"photo{i}.jpg")
    frames = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"{device}.parquet"
        r = invoke("predict", "--run", tmp_path / "run", "--images", new, "--out", out, "--k", 3, "--device", device,
                   "--no-progress")
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
        frames[device] = pl.read_parquet(out).sort("image_id", "rank")
    assert frames["cuda"].height == frames["cpu"].height == 9
    # bf16 backbone vs float32: the same best cell for most photos
    top = [f.filter(pl.col("rank") == 1)["class"].to_list() for f in frames.values()]
    assert sum(a == b for a, b in zip(*top)) >= 2


def test_the_database_search_on_the_gpu_finds_what_the_cpu_finds(tmp_path):
    """CellDatabase.search with the rows on the GPU (evaluate --database-split --device cuda) and from a
    memory map onto the GPU (evaluate --database --device cuda), against the CPU."""
    import polars as pl

    from dcfeat.database import CellDatabase, NewRows, unit_rows

    rng = np.random.default_rng(0)
    n, d, classes = 5000, 64, 300
    labels = pl.DataFrame({"row": np.arange(n), "image_id": [str(i) for i in range(n)], "utm_east": np.zeros(n),
                           "utm_north": np.zeros(n), "utm_zone": np.full(n, 10, np.int8), "utm_letter": ["S"] * n})
    emb = unit_rows(torch.as_tensor(rng.standard_normal((n, d)), dtype=torch.float32))
    cls = rng.integers(0, classes, n)
    q = torch.nn.functional.normalize(torch.randn(200, d, generator=torch.Generator().manual_seed(1)), dim=1)
    cells = rng.integers(0, classes, (200, 5))
    bias = rng.normal(size=cells.shape).astype(np.float32)
    found = {}
    for device in ("cpu", "cuda"):
        rows = NewRows(cls, np.zeros(n, bool), labels, [emb])
        db = CellDatabase.build(rows, num_classes=classes, space="raw", built_for={}, device=device)
        found[device] = db.search(q.to(device), cells, 10, bias)
        if device == "cpu":
            found["disk"] = db.save(tmp_path / "db").search(q.to("cuda"), cells, 10, bias)
    for other in ("cuda", "disk"):
        np.testing.assert_array_equal(found[other][1], found["cpu"][1])
        np.testing.assert_allclose(found[other][0], found["cpu"][0], atol=1e-5)
