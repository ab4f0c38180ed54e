"""`dcfeat train`: Divide&Classify on cached features, seconds per epoch.

A split that fits the memory budget is read into memory once (on the GPU when
there is one); a larger one is streamed from disk in shuffled contiguous chunks
(dcfeat.sampling). Groups take turns: step t trains group t mod N² on a class-balanced batch (a class drawn
uniformly among the group's classes, then an image uniformly within it), and
updates the projection and that group's prototypes only. With
`group_rotation="epoch"` (D&C's code) epoch e trains group e mod N² alone.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from dcfeat import devices
from dcfeat.atomic import write_text
from dcfeat.confidence import few_queries_warning, fit_confidence
from dcfeat.devices import autocast, is_cuda, reproducible, resolve_device
from dcfeat.errors import BadInput, check_writable, human_bytes, writing
from dcfeat.finetune import TokenTraining
from dcfeat.heads import sample_negatives
from dcfeat.identity import FeatureIdentity, with_defaults
from dcfeat.metrics import localisation_recall
from dcfeat.model import EMBED_CHUNK, DCModel, top_cells
from dcfeat.partition import Partition, partition
from dcfeat.presets import TrainConfig
from dcfeat.progress import progress_bar, stderr
from dcfeat.resume import (
    RESUME_FILE,
    TrainingState,
    new_run_dir,
    point_latest,
    read_resume,
    resume_or_clear,
    resumed_reading,
    run_lock,
)
from dcfeat.run import (
    COMMAND_FILE,
    LAST_FILE,
    RunConfig,
    RunDetails,
    append_log,
    cpu_copy,
    new_model,
    save_model,
    save_tensors,
    write_calibration,
    write_config,
)
from dcfeat.sampling import (
    BalancedSampler,
    InMemoryBatches,
    Streamed,
    StreamedBatches,
    check_finite,
    read_rows,
)
from dcfeat.store import Split, read_split, same_split, split_info

# ReduceLROnPlateau as D&C's train.py builds it: on the mean train loss of each epoch, patience 10
# (its --scheduler_patience), torch's default factor 0.1, on the backbone's optimiser only (here the
# projection and any tuned blocks; the heads keep their rate); training stops once that rate is
# below 1e-6, i.e. after the third cut.
PLATEAU_PATIENCE, PLATEAU_FACTOR, PLATEAU_STOP_LR = 10, 0.1, 1e-6


def make_optimizer(config: TrainConfig, groups: list[dict], fused: bool) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or Adam (D&C's: decay, if any, added to the gradient) over the param groups."""
    make = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return make(groups, weight_decay=config.weight_decay, fused=fused)


class Schedule:
    """The learning-rate schedule, stepped once per epoch with its mean train loss."""

    def __init__(self, config: TrainConfig, optimizer: torch.optim.Optimizer, heads_group: int = 1):
        self.optimizer = optimizer
        self.plateau = None
        if config.lr_schedule == "plateau":
            # A floor at the heads' own rate keeps theirs: torch cuts no rate below its group's min_lr.
            floors = [0.0] * len(optimizer.param_groups)
            floors[heads_group] = optimizer.param_groups[heads_group]["lr"]
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, min_lr=floors)

    def step(self, loss: float) -> dict:
        """After an epoch: what the log records ({} without a schedule); "stopped" once training should end."""
        if self.plateau is None:
            return {}
        self.plateau.step(loss)
        lr = self.optimizer.param_groups[0]["lr"]
        return {"lr_projection": lr, **({"stopped": f"projection rate {lr:.1e} below {PLATEAU_STOP_LR:g}"}
                                        if lr < PLATEAU_STOP_LR else {})}


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
    calibration: str = ""  # whether the run's confidence was fitted, or why not
    resumed_from: int = 0  # epochs an earlier, interrupted `dcfeat train` had finished
    warnings: list[str] = field(default_factory=list)  # inputs accepted that deserve a word (the CLI: stderr)


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


