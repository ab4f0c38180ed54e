"""The SF-XL recipe's --dry-run: every backbone × preset, with the folders, crop and needs of each step."""

import re

from click.testing import CliRunner

from pipelines.sfxl import QUERY_SETS, main

BACKBONES = ["facebook/dinov2-base", "facebook/dinov3-vitl16-pretrain-lvd1689m"]


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
        val = "test-v2" if preset == "dc-paper" else "val"
        assert f"--preset {preset} --val-split {val} --out {folder}/runs/dc" in training and "# memory " in training
        evaluations = [line for line in lines if line.startswith("dcfeat evaluate")]
        assert [e.split("--split ")[1].split()[0] for e in evaluations] == list(QUERY_SETS)
        assert all("--database-split test-db --mode all" in e and "# memory " in e for e in evaluations)
    # dc-paper's 41.2 M raw crops at ViT-B width: 63 GB of float16 features, plus their ids and labels.
    (dc_paper_train,) = [line for line in grid[BACKBONES[0], "dc-paper"] if "raw/train/database" in line]
    assert "# disk 67.4 GB" in dc_paper_train


def test_bad_preset_lists_are_usage_errors():
    r = CliRunner().invoke(main, ["--root", "/SFXL", "--presets", "dcfeat,paper", "--dry-run"])
    assert r.exit_code == 2 and "'dcfeat,paper': expected a comma-separated list of dcfeat, dc-paper" in r.output
