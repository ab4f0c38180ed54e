"""Batch sources for training: class-balanced batches of one group per step, in memory or streamed.

Every source is called with the step number and the groups that take turns in
this epoch (all of them, or one: D&C's code trains one group per epoch), and
returns (group, the batch's rows of features or tokens, class index within the
group); step 0 starts an epoch. Within a group a class is drawn uniformly, then
an image uniformly within it (D&C's sampling).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dcfeat.errors import DamagedStore
from dcfeat.store import open_store

# Streamed cached tokens are read CHUNK_ROWS contiguous rows per h5py call (200 MB of ViT-B/14
# tokens) and trained on BUFFER_CHUNKS such chunks at a time, drawn at random over the split;
# streamed embeddings take both sizes from the memory budget instead (`Streamed.within`).
CHUNK_ROWS = 512
BUFFER_CHUNKS = 16


class RowClasses(Protocol):
    """Per row of a split: its group and its class index within the group (-1: in no class).
    dcfeat.partition.Partition is one."""

    group: np.ndarray
    class_index: np.ndarray

    @property
    def classes_per_group(self) -> list[int]: ...


class BalancedSampler:
    """Class-balanced batches of one group: class uniform, then image uniform in it.

    With `rows`, only those rows of the split (a streamed buffer of tokens): classes with no
    image among them are not drawn, and indices are positions within `rows`.
    """

    def __init__(self, part: RowClasses, device: torch.device, generator: torch.Generator,
                 rows: np.ndarray | None = None):
        self.generator = generator
        self.groups = []
        cls = part.class_index if rows is None else part.class_index[rows]
        group = part.group if rows is None else part.group[rows]
        for g in range(len(part.classes_per_group)):
            mine = np.flatnonzero((group == g) & (cls >= 0))
            order = mine[np.argsort(cls[mine], kind="stable")]
            counts = np.bincount(cls[order], minlength=part.classes_per_group[g])
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self.groups.append(tuple(torch.as_tensor(a, device=device)
                                     for a in (order, starts, counts, np.flatnonzero(counts))))

    def batch(self, group: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices into the split, class index within the group)."""
        order, starts, counts, present = self.groups[group]
        gen = self.generator
        labels = present[torch.randint(len(present), (size,), generator=gen, device=order.device)]
        within = (torch.rand(size, generator=gen, device=order.device) * counts[labels]).long()
        return order[starts[labels] + within], labels