def class_means(features: torch.Tensor, model: DCModel, sampler: BalancedSampler, part: Partition) -> None:
    """Prototypes start at the class means of the initial embeddings: training then
    sharpens a sensible classifier instead of first finding one (see the sweep)."""
    with torch.no_grad():
        for g, (order, starts, counts, _) in enumerate(sampler.groups):
            if len(counts) == 0:
                continue
            h = torch.cat([model.projection(features[order[i:i + EMBED_CHUNK]].float())
                           for i in range(0, len(order), EMBED_CHUNK)])
            labels = torch.repeat_interleave(torch.arange(len(counts), device=h.device), counts)
            sums = torch.zeros(len(counts), h.shape[1], device=h.device).index_add_(0, labels, h)
            model.heads.init_prototypes_(g, sums / counts[:, None])


def streamed_class_means(streamed: Streamed, split: str, model: DCModel, part: Partition) -> None:
    """Class means as `class_means` computes them, over the split read once in contiguous chunks."""
    gc = torch.as_tensor(part.global_class())
    total, rows = len(part.classes), len(gc)
    sums = torch.zeros(total, model.projection.linear.out_features, device=model.device)
    counts = torch.zeros(total, device=model.device)
    with torch.no_grad():
        for start in range(0, rows, streamed.chunk_rows * streamed.buffer_chunks):
            stop = min(start + streamed.chunk_rows * streamed.buffer_chunks, rows)
            x = read_rows(streamed.store, split, "embeddings", [(start, stop)])
            check_finite(x, split, start)
            keep = gc[start:stop] >= 0
            h = model.projection(torch.from_numpy(x[keep.numpy()]).to(model.device).float())
            labels = gc[start:stop][keep].to(model.device)
            sums.index_add_(0, labels, h)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
    offsets = model.heads.offsets
    for g in range(len(offsets) - 1):
        if offsets[g + 1] > offsets[g]:
            model.heads.init_prototypes_(g, sums[offsets[g]:offsets[g + 1]] / counts[offsets[g]:offsets[g + 1], None])


def train(split: Split, config: TrainConfig, out: Path, *, val: Split | None = None, device: str = "cpu",
          progress: bool = True, run_config: dict | None = None, tail: TokenTraining | None = None,
          streamed: Streamed | None = None, part: Partition | None = None, resume: bool = False) -> TrainResult:
    """Train projection + group heads on one split's cached features; write the run to `out`.

    After every epoch config.json says how far training got (`complete`, `epochs_done`), the best
    epoch's model is kept, and the state that resumes training is saved (RESUME_FILE). With
    `resume`, training continues from it, and ends as an uninterrupted run would (bit for bit on
    the CPU); a run started with other settings is refused. With a `val` split the kept model's
    confidence is fitted on it at the end (calibration.json); the run is complete only then.

    `run_config`: what the run records of its inputs (RunConfig's `features`, `store`, splits,
    and details such as the device). `part`: the split's partition when the caller made it.
    With `tail` the last backbone blocks train too: it is the batch source (cached tokens through
    the blocks), adds their parameters, embeds the val split, and saves the blocks with the run.
    With `streamed` the split's embeddings stay on disk (`split.embeddings` is None) and are read
    in shuffled contiguous chunks, a memory budget's worth at a time.
    """
    with reproducible(device), writing(out):  # a full disk or read-only folder names the run folder
        return _train(split, config, out, val=val, device=device, progress=progress, run_config=run_config,
                      tail=tail, streamed=streamed, part=part, resume=resume)


