"""`dcfeat extract`: images → frozen backbone (DINOv2, DINOv3, a torch.hub VPR model) features in a feature store, once.

DataLoader workers decode and crop while the model runs; results go into
shards of the split's plan (dcfeat.shards), so a killed run resumes where it
stopped. Under `torchrun` every rank takes a contiguous slice of the shard grid
(and so of the sorted image list), writes its own shards, and rank 0 assembles
the store once all ranks are done.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dcfeat import __version__
from dcfeat.backbone import FrozenBackbone, load_backbone
from dcfeat.choices import CROPS, DEFAULT_MODEL, DEFAULT_SHARD_ROWS
from dcfeat.devices import is_cuda, resolve_device
from dcfeat.errors import BadInput, DcfeatError, check_free_space, writing
from dcfeat.images import MAX_PIXELS, ImageDataset, collate, decoding_workers
from dcfeat.labels import LabelledImages, collect_images, unread_files
from dcfeat.layout import check_split_name, check_store_path
from dcfeat.shards import writer_lock
from dcfeat.progress import progress_bar
from dcfeat.shards import Plan, assemble, load_plan, open_plan, shard_complete, write_shard
from dcfeat.store import read_failures, split_info


@dataclass
class ExtractResult:
    store: Path
    split: str
    images: int
    rows: int  # rows in the assembled split
    failures: int
    processed: int  # images this run read: embedded or skipped (0 when the split was complete)
    seconds: float
    already_complete: bool
    random_init: bool
    failed_examples: list[tuple[str, str]] = field(default_factory=list)
    rank: int = 0  # under torchrun only rank 0 reports
    unread: list[tuple[str, str]] = field(default_factory=list)  # image files of a format dcfeat does not read

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Ranks:
    """This process's place among `torchrun` processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            # gloo only carries barriers and a few small objects; NCCL is not needed.
            torch.distributed.init_process_group("gloo")
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def share(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, n: int) -> int:
        """Sum of `n` over all ranks."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def my_slice(self, items: list) -> list:
        n = len(items)
        return items[self.rank * n // self.world:(self.rank + 1) * n // self.world]


class ShardBatches(torch.utils.data.Sampler):
    """Batches of plan rows that never cross a shard boundary, shard after shard.

    Made as they are drawn: a list of every batch would hold one Python int per image (41 M
    images of SF-XL's raw database: ~1.5 GB).
    """

    def __init__(self, shards: list[tuple[int, int, int]], batch_size: int):
        self.shards, self.batch_size = shards, batch_size

    def __iter__(self):
        for _, start, stop in self.shards:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for _, start, stop in self.shards)


def check_crop(crop: str, cache_tokens: int) -> None:
    """--crop is one of CROPS; whole images (a token count per shape) cache no tokens."""
    if crop not in CROPS:
        raise BadInput(f"--crop {crop}: choose one of {', '.join(CROPS)}")
    if crop == "full" and cache_tokens:
        raise BadInput(f"--cache-tokens {cache_tokens} with --crop full: whole images of different shapes have "
                       "different token counts, and a split's token cache holds one. Pass --cache-tokens 0 for "
                       "whole-image features, or --crop centre to cache tokens for --finetune-blocks")


def store_attrs(backbone: FrozenBackbone, image_size: int, dtype: str, images: LabelledImages, draft: bool,
                cache_tokens: int = 0, crop: str = "centre") -> dict:
    """Everything that changes the features' content, recorded with them (STYLE 6)."""
    attrs = {"model": backbone.name, "model_source": backbone.source, "model_fingerprint": backbone.fingerprint,
             "backbone_random_init": backbone.random_init, "pooling": backbone.pooling,
             "image_size": image_size, "crop": crop, "dim": backbone.dim, "dtype": dtype, "draft": draft,
             "images_root": str(Path(images.root).resolve()), "dcfeat_version": __version__, **backbone.record}
    if not images.positions:  # only then, as below: plans of labelled splits are unchanged
        attrs["labelled"] = False
    if cache_tokens:  # only then: plans (and so resumes) of splits without tokens are unchanged
        attrs.update(cache_tokens=cache_tokens,
                     tokens_shape=[backbone.tokens_per_image(image_size), backbone.hidden_size])
    return attrs


def _run_shards(plan: Plan, shards: list[tuple[int, int, int]], images: LabelledImages, backbone: FrozenBackbone, *,
                batch_size: int, workers: int, draft: bool, max_pixels: int, progress: bool) -> int:
    dataset = ImageDataset(images.paths, int(plan.attrs["image_size"]), crop=plan.attrs["crop"],
                           patch_size=backbone.patch_size, draft=draft, max_pixels=max_pixels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=ShardBatches(shards, batch_size), num_workers=workers, collate_fn=collate,
        pin_memory=is_cuda(backbone.device), persistent_workers=False,
        prefetch_factor=4 if workers else None)
    bounds = {index: (start, stop) for index, start, stop in shards}
    shard_of = {start: index for index, start, _ in shards}
    total = sum(stop - start for _, start, stop in shards)
    done = 0
    current, rows, outs, failures, toks = None, [], [], [], []
    cache_tokens = int(plan.attrs.get("cache_tokens", 0))
    token_dtype = getattr(torch, plan.attrs["dtype"])

    def finish(index, rows, outs, failures, toks):
        emb = torch.cat(outs).cpu().numpy() if outs else np.zeros((0, backbone.dim), np.float32)
        tokens = None
        if cache_tokens:
            tokens = torch.cat(toks).numpy() if toks else np.zeros((0, *plan.attrs["tokens_shape"]), np.float16)
        write_shard(plan, index, np.array(rows, dtype=np.int64), emb, failures, tokens=tokens)

    # Shards are written (device→host copy, HDF5, fsync) by one background thread while
    # the model goes on; at most one write is pending, which bounds the memory held.
    pending = None
    with ThreadPoolExecutor(max_workers=1) as writer, \
            progress_bar(f"extract {plan.split}", total, enabled=progress) as advance:
        for indices, crops, failed in loader:
            first = min(indices + [i for i, _ in failed])
            if current is None or first >= bounds[current][1]:
                current = shard_of[first]
            if crops is not None:
                if cache_tokens:
                    # Tokens go to the host per batch, in the storage dtype: a shard of them
                    # would not fit on the GPU (8192 ViT-B/14 images: 3.2 GB at fp16).
                    emb, tokens = crops.map(lambda x: backbone.embed(x, cache_tokens=cache_tokens))
                    toks.append(tokens.to(token_dtype).cpu())
                else:
                    emb = crops.map(backbone.embed)
                outs.append(emb)
                rows.extend(indices)
            failures.extend(failed)
            n = len(indices) + len(failed)
            done += n
            advance(n)
            start, stop = bounds[current]
            if len(rows) + len(failures) == stop - start:
                if pending is not None:
                    pending.result()
                pending = writer.submit(finish, current, rows, outs, failures, toks)
                rows, outs, failures, toks = [], [], [], []
        if pending is not None:
            pending.result()
    return done


def extract(images: LabelledImages, backbone: FrozenBackbone, store: Path, split: str = "train", *,
            image_size: int = 224, batch_size: int = 64, workers: int | None = None, draft: bool = True,
            dtype: str = "float16", shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False,
            max_pixels: int = MAX_PIXELS, progress: bool = True, ranks: Ranks | None = None,
            cache_tokens: int = 0, crop: str = "centre") -> ExtractResult:
    """Embed `images` into `split` of `store`, resuming any unfinished run of the same plan.

    `cache_tokens=K` also stores every image's hidden states entering block L − K (dcfeat.finetune).
    `crop`: one of dcfeat.images.CROPS; with "full", batches run one forward per image shape.
    """
    check_split_name(split)
    check_crop(crop, cache_tokens)
    store = check_store_path(store)
    patch = backbone.patch_size
    if image_size < patch or image_size % patch:
        near = sorted({max(patch, image_size // patch * patch), (image_size // patch + 1) * patch})
        raise BadInput(f"--image-size {image_size}: {backbone.name} has patch size {patch}; choose a multiple of "
                       f"{patch} (nearest: {' or '.join(map(str, near))}; e.g. {16 * patch}, {24 * patch}, "
                       f"{32 * patch})")
    backbone.check_cache_tokens(cache_tokens)
    ranks = ranks or Ranks()
    workers = decoding_workers(workers, len(images), batch_size)
    store.parent.mkdir(parents=True, exist_ok=True)
    attrs = store_attrs(backbone, image_size, dtype, images, draft, cache_tokens, crop)
    t0 = time.perf_counter()
    # A read-only folder or a refused permission while writing is one message naming the folder.
    with writing(store.parent), writer_lock(store) if ranks.rank == 0 else nullcontext():
        shared = None
        if ranks.rank == 0:
            try:
                plan, complete = open_plan(store, split, images.labels, attrs, shard_rows=shard_rows,
                                           overwrite=overwrite)
                shared = (plan.plan_id, complete, None)
            except DcfeatError as e:  # every rank raises it, not only rank 0
                shared = (None, False, e)
        plan_id, complete, error = ranks.share(shared)
        if error:
            raise error
        plan = load_plan(store, split, plan_id)
        processed = 0
        if not complete:
            mine = [s for s in ranks.my_slice(plan.shards) if not shard_complete(plan, s[0])]
            check_free_space(plan.directory, sum(plan.shard_bytes(stop - start) for _, start, stop in mine))
            processed = _run_shards(plan, mine, images, backbone, batch_size=batch_size, workers=workers,
                                    draft=draft, max_pixels=max_pixels, progress=progress and ranks.rank == 0)
            processed = ranks.total(processed)
            if ranks.rank == 0:
                assemble(plan)
            ranks.barrier()
    info = split_info(store, split)
    failed = read_failures(store, split)
    return ExtractResult(store=store, split=split, images=plan.rows, rows=info.rows, failures=info.failures,
                         processed=processed, seconds=time.perf_counter() - t0, already_complete=complete,
                         random_init=backbone.random_init, failed_examples=failed[:10], rank=ranks.rank)


def extract_files(images: Path | None, out: Path, split: str = "train", *, manifest: Path | None = None,
                  path_column: str = "path", model: str = DEFAULT_MODEL, pooling: str | None = None, device: str = "auto",
                  backbone: FrozenBackbone | None = None, labelled: bool = True, **options) -> ExtractResult:
    """`dcfeat extract`: label the images, load the backbone (each torchrun process on its own GPU), embed.

    `backbone`: one already loaded (several splits, one load). `options` are those of `extract`
    (image_size, batch_size, workers, draft, dtype, shard_rows, …). `labelled=False`: photos whose
    positions are unknown, any file names, cached for `dcfeat predict --feats`.
    """
    check_split_name(split)
    check_crop(options.get("crop", "centre"), options.get("cache_tokens", 0))  # before labels and weights load
    out = check_store_path(out)
    listed = collect_images(images, manifest, path_column=path_column, positions=labelled)
    ranks = Ranks.from_env()
    backbone = backbone or load_backbone(model, pooling=pooling, device=resolve_device(
        device, local_rank=ranks.local_rank, world=ranks.world))
    result = extract(listed, backbone, out, split, ranks=ranks, **options)
    return replace(result, unread=unread_files(images) if manifest is None else [])
