import numpy as np
import pytest
import torch

from dcfeat.retrieval import _plan_groups, topk_cosine, topk_cosine_restricted


def _data(nq=13, nd=50, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((nq, d)).astype(np.float32), rng.standard_normal((nd, d)).astype(np.float32)


def _brute(q, db, normalize=True):
    q, db = q.astype(np.float64), db.astype(np.float64)
    if normalize:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        db = db / np.linalg.norm(db, axis=1, keepdims=True)
    return q @ db.T


def _expect(scores, k):
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, 1), idx


@pytest.mark.parametrize(("query_chunk", "db_chunk"), [(1, 1), (3, 7), (100, 1000), (4, 16)])
def test_topk_matches_brute_force(query_chunk, db_chunk):
    q, db = _data()
    s, i = topk_cosine(q, db, 5, query_chunk=query_chunk, db_chunk=db_chunk)
    es, ei = _expect(_brute(q, db), 5)
    assert s.dtype == np.float32 and i.dtype == np.int64 and i.shape == (13, 5)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_allclose(s, es, atol=1e-5)


def test_k_larger_than_database_returns_all_rows():
    q, db = _data(nd=4)
    s, i = topk_cosine(q, db, 10, db_chunk=3)
    assert i.shape == (13, 4)
    np.testing.assert_array_equal(i, _expect(_brute(q, db), 4)[1])
    assert np.isfinite(s).all()


def test_fp16_and_tensor_inputs():
    q, db = _data()
    db16 = db.astype(np.float16)
    _, expected = _expect(_brute(q, db16.astype(np.float32)), 5)
    np.testing.assert_array_equal(topk_cosine(q.astype(np.float16), db16, 5, db_chunk=8)[1], expected)
    np.testing.assert_array_equal(topk_cosine(torch.from_numpy(q), torch.from_numpy(db16), 5)[1], expected)


def test_inner_product_without_normalize():
    q, db = _data()
    s, i = topk_cosine(q, db, 3, normalize=False, db_chunk=11)
    es, ei = _expect(_brute(q, db, normalize=False), 3)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_allclose(s, es, rtol=1e-5)


def test_dimension_mismatch_raises():
    q, db = _data()
    with pytest.raises(ValueError, match="dimensions"):
        topk_cosine(q, db[:, :8], 3)


def _allowed_sets(nq, nd, seed=1):
    rng = np.random.default_rng(seed)
    shared = rng.choice(nd, 12, replace=False)
    allowed = []
    for qi in range(nq):
        if qi % 4 == 0:
            allowed.append(shared)  # identical sets, as hybrid mode produces for nearby queries
        elif qi % 4 == 1:
            allowed.append(rng.choice(nd, rng.integers(1, 4), replace=False))  # fewer than k
        else:
            allowed.append(rng.choice(nd, 20, replace=False))
    allowed[2] = np.array([], dtype=np.int64)
    allowed[3] = np.array([5, 5, 9])  # duplicates count once
    return allowed


@pytest.mark.parametrize("max_group_queries", [1, 3, 256])
def test_restricted_matches_masked_brute_force(max_group_queries):
    q, db = _data(nq=17, nd=60)
    allowed = _allowed_sets(17, 60)
    k = 5
    s, i = topk_cosine_restricted(q, db.astype(np.float16), allowed, k, max_group_queries=max_group_queries)
    full = _brute(q, db.astype(np.float16).astype(np.float32))
    assert s.shape == i.shape == (17, k)
    for qi, cand in enumerate(allowed):
        cand = np.unique(cand)
        order = cand[np.argsort(-full[qi, cand], kind="stable")][:k]
        n = len(order)
        np.testing.assert_array_equal(i[qi, :n], order)
        np.testing.assert_allclose(s[qi, :n], full[qi, order], atol=1e-5)
        np.testing.assert_array_equal(i[qi, n:], -1)
        assert np.isneginf(s[qi, n:]).all()


def test_restricted_rejects_bad_candidates():
    q, db = _data(nq=2, nd=10)
    with pytest.raises(ValueError, match="outside the database"):
        topk_cosine_restricted(q, db, [np.array([0]), np.array([10])], 3)
    with pytest.raises(ValueError, match="one candidate array per query"):
        topk_cosine_restricted(q, db, [np.array([0])], 3)


def test_plan_groups_covers_every_query_once():
    allowed = _allowed_sets(40, 100)
    groups = _plan_groups(allowed, 100, max_queries=5, max_union=30, waste=2.0)
    assert sorted(qi for g in groups for qi in g) == list(range(40))
    assert max(len(g) for g in groups) <= 5
    # The identical sets share groups rather than each costing its own gather.
    assert len(groups) < 40


def test_h5py_dataset_as_database(tmp_path):
    h5py = pytest.importorskip("h5py")
    q, db = _data()
    with h5py.File(tmp_path / "db.h5", "w") as f:
        dset = f.create_dataset("embeddings", data=db.astype(np.float16), chunks=(8, 16))
        expected = _brute(q, db.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(topk_cosine(q, dset, 4, db_chunk=9)[1], _expect(expected, 4)[1])
        allowed = _allowed_sets(13, 50)
        from_file = topk_cosine_restricted(q, dset, allowed, 4)[1]
        np.testing.assert_array_equal(from_file, topk_cosine_restricted(q, db.astype(np.float16), allowed, 4)[1])