class InMemoryBatches:
    """Step t: a class-balanced batch of group groups[t mod len(groups)], from rows of `features`."""

    def __init__(self, features: torch.Tensor, sampler: BalancedSampler, size: int):
        self.features, self.sampler, self.size = features, sampler, size

    def __call__(self, step: int, groups: list[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        g = groups[step % len(groups)]
        rows, labels = self.sampler.batch(g, self.size)
        return g, self.features[rows], labels


def read_rows(store: Path, split: str, dataset: str, chunks: list[tuple[int, int]]) -> np.ndarray:
    """Rows [start, stop) of each chunk of a split's `embeddings` or `tokens`, concatenated: one h5py
    read per chunk (random row access costs ~40 µs a call; a contiguous chunk reads at disk speed)."""
    with open_store(store) as f:
        ds = f[split][dataset]
        return np.concatenate([ds[a:b] for a, b in chunks]) if chunks else np.zeros((0, *ds.shape[1:]), ds.dtype)



@dataclass(frozen=True)
class Streamed:
    """A split trained from disk: its store, and how it is read (rows per read, reads held at once)."""

    store: Path
    chunk_rows: int
    buffer_chunks: int

    @classmethod
    def within(cls, store: Path, budget: int, row_bytes: int) -> "Streamed":
        """Reads sized so that two buffers (the one training, the one being read) fit `budget`."""
        rows = max(1, budget // (2 * row_bytes))
        chunk = max(1, min(65536, rows // 16))  # ≥ 16 places per buffer; ~40 µs per read is then noise
        return cls(Path(store), chunk, max(1, rows // chunk))


class StreamedBatches:
    """Class-balanced batches from rows (embeddings or tokens) that do not fit in memory, read in large contiguous chunks.

    Rows are sorted by image id, and SF-XL ids by UTM east: one chunk is a strip of the city
    with few classes. So every epoch shuffles the chunks and trains on `buffer_chunks` of them
    (default BUFFER_CHUNKS) at a time (many places, many classes), sampling class-balanced among
    the buffer's rows; a buffer gets a share of the epoch's steps equal to its share of the rows
    in classes, so an epoch still sees every image about once. The next buffer is read while
    this one trains.
    """

    def __init__(self, store: Path, split: str, dataset: str, rows: int, part: RowClasses, steps: int, size: int,
                 device: torch.device, generator: torch.Generator, seed: int, *, chunk_rows: int | None = None,
                 buffer_chunks: int | None = None):
        self.store, self.split, self.dataset, self.rows, self.part = store, split, dataset, rows, part
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.buffer_chunks = buffer_chunks or BUFFER_CHUNKS
        self.steps, self.size, self.device, self.generator = steps, size, device, generator
        self.order_generator = torch.Generator().manual_seed(seed)
        self.pool = ThreadPoolExecutor(max_workers=1)

    def _epoch(self, groups: list[int]) -> list[tuple[list[tuple[int, int]], int]]:
        """(chunks, steps) of every buffer of an epoch that trains `groups`; buffers without their rows get none."""
        chunk, per_buffer = self.chunk_rows, self.buffer_chunks
        starts = torch.randperm(-(-self.rows // chunk), generator=self.order_generator).numpy() * chunk
        used = (self.part.class_index >= 0) & np.isin(self.part.group, groups)
        buffers = [sorted((int(a), min(int(a) + chunk, self.rows)) for a in starts[i:i + per_buffer])
                   for i in range(0, len(starts), per_buffer)]
        share = np.cumsum([sum(int(used[a:b].sum()) for a, b in chunks) for chunks in buffers])
        ends = np.round(share / share[-1] * self.steps).astype(int)
        counts = np.diff(np.concatenate([[0], ends]))
        return [(chunks, int(n)) for chunks, n in zip(buffers, counts) if n > 0]

    def _next_buffer(self) -> None:
        chunks, self.left = self.plan[self.index]
        tokens = self.pending.result()
        self.index += 1
        if self.index < len(self.plan):
            self.pending = self.pool.submit(read_rows, self.store, self.split, self.dataset, self.plan[self.index][0])
        rows = np.concatenate([np.arange(a, b) for a, b in chunks])
        self.tokens = torch.from_numpy(tokens).to(self.device)
        self.sampler = BalancedSampler(self.part, self.device, self.generator, rows=rows)
        self.groups = [g for g, (*_, present) in enumerate(self.sampler.groups) if len(present) and g in self.turns]

    def __call__(self, step: int, groups: list[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        if step == 0:
            # Groups take turns across buffers: a buffer may last a step or two, and restarting the
            # turn at each one would train the first groups only.
            self.plan, self.index, self.left, self.turn, self.turns = self._epoch(groups), 0, 0, 0, set(groups)
            self.pending = self.pool.submit(read_rows, self.store, self.split, self.dataset, self.plan[0][0])
        while self.left == 0:
            self._next_buffer()
        self.left -= 1
        g = self.groups[self.turn % len(self.groups)]
        self.turn += 1
        rows, labels = self.sampler.batch(g, self.size)
        return g, self.tokens[rows], labels


def check_finite(x: torch.Tensor | np.ndarray, split: str, first_row: int = 0) -> None:
    finite = torch.isfinite(torch.as_tensor(x)).all(dim=1)
    if not finite.all():
        rows = (torch.nonzero(~finite).flatten()[:3] + first_row).tolist()
        raise DamagedStore(f"split '{split}' holds non-finite embeddings (NaN or infinity) in "
                           f"{int((~finite).sum())} rows, first {rows}; re-extract it with `dcfeat extract --split "
                           f"{split} --overwrite`")
