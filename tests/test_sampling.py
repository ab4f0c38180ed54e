"""Class-balanced sampling (D&C's): a class uniformly within the group, then an image uniformly within the
class; and how a streamed epoch's steps are shared among its buffers."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dcfeat.partition import partition
from dcfeat.sampling import BalancedSampler, StreamedBatches

DRAWS = 200_000


@dataclass
class Rows:
    """The least a sampler needs of a split: per row its group and class (-1: none), and classes per group."""

    group: np.ndarray
    class_index: np.ndarray
    classes_per_group: list[int]


def rows_of(spec: dict[int, list[int]], unclassed: dict[int, int], seed: int = 0) -> Rows:
    """spec[g][c]: images of class c of group g; unclassed[g]: rows of group g in no class. Rows shuffled."""
    group, cls = [], []
    for g, sizes in spec.items():
        for c, size in enumerate(sizes):
            group += [g] * size
            cls += [c] * size
        group += [g] * unclassed.get(g, 0)
        cls += [-1] * unclassed.get(g, 0)
    order = np.random.default_rng(seed).permutation(len(group))
    return Rows(np.array(group, np.int64)[order], np.array(cls, np.int64)[order], [len(s) for s in spec.values()])


# Group 0: a class of one image beside one of 100, and a class with no image at all (index 4).
SPEC = {0: [1, 100, 7, 30, 0], 1: [5, 5, 50]}
UNCLASSED = {0: 40, 1: 20}


def sampler(part, seed: int = 0, rows: np.ndarray | None = None) -> BalancedSampler:
    return BalancedSampler(part, torch.device("cpu"), torch.Generator().manual_seed(seed), rows=rows)


def chi2_bound(dof: int, z: float = 4.753) -> float:
    """Upper 1e-6 quantile of chi-square with `dof` degrees of freedom (Wilson-Hilferty; z is N(0,1)'s
    upper 1e-6 quantile): above scipy's chi2.isf(1e-6, dof) by 15 % at 1 dof, 7 % at 3, 0.2 % at 99."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * np.sqrt(a)) ** 3


def chi2(counts: np.ndarray) -> float:
    """Pearson's statistic of counts against equal expected counts."""
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_every_row_drawn_is_of_the_group_and_has_the_class_returned():
    part = rows_of(SPEC, UNCLASSED)
    s = sampler(part)
    for g in SPEC:
        rows, labels = s.batch(g, 5000)
        rows, labels = rows.numpy(), labels.numpy()
        assert rows.shape == labels.shape == (5000,)
        assert (part.group[rows] == g).all()
        assert np.array_equal(part.class_index[rows], labels)
        assert (part.class_index[rows] >= 0).all()  # a row in no class is never drawn


def test_classes_are_drawn_uniformly_whatever_their_size():
    part = rows_of(SPEC, UNCLASSED)
    _, labels = sampler(part, seed=1).batch(0, DRAWS)
    counts = np.bincount(labels.numpy(), minlength=5)
    assert counts[4] == 0  # the class with no image
    # Measured 1.9 here; at most 13.7 over seeds 0-199 (3 dof). Bound 32.8.
    assert chi2(counts[:4]) < chi2_bound(3), counts


def test_a_class_of_one_image_is_drawn_as_often_as_a_class_of_a_hundred():
    part = rows_of({0: [1, 100]}, {0: 10})
    rows, labels = sampler(part, seed=2).batch(0, DRAWS)
    share = float((labels == 0).float().mean())
    # Measured 0.5003 here, 0.4968-0.5034 over seeds 0-199 (sd 0.0011); drawing images uniformly gives 1/101.
    assert abs(share - 0.5) < 0.006, share
    (only,) = np.flatnonzero((part.group == 0) & (part.class_index == 0))
    assert set(rows[labels == 0].tolist()) == {only}


def test_images_are_drawn_uniformly_within_each_class():
    part = rows_of(SPEC, UNCLASSED)
    rows, labels = sampler(part, seed=3).batch(0, DRAWS)
    rows, labels = rows.numpy(), labels.numpy()
    for c in (1, 2, 3):  # 100, 7 and 30 images
        members = np.flatnonzero((part.group == 0) & (part.class_index == c))
        counts = np.array([(rows == r).sum() for r in members])
        assert counts.sum() == (labels == c).sum() and (counts > 0).all()
        # Measured over seeds 0-199: at most 0.75 of the bound, for each of the three class sizes.
        assert chi2(counts) < chi2_bound(len(members) - 1), (c, counts)


def test_rows_restrict_the_draw_to_them_and_indices_are_positions_within_rows():
    part = rows_of(SPEC, UNCLASSED, seed=4)
    rng = np.random.default_rng(4)
    # Some rows of every kind, in no particular order, but none of group 0's class 0 (its one image) or class 2.
    dropped = (part.group == 0) & np.isin(part.class_index, [0, 2])
    rows = rng.permutation(np.flatnonzero(~dropped & (rng.random(len(part.group)) < 0.6)))
    s = sampler(part, seed=5, rows=rows)
    for g in SPEC:
        present = set(part.class_index[rows][(part.group[rows] == g) & (part.class_index[rows] >= 0)].tolist())
        positions, labels = s.batch(g, DRAWS)
        positions, labels = positions.numpy(), labels.numpy()
        assert positions.min() >= 0 and positions.max() < len(rows)
        assert (part.group[rows[positions]] == g).all()
        assert np.array_equal(part.class_index[rows[positions]], labels)
        assert set(labels.tolist()) == present  # classes without an image among `rows` never come up
        counts = np.bincount(labels)[sorted(present)]
        assert chi2(counts) < chi2_bound(len(present) - 1), (g, counts)


