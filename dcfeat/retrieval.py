"""Exact cosine k-nearest-neighbour search in chunks: torch, or faiss-cpu's exact knn where installed
(the hybrid's search among the rows of given cells is dcfeat.database's).

The database is streamed in row chunks and a running top-k per query is
merged after each chunk, so memory stays at one chunk plus (nq, k) however
large the database: 3 M x 768 fp16 rows (4.6 GB) search on a 24 GiB host.
Any row-sliceable array works as the database, an h5py dataset included
(it is then read from disk chunk by chunk).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from dcfeat.devices import inner_products, is_cuda

Array = np.ndarray | torch.Tensor

# 32768 x 768 rows are 96 MiB as float32, and a 1024-query block of scores
# against them 128 MiB: large enough for the matmul to run at full speed,
# small enough to leave the host free for the database itself.
DEFAULT_DB_CHUNK = 32768
DEFAULT_QUERY_CHUNK = 1024
# Below this many queries faiss-cpu's knn was slower than torch here (measured crossover 128-256).
FAISS_MIN_QUERIES = 256


def _compute_dtype(source: Array, device: torch.device) -> torch.dtype:
    # CPU fp16/bf16 matmul is many times slower than fp32, so upcast there;
    # on CUDA the half types are what the tensor cores want.
    dtype = source.dtype if isinstance(source, torch.Tensor) else torch.from_numpy(np.empty(0, source.dtype)).dtype
    if is_cuda(device) and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return torch.float32


def _to_tensor(block: Array, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(block, torch.Tensor):
        block = np.ascontiguousarray(block)
        # A read-only memory map's slice is a view of the file: torch wants memory it may write.
        block = torch.from_numpy(block if block.flags.writeable else block.copy())
    return block.to(device=device, dtype=dtype)


def _check_shapes(queries: Array, database: Array, k: int) -> tuple[int, int]:
    (nq, d), (nd, d_db) = queries.shape, database.shape
    if d != d_db:
        raise ValueError(f"queries have {d} dimensions but the database has {d_db}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    return nq, nd


def _merge(
    best_s: torch.Tensor, best_i: torch.Tensor, new_s: torch.Tensor, new_i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    s, pos = torch.topk(torch.cat([best_s, new_s], dim=1), k, dim=1)
    return s, torch.gather(torch.cat([best_i, new_i], dim=1), 1, pos)


def topk_cosine(
    queries: Array,
    database: Array,
    k: int,
    *,
    device: str | torch.device = "cpu",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    db_chunk: int = DEFAULT_DB_CHUNK,
    normalize: bool = True,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database rows by cosine similarity for every query, best first.

    Returns scores float32 (nq, k') and indices int64 (nq, k') with
    k' = min(k, nd). With ``normalize=False`` the score is the plain inner
    product (for inputs that are already unit vectors). Tie order is unspecified.

    `backend`: "torch", "faiss" (faiss-cpu's brute-force `knn` per database chunk, CPU only), or
    "auto": faiss on the CPU where it is installed and there are at least FAISS_MIN_QUERIES
    queries, torch otherwise. Both are exact. Measured on a 2-core CPU at 1.25 M x 512 rows
    (BENCHMARKS.md): faiss takes 0.66x torch's time at 256 queries and more, but 4x at 64-128.
    """
    nq, nd = _check_shapes(queries, database, k)
    k = min(k, nd)
    device = torch.device(device)
    if _use_faiss(backend, device, nq):
        return _topk_faiss(queries, database, k, normalize=normalize)
    dtype = _compute_dtype(database, device)
    q_all = _to_tensor(queries[:], device, torch.float32)
    q_all = (F.normalize(q_all, dim=1) if normalize else q_all).to(dtype)
    best_s = torch.full((nq, k), -torch.inf, device=device)
    best_i = torch.full((nq, k), -1, dtype=torch.int64, device=device)

    with torch.inference_mode():
        # Database outside, queries inside: each database chunk is read and
        # converted once, whatever the number of query chunks.
        for start in range(0, nd, db_chunk):
            stop = min(start + db_chunk, nd)
            block = _to_tensor(database[start:stop], device, dtype)
            if normalize:
                block = F.normalize(block.float(), dim=1).to(dtype)
            kk = min(k, stop - start)
            for qs in range(0, nq, query_chunk):
                qe = min(qs + query_chunk, nq)
                s, i = torch.topk(inner_products(q_all[qs:qe], block), kk, dim=1)
                best_s[qs:qe], best_i[qs:qe] = _merge(best_s[qs:qe], best_i[qs:qe], s, i + start, k)
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def retrieval_backend(device: str | torch.device, queries: int, backend: str = "auto") -> str:
    """Which backend `topk_cosine` uses on `device` for that many queries: "faiss" or "torch"."""
    return "faiss" if _use_faiss(backend, torch.device(device), queries) else "torch"


@functools.cache
def _faiss_installed() -> bool:
    """Whether faiss-cpu imports (asked once: a failed import is retried from disk every time)."""
    try:
        import faiss  # noqa: F401  (optional: faiss-cpu)
    except ImportError:
        return False
    return True


def _use_faiss(backend: str, device: torch.device, queries: int) -> bool:
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend {backend!r}: choose auto, torch or faiss")
    if backend == "torch" or (backend == "auto" and (is_cuda(device) or queries < FAISS_MIN_QUERIES)):
        return False
    if not _faiss_installed():
        if backend == "faiss":
            raise ImportError("backend='faiss' needs faiss-cpu: pip install faiss-cpu")
        return False
    if is_cuda(device):
        raise ValueError("the faiss backend runs on the CPU; use backend='torch' on CUDA")
    return True


def _topk_faiss(queries: Array, database: Array, k: int, *, normalize: bool,
                db_chunk: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    """`topk_cosine` with faiss's exact `knn` (its BLAS product and heap) on each database chunk."""
    import faiss

    def unit(block) -> np.ndarray:
        t = _to_tensor(block, torch.device("cpu"), torch.float32)
        return np.ascontiguousarray((F.normalize(t, dim=1) if normalize else t).numpy())

    q = unit(queries[:])
    best_s = torch.full((len(q), k), -torch.inf)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64)
    for start in range(0, database.shape[0], db_chunk):
        block = unit(database[start:start + db_chunk])
        s, i = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = _merge(best_s, best_i, torch.from_numpy(s), torch.from_numpy(i) + start, k)
    return best_s.numpy(), best_i.numpy()
