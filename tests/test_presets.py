"""`dcfeat train --preset dcfeat|dc-paper`: the official D&C code's choices, each one a field that can be set alone."""

import json
import math
from dataclasses import asdict, fields, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dcfeat.train
from dcfeat.errors import BadInput, DamagedRun
from dcfeat.evaluate import evaluate
from dcfeat.heads import AAMC, GroupHeads
from dcfeat.model import top_cells
from dcfeat.presets import PRESETS, TrainConfig, preset_config
from dcfeat.run import load_run
from dcfeat.store import read_split, split_info
from dcfeat.train import Schedule, make_optimizer, train, train_files
from tests.conftest import invoke

PAPER = PRESETS["dc-paper"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_changes_exactly_the_fields_it_names(name):
    config, default = preset_config(name), TrainConfig()
    assert config.preset == name
    assert all(getattr(config, k) == v for k, v in PRESETS[name].items())
    # Everything else is the default; a preset names no field it leaves as it is.
    changed = {f.name for f in fields(TrainConfig) if getattr(config, f.name) != getattr(default, f.name)}
    assert changed == set(PRESETS[name]) | ({"preset"} if name != default.preset else set())
    assert all(getattr(default, k) != v for k, v in PRESETS[name].items())


def test_the_default_config_is_the_dcfeat_preset_and_dc_paper_changes_something():
    assert preset_config("dcfeat") == TrainConfig() and TrainConfig().preset == "dcfeat"
    assert PAPER and preset_config("dc-paper") != TrainConfig()


@pytest.mark.parametrize("name", list(PRESETS))
def test_training_under_a_preset_uses_its_settings(name, city_store, tmp_path, monkeypatch):
    """What the optimiser, the heads, the batches, the group turns and the schedule were, seen from training."""
    steps = []
    real_step = dcfeat.train.train_step

    def spy(model, optimizer, group, features, labels, **kwargs):
        steps.append({"model": model, "optimizer": optimizer, "group": group, "batch": len(features),
                      "lrs": [g["lr"] for g in optimizer.param_groups]})
        return real_step(model, optimizer, group, features, labels, **kwargs)

    monkeypatch.setattr(dcfeat.train, "train_step", spy)
    want = preset_config(name)
    config = preset_config(name, epochs=2, iterations_per_epoch=3, dim=16)  # dc-paper's 500 × 2000: too long here
    result = train(read_split(city_store, "train"), config, tmp_path / "r", progress=False)
    assert len(steps) == 2 * 3
    opt = steps[0]["optimizer"]
    assert type(opt) is {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[want.optimizer]
    assert opt.defaults["weight_decay"] == want.weight_decay
    assert all(s["lrs"][:2] == [want.lr_projection, want.lr_heads] for s in steps)  # no cut within patience
    assert {s["batch"] for s in steps} == {want.batch_size}
    turns = [[s["group"] for s in steps[e * 3:(e + 1) * 3]] for e in range(2)]
    if want.group_rotation == "epoch":  # one group a whole epoch, the next group the next
        assert all(len(set(t)) == 1 for t in turns) and turns[0][0] != turns[1][0]
    else:  # every step the next group
        assert all(len(set(t)) == 3 for t in turns)
    heads = steps[0]["model"].heads
    for g in heads:
        assert (heads[g].s, heads[g].m, heads[g].easy_margin) == (want.s, want.m, want.easy_margin)
    assert heads.test_prototypes == want.test_prototypes
    assert all(("lr_projection" in e) == (want.lr_schedule == "plateau") for e in result.epochs)
    assert load_run(result.out).config.train == config


def test_an_override_beats_the_preset_and_none_keeps_it():
    config = preset_config("dc-paper", s=50.0, keep="best-val", m=None)
    assert (config.s, config.keep, config.m, config.optimizer) == (50.0, "best-val", PAPER["m"], PAPER["optimizer"])


def test_unknown_presets_and_choices_are_refused():
    with pytest.raises(BadInput, match="preset 'paper': choose one of dcfeat, dc-paper"):
        preset_config("paper")
    with pytest.raises(BadInput, match="optimizer 'sgd': choose one of adamw, adam"):
        preset_config("dcfeat", optimizer="sgd")


def test_cli_refuses_a_bad_preset_before_creating_anything(city_store, tmp_path):
    r = invoke("train", "--feats", city_store, "--out", tmp_path / "r", "--preset", "paper", "--no-progress")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Invalid value for '--preset': 'paper' is not one of 'dcfeat', 'dc-paper'" in r.output
    assert not (tmp_path / "r").exists()


def test_cli_preset_with_overrides_is_recorded_field_by_field(city_store, tmp_path):
    r = invoke("train", "--feats", city_store, "--out", tmp_path / "r", "--preset", "dc-paper", "--epochs", "1",
               "--iterations-per-epoch", "0", "--s", "50", "--no-easy-margin", "--dim", "16", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "(preset dc-paper)" in r.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    want = replace(preset_config("dc-paper"), epochs=1, iterations_per_epoch=None, s=50.0, easy_margin=False, dim=16)
    assert {k: config[k] for k in asdict(want)} == asdict(want)
    assert config["steps_per_epoch"] == math.ceil(config["images_used"] / PAPER["batch_size"])  # 0: one pass


def test_easy_margin_and_the_threshold_rule_give_the_documented_logits():
    m = 0.2
    easy, rule = AAMC(2, 1, s=1.0, m=m, easy_margin=True), AAMC(2, 1, s=1.0, m=m)
    cos = torch.tensor([0.5, 0.0, -0.5, math.cos(math.pi - m / 2)])  # the last is past θ = π − m
    theta = torch.arccos(cos)
    # Both add the margin where cos θ > 0.
    assert torch.allclose(easy.margin(cos[:1]), torch.cos(theta[:1] + m)) and torch.allclose(rule.margin(cos[:1]),
                                                                                              torch.cos(theta[:1] + m))
    # Easy margin: none at all where cos θ ≤ 0, past π − m included.
    assert torch.equal(easy.margin(cos[1:]), cos[1:])
    # The threshold rule: cos(θ + m) up to π − m, then cos θ − m·sin m.
    assert torch.allclose(rule.margin(cos[1:3]), torch.cos(theta[1:3] + m), atol=1e-6)
    assert torch.allclose(rule.margin(cos[3:]), cos[3:] - m * math.sin(m))
    assert "easy_margin=True" in repr(easy) and "easy_margin" not in repr(rule)


def _heads(test_prototypes: str) -> GroupHeads:
    """One group: a unit prototype 10° from h and a prototype of norm 3, 30° from it."""
    heads = GroupHeads([2], head="aamc", dim=2, s=30.0, m=0.4, test_prototypes=test_prototypes)
    with torch.no_grad():
        heads["0"].weight.copy_(torch.tensor([[math.cos(math.radians(10)), math.sin(math.radians(10))],
                                              [3 * math.cos(math.radians(30)), 3 * math.sin(math.radians(30))]]))
    return heads


def test_raw_prototypes_score_the_dot_product_and_normalised_the_cosine():
    h = torch.tensor([[1.0, 0.0]])
    cos, raw = _heads("normalised").scores(h)[0], _heads("raw").scores(h)[0]
    assert torch.allclose(cos, torch.tensor([math.cos(math.radians(10)), math.cos(math.radians(30))]))
    assert torch.allclose(raw, torch.tensor([math.cos(math.radians(10)), 3 * math.cos(math.radians(30))]))
    assert cos.argmax() == 0 and raw.argmax() == 1
    # The group's probability is the one it trained with, on cosines, whatever the test-time rule.
    assert torch.equal(_heads("raw").scores(h, "group-softmax"), _heads("normalised").scores(h, "group-softmax"))


def test_raw_prototypes_are_saved_with_the_run_and_honoured_after_loading(city_store, tmp_path):
    train_split, val = read_split(city_store, "train"), read_split(city_store, "val", dtype=np.float32)
    config = preset_config("dc-paper", epochs=1, iterations_per_epoch=20, dim=16)
    run = load_run(train(train_split, config, tmp_path / "r", progress=False).out)
    assert run.config.train.test_prototypes == "raw" == run.model.heads.test_prototypes
    h = run.model.projection(torch.as_tensor(val.embeddings))
    w = torch.cat([run.model.heads[str(g)].weight for g in range(4)])
    got = top_cells(run.model, val.embeddings, run.classes, 3)
    dot = (h @ w.T).topk(3, dim=1)
    assert np.array_equal(got["class"], dot.indices.numpy()) and np.allclose(got["score"], dot.values.detach().numpy(),
                                                                             atol=1e-5)
    cosine = (h @ F.normalize(w, dim=1).T).topk(3, dim=1).indices.numpy()
    assert not np.array_equal(got["class"], cosine)  # Xavier prototypes' norms differ: the rules disagree
    report = evaluate(run, val, ks=(1,)).report
    assert (report["preset"], report["test_prototypes"]) == ("dc-paper", "raw")


def test_runs_from_before_the_presets_are_refused_naming_the_fix(city_run, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    for f in city_run.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    for key in ("preset", "test_prototypes", "easy_margin", "optimizer", "keep", "group_rotation"):
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DamagedRun, match="older dcfeat .no `test_prototypes`, `easy_margin`.*Train the run"):
        load_run(folder)


def _prototypes(city_store, tmp_path, budget=None, **overrides) -> list[torch.Tensor]:
    config = preset_config("dcfeat", dim=16, iterations_per_epoch=5, **overrides)
    name = "-".join(f"{k}{v}" for k, v in overrides.items()) + f"-{budget}"
    result = train_files(city_store, "train", config, out=tmp_path / name, device="cpu", progress=False,
                         memory_budget=budget)  # without val: the last epoch is kept
    assert result.streamed == (budget is not None)
    state = load_file(str(result.out / "model.safetensors"))
    return [state[f"heads.{g}.weight"] for g in range(4)]


@pytest.mark.parametrize("budget", [None, 60_000], ids=["in-memory", "streamed"])
def test_one_group_per_epoch_trains_only_that_groups_prototypes(city_store, tmp_path, budget):
    one, two = (_prototypes(city_store, tmp_path, budget, epochs=e, group_rotation="epoch") for e in (1, 2))
    # Class-means prototypes start unit-norm; epoch 1 moved group 0's alone.
    moved = [not torch.allclose(p.norm(dim=1), torch.ones(len(p)), atol=1e-6) for p in one]
    assert moved == [True, False, False, False]
    # Epoch 2 trained group 1 alone: groups 0, 2 and 3 are bit for bit what epoch 1 left.
    assert [torch.equal(a, b) for a, b in zip(one, two)] == [True, False, True, True]
    every_step = _prototypes(city_store, tmp_path, budget, epochs=1, group_rotation="step")
    assert not any(torch.allclose(p.norm(dim=1), torch.ones(len(p)), atol=1e-6) for p in every_step)


def test_xavier_prototypes_are_not_class_means(city_store, tmp_path):
    # One epoch of group 0 leaves groups 1-3 at their initialisation.
    xavier = _prototypes(city_store, tmp_path, epochs=1, group_rotation="epoch", prototype_init="xavier")[1:]
    means = _prototypes(city_store, tmp_path, epochs=1, group_rotation="epoch")[1:]
    for x, c in zip(xavier, means):
        bound = math.sqrt(6 / sum(x.shape))  # xavier_uniform_ on (classes, dim)
        assert x.abs().max() <= bound and not torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=0.1)
        assert F.cosine_similarity(x, c, dim=1).abs().mean() < 0.4  # measured 0.17-0.19: unrelated directions


def test_lowest_train_loss_keeps_that_epoch(city_store, tmp_path):
    train_split, val = read_split(city_store, "train"), read_split(city_store, "val")
    config = preset_config("dcfeat", epochs=4, dim=16, iterations_per_epoch=5, keep="lowest-train-loss",
                           group_rotation="epoch")
    result = train(train_split, config, tmp_path / "r", val=val, progress=False)
    losses, vals = [e["loss"] for e in result.epochs], [e["val_lr1"] for e in result.epochs]
    assert result.best_epoch == 1 + int(np.argmin(losses))
    assert result.best_epoch != 1 + int(np.argmax(vals))  # measured: loss picks epoch 3, val LR@1 epoch 4
    again = train(train_split, replace(config, epochs=result.best_epoch, keep="best-val"), tmp_path / "again",
                  progress=False)  # without val: the last epoch
    saved, last = (load_file(str(p / "model.safetensors")) for p in (result.out, again.out))
    assert all(torch.equal(saved[k], last[k]) for k in saved)


def test_plateau_cuts_the_projections_rate_only_and_stops_below_1e_6():
    config = preset_config("dc-paper")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = make_optimizer(config, [{"params": [params[0]], "lr": 1e-4}, {"params": [params[1]], "lr": 1e-2}], False)
    schedule = Schedule(config, opt)
    log = [schedule.step(1.0) for _ in range(40)]  # a loss that never improves
    rates = [r["lr_projection"] for r in log]
    assert rates[10] == pytest.approx(1e-4) and rates[11] == pytest.approx(1e-5)  # patience 10, factor 0.1
    assert opt.param_groups[1]["lr"] == 1e-2
    stops = [i for i, r in enumerate(log) if "stopped" in r]
    assert stops[0] == 33 and rates[33] == pytest.approx(1e-7)  # the third cut, as D&C's code stops
    assert Schedule(preset_config("dcfeat"), opt).step(1.0) == {}


def test_a_run_stopped_by_its_schedule_is_complete(city_store, tmp_path, monkeypatch):
    monkeypatch.setattr(dcfeat.train, "PLATEAU_STOP_LR", 1.0)  # any rate: stop after the first epoch
    config = preset_config("dc-paper", epochs=5, iterations_per_epoch=3, dim=16)
    result = train(read_split(city_store, "train"), config, tmp_path / "r", progress=False)
    run = load_run(result.out)
    assert len(result.epochs) == 1 and run.complete and run.status_line() is None
    assert run.config.stopped.startswith(f"projection rate {PAPER['lr_projection']:.1e} below 1")


def test_a_short_dc_paper_training_learns(city_store, tmp_path):
    r = invoke("train", "--feats", city_store, "--val-split", "val", "--out", tmp_path / "r", "--preset", "dc-paper",
               "--epochs", "4", "--iterations-per-epoch", "100", "--dim", "128", "--no-progress")
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert [e["lr_projection"] for e in log] == [PAPER["lr_projection"]] * 4
    assert max(e["val_lr1"] for e in log) > 0.3  # measured 0.26, 0.36, 0.37, 0.44; chance 0.7 %


def test_groups_take_turns_in_the_order_dc_papers_code_meets_them():
    from dcfeat.partition import partition
    from dcfeat.train import group_order

    # Rows as a store holds them (sorted by image id): the first row lies in group 3 (p, q odd), then 0.
    east = np.array([30.0, 30, 10, 10, 50, 50, 30, 10])
    north = np.array([30.0, 30, 10, 10, 10, 10, 50, 30])
    part = partition(east + 500_000, north + 4_000_000, np.full(8, 10), np.full(8, "S"), M=20, N=2,
                     min_images_per_class=1)
    assert group_order(part, "id") == [0, 1, 2, 3]
    first_group = [int(part.group[i]) for i in range(8)]
    assert group_order(part, "first-seen") == list(dict.fromkeys(first_group)) and first_group[0] == 3


def test_dc_paper_keeps_the_features_width(city_store, tmp_path):
    config = preset_config("dc-paper", epochs=1, iterations_per_epoch=2)
    assert config.dim is None and config.group_order == "first-seen"
    result = train(read_split(city_store, "train"), config, tmp_path / "r", progress=False)
    run = load_run(result.out)
    width = split_info(city_store, "train").dim
    assert run.config.train.dim == width and run.model.projection.linear.out_features == width