def test_a_real_partition_is_sampled_within_its_classes():
    rng = np.random.default_rng(6)
    n = 600
    east, north = 550_000 + rng.uniform(0, 200, n), 4_180_000 + rng.uniform(0, 200, n)
    part = partition(east, north, np.full(n, 10), np.full(n, "S"), M=20.0, N=2, min_images_per_class=6)
    assert (part.class_index < 0).any() and sum(part.classes_per_group) > 10  # some cells are dropped
    s = sampler(part, seed=6)
    for g, classes in enumerate(part.classes_per_group):
        rows, labels = s.batch(g, 20_000)
        rows, labels = rows.numpy(), labels.numpy()
        assert (part.group[rows] == g).all() and np.array_equal(part.class_index[rows], labels)
        assert set(labels.tolist()) == set(range(classes))


# Streamed epochs ----------------------------------------------------------------------------------------


def streamed(part: Rows, steps: int, chunk_rows: int, buffer_chunks: int, seed: int = 0) -> StreamedBatches:
    return StreamedBatches(None, "train", "embeddings", len(part.group), part, steps, 8, torch.device("cpu"),
                           torch.Generator().manual_seed(seed), seed, chunk_rows=chunk_rows,
                           buffer_chunks=buffer_chunks)


def chunked(kinds: list[list[tuple[int, int, int]]]) -> Rows:
    """One chunk per entry: (rows, group, class index) runs, in order."""
    group, cls = [], []
    for chunk in kinds:
        for n, g, c in chunk:
            group += [g] * n
            cls += [c] * n
    return Rows(np.array(group, np.int64), np.array(cls, np.int64), [3, 3])


# Eight chunks of 10 rows: rows in classes of group 0, of group 1, and in no class.
CHUNKS = chunked([
    [(10, 0, -1)],                    # 0: no class
    [(5, 0, 0), (5, 0, 1)],           # 1: 10 of group 0
    [(5, 0, 2), (5, 1, -1)],          # 2: 5 of group 0
    [(10, 1, 0)],                     # 3: 10 of group 1
    [(5, 0, 1), (5, 1, 2)],           # 4: 5 of group 0, 5 of group 1
    [(10, 0, 0)],                     # 5: 10 of group 0
    [(5, 1, 1), (5, 0, -1)],          # 6: 5 of group 1
    [(10, 0, 2)],                     # 7: 10 of group 0
])


@pytest.mark.parametrize(("groups", "steps", "want"), [
    # Group 0 trains: 40 rows in its classes, 3 steps a row; chunks 0, 3 and 6 hold none of them.
    ([0], 120, {1: 30, 2: 15, 4: 15, 5: 30, 7: 30}),
    # Both: 60 rows, 2 steps a row; only chunk 0 holds no row in a class.
    ([0, 1], 120, {1: 20, 2: 10, 3: 20, 4: 20, 5: 20, 6: 10, 7: 20}),
    ([1], 20, {3: 10, 4: 5, 6: 5}),
])
def test_a_buffer_gets_the_steps_of_its_rows_in_classes_of_the_trained_groups(groups, steps, want):
    source = streamed(CHUNKS, steps, chunk_rows=10, buffer_chunks=1)
    for _ in range(3):  # every epoch shuffles the chunks anew; the shares stay
        plan = source._epoch(groups)
        got = {}
        for chunks, n in plan:
            ((a, b),) = chunks
            assert b - a == 10 and a % 10 == 0
            got[a // 10] = n
        assert got == want and sum(n for _, n in plan) == steps


def _used(part: Rows, groups: list[int]) -> np.ndarray:
    return (part.class_index >= 0) & np.isin(part.group, groups)


@pytest.mark.parametrize("seed", range(5))
def test_the_steps_of_an_epoch_are_shared_in_proportion_and_sum_exactly(seed):
    rng = np.random.default_rng(seed)
    n = 100  # 15 chunks of 7 rows, the last of 2; buffers of 3 chunks
    part = Rows(rng.integers(0, 4, n), np.where(rng.random(n) < 0.3, rng.integers(0, 5, n), -1), [5] * 4)
    groups = [1, 2]
    used = _used(part, groups)
    total = int(used.sum())
    for steps in (37, 10 * total, 2):
        plan = streamed(part, steps, chunk_rows=7, buffer_chunks=3, seed=seed)._epoch(groups)
        assert sum(k for _, k in plan) == steps
        seen = []
        for chunks, k in plan:
            assert k > 0 and 1 <= len(chunks) <= 3 and chunks == sorted(chunks)
            assert all(a % 7 == 0 and b == min(a + 7, n) for a, b in chunks)
            mine = sum(int(used[a:b].sum()) for a, b in chunks)
            assert mine > 0  # a buffer without rows in the trained classes is dropped
            assert abs(k - steps * mine / total) <= 1  # its share, rounded cumulatively
            seen += [r for a, b in chunks for r in range(a, b)]
        assert len(seen) == len(set(seen))  # no chunk twice
        if steps == 10 * total:  # every buffer with such rows gets at least 9 steps: all of them are read
            assert set(np.flatnonzero(used)) <= set(seen)
        if steps == 2:
            assert len(plan) <= 2
