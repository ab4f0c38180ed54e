"""`dcfeat train`: Divide&Classify on cached features, seconds per epoch.

The split is read into memory once (on the GPU when there is one). Groups take
turns: step t trains group t mod N² on a class-balanced batch (a class drawn
uniformly among the group's classes, then an image uniformly within it), and
updates the projection and that group's prototypes only. With
`group_rotation="epoch"` (D&C's code) epoch e trains group e mod N² alone.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from dcfeat import devices
from dcfeat.atomic import write_text
from dcfeat.calibrate import calibrate_files
from dcfeat.devices import autocast, is_cuda, resolve_device
from dcfeat.errors import BadInput
from dcfeat.finetune import TokenTraining
from dcfeat.heads import sample_negatives
from dcfeat.layout import IDENTITY_ATTRS
from dcfeat.metrics import localisation_recall
from dcfeat.model import DCModel, top_cells
from dcfeat.partition import Partition, partition
from dcfeat.presets import Schedule, TrainConfig, make_optimizer
from dcfeat.progress import progress_bar
from dcfeat.runfiles import COMMAND_FILE, LOG_FILE
from dcfeat.runs import (
    new_run_dir,
    point_latest,
    save_model,
    write_config,
)
from dcfeat.sampling import (
    BalancedSampler,
    InMemoryBatches,
    Streamed,
    StreamedBatches,
    check_finite,
    class_means,
    streamed_class_means,
)
from dcfeat.store import Split, read_split, split_info


@dataclass
class TrainResult:
    out: Path
    epochs: list[dict]
    best_epoch: int
    classes: int
    images_used: int
    seconds: float
    memory_budget: int | None = None  # bytes a split could take in memory (train_files)
    streamed: bool = False  # the split was read from disk in chunks instead
    calibration: str = ""  # whether train_files fitted the run's confidence, or why not


def _hits(head, h: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each sample's own class scores highest *without* the margin.

    The training logits carry the margin on the target, so their argmax understates accuracy
    (on hard data to 0 %). The margin only lowers the target logit, so the target wins
    without it exactly when s·cos θ_y is at least the largest training logit. `target` is the
    label's column in `logits` (they differ when negatives are sampled: then the hits are among
    the scored classes).
    """
    if not hasattr(head, "m"):
        return logits.argmax(1) == target
    cos_y = (F.normalize(h.float(), dim=1) * F.normalize(head.weight.detach().float()[labels], dim=1)).sum(1)
    return head.s * cos_y >= logits.float().max(1).values


