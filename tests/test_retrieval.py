import numpy as np
import pytest
import torch

from dcfeat.retrieval import topk_cosine


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
    s, i = topk_cosine(q, db, 5, query_chunk=query_chunk, db_chunk=db_chunk, backend="torch")
    es, ei = _expect(_brute(q, db), 5)
    assert s.dtype == np.float32 and i.dtype == np.int64 and i.shape == (13, 5)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_allclose(s, es, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_the_faiss_backend_matches_brute_force_across_chunks(normalize):
    pytest.importorskip("faiss")
    from dcfeat.retrieval import _topk_faiss

    q, db = _data(nq=13, nd=50)
    for chunk in (7, 50, 1000):  # several chunks merged, one, one larger than the database
        s, i = _topk_faiss(q, db.astype(np.float16), 5, normalize=normalize, db_chunk=chunk)
        es, ei = _expect(_brute(q, db.astype(np.float16).astype(np.float32), normalize=normalize), 5)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_allclose(s, es, atol=1e-4)
    np.testing.assert_array_equal(topk_cosine(q, db, 5, backend="faiss")[1], topk_cosine(q, db, 5, backend="torch")[1])
    with pytest.raises(ValueError, match="backend"):
        topk_cosine(q, db, 5, backend="annoy")


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


def test_h5py_dataset_as_database(tmp_path):
    h5py = pytest.importorskip("h5py")
    q, db = _data()
    with h5py.File(tmp_path / "db.h5", "w") as f:
        dset = f.create_dataset("embeddings", data=db.astype(np.float16), chunks=(8, 16))
        expected = _brute(q, db.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(topk_cosine(q, dset, 4, db_chunk=9)[1], _expect(expected, 4)[1])