def _train(split: Split, config: TrainConfig, out: Path, *, val: Split | None, device: str, progress: bool,
           run_config: dict | None, tail: TokenTraining | None, streamed: Streamed | None, part: Partition | None,
           resume: bool) -> TrainResult:
    t_start = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    # Sampling on the training device: a CPU generator would force a blocking copy per step.
    gen = torch.Generator(device=dev).manual_seed(config.seed)
    part = part if part is not None else make_partition(split, config)
    if streamed is None:
        features = torch.as_tensor(split.embeddings).to(dev)  # numpy, or a tensor already in place
        check_finite(features, split.name)
    in_dim = int(split.attrs["dim"]) if streamed is not None else features.shape[1]
    if config.dim is None:
        config = replace(config, dim=in_dim)
    recorded = dict(run_config or {})
    own = {k: recorded.pop(k) for k in ("store", "train_split", "val_split", "store_fingerprint") if k in recorded}
    run = RunConfig(train=config, features=recorded.pop("features", None) or FeatureIdentity(dim=in_dim),
                    classes_per_group=part.classes_per_group, **own)
    model = new_model(run).to(dev)
    sampler = BalancedSampler(part, dev, gen)
    opt = make_optimizer(config, [
        {"params": model.projection.parameters(), "lr": config.lr_projection},
        {"params": model.heads.parameters(), "lr": config.lr_heads},  # Schedule's heads_group
        *(tail.param_groups() if tail else []),
    ], fused=is_cuda(dev))
    schedule = Schedule(config, opt)
    groups = group_order(part, config.group_order)
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
    details = RunDetails(**recorded, classes=len(part.classes), images_used=used, steps_per_epoch=steps,
                         streamed=None if streamed is None else {"chunk_rows": streamed.chunk_rows,
                                                                 "buffer_chunks": streamed.buffer_chunks})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = TrainingState(model, opt, schedule, _generators(gen, tail.source if tail else batches), tail, config,
                   inputs={**own, "rows": len(part.group), "dim": in_dim,
                           "model_fingerprint": run.features.model_fingerprint},
                   reading=details.streamed)
    saved = read_resume(out) if resume else None
    if saved is not None:
        history = state.restore(out, *saved, part.classes)
        kept = state.kept(out)
    else:
        history, kept = [], None
        if config.prototype_init == "class-means" and streamed is None:
            class_means(features, model, sampler, part)
        elif config.prototype_init == "class-means":
            streamed_class_means(streamed, split.name, model, part)
        # else the heads' own Xavier initialisation stays, as in D&C's code.
    resumed_from = state.epoch
    run = replace(run, best_epoch=state.best_epoch, epochs_done=state.epoch, stopped=state.stopped,
                  details=replace(details, tokens=tail.tokens() if tail else None))
    for epoch in range(state.epoch + 1, config.epochs + 1 if state.stopped is None else 0):
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
        improved = score > state.best
        if improved:
            state.best, state.best_epoch = score, epoch
        state.epoch, state.stopped = epoch, record.get("stopped")
        history.append(record)
        append_log(out, record)
        # The resume state before the kept model: a kill between the two leaves a state that says
        # which epoch is kept, and resuming rewrites the kept model from it (TrainingState.kept).
        current = state.save(out)
        if improved:
            kept = (save_model(out, model, part.classes, epoch, state=current["model"]),
                    tail.save(out, epoch, state=current["tail"]) if tail else None)
        stderr.print(_epoch_line(record, config.epochs), highlight=False)  # --no-progress hides bars only
        run = replace(run, best_epoch=state.best_epoch, epochs_done=epoch, stopped=state.stopped,
                      details=replace(details, tokens=tail.tokens() if tail else None))
        # Last, so that a run killed at any point reads as stopped after the epochs it finished; the
        # last epoch's config says complete only once the confidence is fitted too.
        done = epoch == config.epochs or state.stopped is not None
        write_config(out, replace(run, complete=done and val is None))
        if done:
            break
    if state.best_epoch != state.epoch:  # the last epoch's model beside the kept one (D&C's script reports it)
        save_tensors(out / LAST_FILE, cpu_copy(model.state_dict()), {"epoch": str(state.epoch)})
    calibration, warnings = "uncalibrated: no --val-split", []
    if val is not None:
        calibration, warnings = _calibrate(model, tail, kept, part, config, val, out, split,
                                           (run_config or {}).get("store"))
    write_config(out, replace(run, complete=True))
    (out / RESUME_FILE).unlink(missing_ok=True)  # a finished run is never resumed
    return TrainResult(out=out, epochs=history, best_epoch=state.best_epoch, classes=len(part.classes),
                       images_used=used, seconds=time.perf_counter() - t_start, calibration=calibration,
                       resumed_from=resumed_from, warnings=warnings)


