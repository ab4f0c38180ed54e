"""The SF-XL recipe's --dry-run: every backbone × preset, with the folders, crop and needs of each step."""

import re

from click.testing import CliRunner

from pipelines.sfxl import IMAGES, QUERY_SETS, main

BACKBONES = ["facebook/dinov2-base", "facebook/dinov3-vitl16-pretrain-lvd1689m"]
WIDTH = dict(zip(BACKBONES, [768, 1024]))  # each checkpoint's hidden size: ViT-B and ViT-L
ID_AND_LABEL = 100  # bytes a row takes beside its features, as the recipe counts them (feature_bytes)
UNITS = {"GB": 1e9, "MB": 1e6, "kB": 1e3}


def disk_shown(line: str) -> tuple[float, float, bool]:
    """The line's "# disk" figure in bytes, half its last printed digit (its rounding), and whether it is per image."""
    value, unit, per_image = re.search(r"# disk ([\d.,]+) (GB|MB|kB)( per image)?", line).groups()
    decimals = len(value.split(".")[1]) if "." in value else 0
    return float(value.replace(",", "")) * UNITS[unit], 0.5 * 10 ** -decimals * UNITS[unit], per_image is not None


def dry_run(*args):
    r = CliRunner().invoke(main, ["--root", "/SFXL", "--out", "/out", "--dry-run", *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_dry_run_lists_the_full_grid_with_disk_and_memory():
    out = dry_run("--backbones", ",".join(BACKBONES), "--presets", "dcfeat,dc-paper", "--gpus", "8")
    blocks = re.split(r"^# backbone (\S+), preset (\S+)\n", out, flags=re.M)[1:]
    grid = {(b, p): text.splitlines() for b, p, text in zip(blocks[::3], blocks[1::3], blocks[2::3])}
    assert list(grid) == [(b, p) for b in BACKBONES for p in ("dcfeat", "dc-paper")]
    for (backbone, preset), lines in grid.items():
        folder = f"/out/{backbone.split('/')[-1]}/{preset}"
        extracts = [line for line in lines if " extract " in line]
        assert all(line.startswith("torchrun --nproc-per-node 8 -m dcfeat extract") and f"--model {backbone}" in line
                   and f"--out {folder}/feats.h5" in line and "# disk " in line and "GPU memory" in line
                   for line in extracts)
        # The paper's folders and whole-image crop for dc-paper; dcfeat's own otherwise.
        train = "/SFXL/raw/train/database" if preset == "dc-paper" else "/SFXL/processed/train"
        assert f"--images {train} " in extracts[0] and all(("--crop full" in e) == (preset == "dc-paper")
                                                         for e in extracts)
        assert sum("--split test-db" in e and "/SFXL/processed/test/database" in e for e in extracts) == 1
        (training,) = [line for line in lines if line.startswith("dcfeat train")]
        # Both presets validate, and so calibrate their confidence, on the held-out val queries: never a test set.
        assert f"--preset {preset} --val-split val --out {folder}/runs/dc" in training and "# memory " in training
        assert sum("--split val " in e and "/SFXL/processed/val/queries" in e for e in extracts) == 1
        evaluations = [line for line in lines if line.startswith("dcfeat evaluate")]
        assert [e.split("--split ")[1].split()[0] for e in evaluations] == list(QUERY_SETS)
        assert all("--database-split test-db --mode all" in e and "# memory " in e for e in evaluations)
        # Each extract's disk: its folder's images × (float16 features of the backbone's width + id and label).
        for line in extracts:
            folder = line.split("--images /SFXL/")[1].split()[0]
            shown, rounding, per_image = disk_shown(line)
            rows = 1 if per_image else IMAGES[folder]
            assert abs(shown - rows * (WIDTH[backbone] * 2 + ID_AND_LABEL)) <= rounding, line
    # dc-paper trains on the 41.2 M raw crops: at ViT-B width, 63 GB of float16 features alone.
    (dc_paper_train,) = [line for line in grid[BACKBONES[0], "dc-paper"] if "raw/train/database" in line]
    assert disk_shown(dc_paper_train)[0] > IMAGES["raw/train/database"] * 768 * 2 > 63e9


def test_bad_preset_lists_are_usage_errors():
    r = CliRunner().invoke(main, ["--root", "/SFXL", "--presets", "dcfeat,paper", "--dry-run"])
    assert r.exit_code == 2 and "'dcfeat,paper': expected a comma-separated list of dcfeat, dc-paper" in r.output
