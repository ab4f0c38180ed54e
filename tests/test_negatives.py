"""Sampled negatives (`--negative-fraction`, PartialFC-style): which classes a step scores, and that it learns."""

import json

import pytest
import torch
import torch.nn.functional as F

from dcfeat.heads import AAMC, sample_negatives
from dcfeat.model import DCModel
from dcfeat.train import train_step
from tests.conftest import FAST_TRAIN, invoke


def test_sampled_classes_hold_the_batch_and_about_r_of_the_rest():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 3, 917, 40])
    subset, target = sample_negatives(labels, 10_000, 0.1, gen)
    assert torch.equal(subset[target], labels)  # every label is scored, at its own column
    assert torch.all(subset[1:] > subset[:-1])  # sorted, no duplicates
    assert 900 < len(subset) < 1100  # about r of the 10 000 classes


def test_the_loss_over_sampled_classes_is_cross_entropy_over_exactly_those_columns():
    torch.manual_seed(0)
    head = AAMC(8, 50, s=30.0, m=0.4)
    h = torch.randn(6, 8)
    labels = torch.tensor([0, 7, 7, 12, 49, 3])
    subset, target = sample_negatives(labels, 50, 0.3, torch.Generator().manual_seed(1))
    logits = head(h, target, classes=subset)
    full = head(h, labels)
    # Each scored column equals the full head's column of that class, margin on the target included.
    assert torch.allclose(logits, full[:, subset], atol=1e-5)
    assert torch.allclose(F.cross_entropy(logits, target), F.cross_entropy(full[:, subset], target), atol=1e-6)


def test_fraction_1_is_the_exact_step_and_unscored_prototypes_get_no_gradient():
    torch.manual_seed(0)
    model = DCModel(16, 8, [200], head="aamc", s=30.0, m=0.4)
    x, y = torch.randn(32, 16), torch.randint(0, 200, (32,))
    twin = DCModel(16, 8, [200], head="aamc", s=30.0, m=0.4)
    twin.load_state_dict(model.state_dict())
    sgd = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    exact, _ = train_step(model, sgd[0], 0, x, y)
    same, _ = train_step(twin, sgd[1], 0, x, y, negative_fraction=1.0)
    assert torch.equal(exact, same)
    before = twin.heads["0"].weight.detach().clone()
    gen = torch.Generator().manual_seed(3)
    train_step(twin, sgd[1], 0, x, y, negative_fraction=0.05, generator=gen)
    moved = (twin.heads["0"].weight.detach() != before).any(dim=1)
    assert moved[y].all() and moved.sum() < 200  # plain SGD: only scored prototypes move


@pytest.mark.parametrize("bad", ["0", "1.5", "nan"])
def test_negative_fraction_is_range_checked(city_store, tmp_path, bad):
    r = invoke("train", "--feats", city_store, "--out", tmp_path / "r", "--negative-fraction", bad)
    assert r.exit_code == 2 and "--negative-fraction" in r.output and not (tmp_path / "r").exists()


def test_training_with_a_fifth_of_the_negatives_learns_about_as_well(city_store, city_run, tmp_path):
    out = tmp_path / "sampled"
    r = invoke("train", "--feats", city_store, "--val-split", "val", "--out", out, *FAST_TRAIN,
               "--negative-fraction", "0.2")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["negative_fraction"] == 0.2

    def best(run):
        return max(json.loads(line)["val_lr1"] for line in (run / "train_log.jsonl").read_text().splitlines())

    assert best(out) > best(city_run) - 0.08, (best(out), best(city_run))