def group_order(part: Partition, order: str) -> list[int]:
    """The groups with classes, in the order they take turns: by id, or "first-seen": as each group is first
    met among the split's rows in classes (rows are sorted by image id)."""
    groups = [g for g, c in enumerate(part.classes_per_group) if c > 0]
    if order == "id":
        return groups
    kept = part.class_index >= 0
    seen, first = np.unique(part.group[kept], return_index=True)
    return [int(g) for g in seen[np.argsort(first, kind="stable")]]


def _epoch_line(record: dict, epochs: int) -> str:
    """The line training prints to stderr after each epoch (what a log under nohup shows)."""
    val = f", val LR@1 {100 * record['val_lr1']:.1f} %" if "val_lr1" in record else ""
    return (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, train accuracy "
            f"{100 * record['train_accuracy']:.1f} %{val}, {record['seconds']:.2f} s")


def _generators(gen: torch.Generator, source) -> dict[str, torch.Generator]:
    """Every random generator training draws from: sampling, and the chunk order of a streamed split."""
    gens = {"sampling": gen}
    if isinstance(source, StreamedBatches):
        gens["chunk_order"] = source.order_generator
    return gens


def _calibrate(model: DCModel, tail: TokenTraining | None, kept: tuple, part: Partition, config: TrainConfig,
               val: Split, out: Path, split: Split, store: str | None) -> tuple[str, list[str]]:
    """Fit the kept model's confidence and 90 % radius on the val split in hand (calibration.json);
    what the summary says of it, and warnings. A val split it cannot or must not be fitted on (the
    training split, a test split) leaves the run uncalibrated."""
    if same_split(val, split):
        return f"uncalibrated: --val-split {val.name} is the training split, where answers are surer than on new " \
               "photos; fit it with `dcfeat calibrate --split val` on a held-out split", []
    if val.name.startswith("test"):
        return f"uncalibrated: --val-split {val.name} is a test split, and a confidence fitted there makes its " \
               "figures optimistic; fit it with `dcfeat calibrate --split val` on a held-out split", []
    state, blocks = kept
    model.load_state_dict(state)
    if tail is not None:
        tail.restore(blocks)
    model.eval()
    try:
        cal = fit_confidence(model, part.classes, config.M, tail.features_of(val) if tail else val,
                             threshold_m=config.threshold_m, store=store or None)
    except BadInput as e:  # the run itself is sound: say why it has no confidence, do not fail
        return f"uncalibrated: {e}", []
    write_calibration(out, cal)
    return f"calibrated on '{val.name}'", [w for w in (few_queries_warning(cal),) if w]


def training_memory(in_dim: int, config: TrainConfig, classes_per_group: list[int]) -> int:
    """Bytes training holds besides the features: the model's weights with their gradients and the
    optimiser's two moments (float32), and one step's activations and its batch × classes logits
    (with their softmax and gradient) for the largest group."""
    classes, widest = sum(classes_per_group), max(classes_per_group)
    scored = max(1, math.ceil(widest * config.negative_fraction))
    params = in_dim * config.dim + config.dim + classes * (config.dim + 1)
    step = config.batch_size * (in_dim + 2 * config.dim) * 4 * 2 + config.batch_size * scored * 4 * 3
    return params * 4 * 4 + step


def check_training_memory(need: int, room: int, config: TrainConfig, classes_per_group: list[int],
                          device: torch.device) -> None:
    """Refuse before anything is allocated or created a model and step that cannot fit `room` bytes."""
    if need <= room:
        return
    where = "GPU memory" if is_cuda(device) else "memory"
    raise BadInput(f"training would need about {human_bytes(need)} of {where} for the model "
                   f"({sum(classes_per_group):,} classes × --dim {config.dim}, with gradients and the optimiser's "
                   f"moments) and a step (--batch-size {config.batch_size} × the {max(classes_per_group):,} classes "
                   f"of the largest group), but about {human_bytes(max(room, 0))} is free beside the features. "
                   "Lower --dim or --batch-size (or raise --M or --min-images-per-class for fewer classes)")