def train_step(model: DCModel, optimizer: torch.optim.Optimizer, group: int, features: torch.Tensor,
               labels: torch.Tensor, *, negative_fraction: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of the projection and group `group`'s prototypes; (loss, hits), both detached.

    With `negative_fraction` r < 1 the loss scores the batch's classes plus a random r of the
    group's others (heads.sample_negatives); r = 1 is the exact loss. The benchmarks time this
    very function. On CUDA the products run under bf16 autocast.
    """
    head = model.heads[str(group)]
    classes, target = None, labels
    if negative_fraction < 1:
        classes, target = sample_negatives(labels, head.classes, negative_fraction, generator)
    with autocast(model.device):
        h = model.projection(features)
        logits = head(h, target, classes=classes)
    # Outside autocast, which would copy the (batch × classes) logits to float32:
    # the CUDA kernels accumulate in float32 over bf16 logits anyway.
    loss = F.cross_entropy(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), _hits(head, h.detach(), logits.detach(), target, labels)


def recall_at_1(model: DCModel, split: Split, classes: pl.DataFrame, threshold_m: float) -> float:
    """LR@1 of the model (on its own device) on a split: the validation score of an epoch."""
    pred = top_cells(model, split.embeddings, classes, 1)
    lab = split.labels
    return localisation_recall(lab["utm_east"].to_numpy(), lab["utm_north"].to_numpy(), lab["utm_zone"].to_numpy(),
                               pred["east"], pred["north"], pred["zone"], threshold_m=threshold_m, ks=(1,),
                               q_letter=lab["utm_letter"].to_numpy(), p_letter=pred["letter"]).recall[1]


def make_partition(split: Split, config: TrainConfig) -> Partition:
    lab = split.labels
    part = partition(lab["utm_east"].to_numpy(), lab["utm_north"].to_numpy(), lab["utm_zone"].to_numpy(),
                     lab["utm_letter"].to_numpy(), M=config.M, N=config.N,
                     min_images_per_class=config.min_images_per_class)
    if len(part.classes) == 0:
        raise BadInput(f"no class survives: {part.cell_stats()}. Lower --min-images-per-class "
                       "or raise --M (cell side in metres).")
    return part


def train(split: Split, config: TrainConfig, out: Path, *, val: Split | None = None, device: str = "cpu",
          progress: bool = True, run_config: dict | None = None, tail: TokenTraining | None = None,
          streamed: Streamed | None = None) -> TrainResult:
    """Train projection + group heads on one split's cached features; write the run to `out`.

    After every epoch config.json says how far training got (`complete`, `epochs_done`), and
    the best epoch's model is kept.

    With `tail` the last backbone blocks train too: it is the batch source (cached tokens through
    the blocks), adds their parameters, embeds the val split, and saves the blocks with the run.
    With `streamed` the split's embeddings stay on disk (`split.embeddings` is None) and are read
    in shuffled contiguous chunks, a memory budget's worth at a time.
    """
    t_start = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    # Sampling on the training device: a CPU generator would force a blocking copy per step.
    gen = torch.Generator(device=dev).manual_seed(config.seed)
    part = make_partition(split, config)
    if streamed is None:
        features = torch.as_tensor(split.embeddings).to(dev)  # numpy, or a tensor already in place
        check_finite(features, split.name)
    in_dim = int(split.attrs["dim"]) if streamed is not None else features.shape[1]
    model = DCModel(in_dim, config.dim, part.classes_per_group, head=config.head, s=config.s, m=config.m,
                    easy_margin=config.easy_margin, test_prototypes=config.test_prototypes).to(dev)
    sampler = BalancedSampler(part, dev, gen)
    if config.prototype_init == "class-means" and streamed is None:
        class_means(features, model, sampler, part)
    elif config.prototype_init == "class-means":
        streamed_class_means(streamed, split.name, model, part)
    # else the heads' own Xavier initialisation stays, as in D&C's code.
    opt = make_optimizer(config, [
        {"params": model.projection.parameters(), "lr": config.lr_projection},
        {"params": model.heads.parameters(), "lr": config.lr_heads},  # Schedule's heads_group
        *(tail.param_groups() if tail else []),
    ], fused=is_cuda(dev))
    schedule = Schedule(config, opt)
    groups = [g for g, c in enumerate(part.classes_per_group) if c > 0]
    used = int((part.class_index >= 0).sum())
    steps = config.iterations_per_epoch or max(len(groups), math.ceil(used / config.batch_size))
    if tail is not None:
        batches = tail.start(part, sampler, steps, config, dev)
    elif streamed is not None:
        batches = StreamedBatches(streamed.store, split.name, "embeddings", len(part.group), part, steps,
                                  config.batch_size, dev, gen, config.seed, chunk_rows=streamed.chunk_rows,
                                  buffer_chunks=streamed.buffer_chunks)
    else:
        batches = InMemoryBatches(features, sampler, config.batch_size)
    run_config = run_config or {}
    config_json = {**run_config, **asdict(config), "classes_per_group": part.classes_per_group,
                   "classes": len(part.classes), "images_used": used, "steps_per_epoch": steps,
                   "features": {"dim": in_dim, **run_config.get("features", {})},
                   "streamed": None if streamed is None else {"chunk_rows": streamed.chunk_rows,
                                                               "buffer_chunks": streamed.buffer_chunks}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    history, best, best_epoch = [], -math.inf, 0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        turns = groups if config.group_rotation == "step" else [groups[(epoch - 1) % len(groups)]]
        model.train()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev)
        with progress_bar(f"epoch {epoch}/{config.epochs}", steps, enabled=progress, unit="step") as advance:
            for step in range(steps):
                with autocast(dev):
                    g, x, labels = batches(step, turns)
                loss, hits = train_step(model, opt, g, x, labels, negative_fraction=config.negative_fraction,
                                        generator=gen)
                loss_sum += loss
                correct += hits.sum()
                advance(1)
        record = {"epoch": epoch, "loss": float(loss_sum) / steps,
                  "train_accuracy": float(correct) / (steps * config.batch_size),
                  "seconds": time.perf_counter() - t0}
        if val is not None:
            record["val_lr1"] = recall_at_1(model, tail.features_of(val) if tail else val, part.classes,
                                           config.threshold_m)
        record.update(schedule.step(record["loss"]))
        if config.keep == "lowest-train-loss":
            score = -record["loss"]
        else:
            score = record.get("val_lr1", epoch)  # without val the last epoch is kept
        if score > best:
            best, best_epoch = score, epoch
            if tail:
                tail.save(out)
            save_model(out, model, part.classes)
        history.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        # Last, so that a run killed at any point reads as stopped after the epochs it finished.
        done = epoch == config.epochs or "stopped" in record
        write_config(out, {**config_json, **(tail.config() if tail else {}), "best_epoch": best_epoch,
                           "epochs_done": epoch, "complete": done, "stopped": record.get("stopped")})
        if done:
            break
    return TrainResult(out=out, epochs=history, best_epoch=best_epoch, classes=len(part.classes),
                       images_used=used, seconds=time.perf_counter() - t_start)


def train_files(feats: Path, split: str, config: TrainConfig, *, out: Path | None = None,
                val_split: str | None = None, device: str = "auto", progress: bool = True,
                command: str = "", memory_budget: int | None = None) -> TrainResult:
    """`dcfeat train`: read the split(s), train, and leave a complete run folder (+ runs/latest).

    A split larger than `memory_budget` bytes (default: half the free memory where training runs)
    is streamed from disk instead of read into memory.
    """
    dev = resolve_device(device)
    budget = memory_budget or devices.memory_budget(dev)
    info = split_info(feats, split)
    row_bytes = info.dim * np.dtype(info.dtype).itemsize
    streamed = None
    if info.rows * row_bytes > budget and not config.finetune_blocks:
        streamed = Streamed.within(feats, budget, row_bytes)
    data = read_split(feats, split, embeddings=streamed is None)
    val = read_split(feats, val_split) if val_split else None
    make_partition(data, config)  # fail on a hopeless partition before creating the run folder
    tail = None
    if config.finetune_blocks:
        tail = TokenTraining.open(feats, split, val_split, data.attrs, config.finetune_blocks, config.lr_blocks)
    run = new_run_dir(out, Path(feats).parent / "runs")
    write_text(run / COMMAND_FILE, command + "\n")
    features = {k: data.attrs.get(k) for k in (*IDENTITY_ATTRS, "model_source", "backbone_random_init")}
    run_config = {"features": features, "store": str(Path(feats).resolve()), "train_split": split,
                  "val_split": val_split, "store_fingerprint": data.attrs.get("plan_id"), "device": str(dev),
                  "memory_budget": budget}
    result = train(data, config, run, val=val, device=str(dev), progress=progress, run_config=run_config,
                   tail=tail, streamed=streamed)
    calibration = "uncalibrated: no --val-split"
    if val_split:  # the confidence and 90 % radius, fitted on the held-out split (calibration.json)
        try:
            calibrate_files(feats, run, val_split, threshold_m=config.threshold_m, device=str(dev))
            calibration = f"calibrated on '{val_split}'"
        except BadInput as e:  # the run itself is sound: say why it has no confidence, do not fail
            calibration = f"uncalibrated: {e}"
    if out is None:
        point_latest(run)
    return replace(result, memory_budget=budget, streamed=streamed is not None, calibration=calibration)