def train_warnings(config: TrainConfig, data: Split, val: Split | None) -> list[str]:
    """What training accepts but should say: a val split that is the training split, the dc-paper
    preset on centre-cropped features."""
    warnings = []
    if val is not None and same_split(val, data):
        warnings.append(f"--val-split {val.name} is the training split: val LR@1 then measures memorisation, the "
                        "epoch kept is not the one that generalises best, and the run is left uncalibrated. Pass a "
                        "held-out split (e.g. val)")
    features = with_defaults(data.attrs)
    if config.preset == "dc-paper" and features.get("pooling") != "none" and features.get("crop") == "centre":
        warnings.append(f"--preset dc-paper on centre-cropped features (split '{data.name}'): the D&C code tests "
                        "on whole images. Extract every split with `dcfeat extract --crop full` to follow it")
    return warnings


def train_files(feats: Path, split: str, config: TrainConfig, *, out: Path | None = None,
                val_split: str | None = None, device: str = "auto", progress: bool = True,
                command: str = "", memory_budget: int | None = None, restart: bool = False) -> TrainResult:
    """`dcfeat train`: read the split(s), train, and leave a complete run folder (+ runs/latest).

    A split larger than `memory_budget` bytes (default: half the free memory where training runs)
    is streamed from disk instead of read into memory. An `out` holding an unfinished run resumes
    it after its last finished epoch (`restart`: trains it again from the first); one
    `dcfeat train` at a time per run folder.
    """
    dev = resolve_device(device)
    budget = memory_budget or devices.memory_budget(dev)
    info = split_info(feats, split)
    if config.dim is None:  # the features' own width, as D&C's projection keeps the backbone's
        config = replace(config, dim=info.dim)
    row_bytes = info.dim * np.dtype(info.dtype).itemsize
    streamed = None
    if info.rows * row_bytes > budget and not config.finetune_blocks:
        streamed = Streamed.within(feats, budget, row_bytes)
    data = read_split(feats, split, embeddings=streamed is None)
    val = read_split(feats, val_split) if val_split else None
    if val is not None and val.labels.height == 0:
        raise BadInput(f"--val-split {val_split}: split '{val_split}' of {feats} holds no rows, so no epoch could be "
                       "scored. Extract validation images into it, or leave --val-split out")
    part = make_partition(data, config)  # a hopeless partition fails before the run folder exists
    need = training_memory(info.dim, config, part.classes_per_group)
    features_held = min(info.rows * row_bytes, budget)
    check_training_memory(need, devices.available_memory(dev) - features_held, config, part.classes_per_group, dev)
    warnings = train_warnings(config, data, val)
    tail = None
    if config.finetune_blocks:
        tail = TokenTraining.open(feats, split, val_split, data.attrs, config.finetune_blocks, config.lr_blocks)
    runs = Path(feats).parent / "runs"
    check_writable(out or runs)
    with writing(out or runs):
        run = new_run_dir(out, runs)
    run_config = {"features": FeatureIdentity.of_split(data.attrs), "store": str(Path(feats).resolve()),
                  "train_split": split, "val_split": val_split, "store_fingerprint": data.attrs.get("plan_id"),
                  "device": str(dev), "memory_budget": budget}
    with writing(run), run_lock(run):
        resume = resume_or_clear(run, restart=restart)
        if not resume:
            write_text(run / COMMAND_FILE, command + "\n")
        else:
            streamed = resumed_reading(run, feats, streamed)
            if streamed is None and data.embeddings is None:
                data = read_split(feats, split)
        result = train(data, config, run, val=val, device=str(dev), progress=progress, run_config=run_config,
                       tail=tail, streamed=streamed, part=part, resume=resume)
    if out is None:
        point_latest(run)
    return replace(result, memory_budget=budget, streamed=streamed is not None,
                   warnings=[*warnings, *result.warnings])
