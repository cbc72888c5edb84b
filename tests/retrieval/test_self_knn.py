"""Tests for arcfold.retrieval.self_knn: the blocked symmetric self-join equals search(x, x, k), ties included."""

from __future__ import annotations

import doctest
import threading

import numpy as np
import pytest
import torch

import arcfold.retrieval.self_knn
from arcfold.retrieval.exact_knn import knn
from arcfold.retrieval.search import search
from arcfold.retrieval.self_knn import self_topk


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    return _unit(centres[rng.integers(0, 12, n)] + 0.7 * rng.normal(size=(n, d)))


def _reference(x: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64 over the full square: rank by (-similarity, index), exact for integer vectors."""
    s = x.astype(np.float64) @ x.astype(np.float64).T  # (n, n)
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    cols = np.broadcast_to(np.arange(len(x)), s.shape)
    order = np.lexsort((cols, -s), axis=1)[:, :k]  # (n, k): the last key is the primary one
    return np.take_along_axis(s, order, axis=1), order


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize(("n", "k", "block"), [(700, 5, 64), (333, 21, 50), (157, 156, 40), (90, 3, 1024)])
def test_self_topk_equals_search(n: int, k: int, block: int, exclude_self: bool) -> None:
    # Blocks that do not divide n, k from 3 up to n - 1, one tile (block > n), and clustered data.
    if exclude_self and k == n - 1:
        k = n - 2  # n - 1 would be every other item: fine too, but keep one k below the maximum
    x = _clustered(n, 24, seed=n)
    res = self_topk(x, k, exclude_self=exclude_self, row_min=True, device="cpu", block_size=block)
    sims, idx = search(x, x, k, exclude_self=exclude_self, backend="torch", device="cpu")
    np.testing.assert_array_equal(res.idx, idx)
    np.testing.assert_allclose(res.sims, sims, rtol=0, atol=1e-6)  # float32 GEMM of other tile shapes: last bit
    assert res.sims.dtype == np.float32 and res.idx.dtype == np.int64 and res.row_min.dtype == np.float32
    ref_s, ref_idx = _reference(x, k, exclude_self)
    np.testing.assert_allclose(res.sims, ref_s, atol=1e-5)
    # The row minimum over every item (itself included), as the negated k=1 search computes it.
    neg_max, _ = search(-x, x, 1, backend="torch", device="cpu")
    np.testing.assert_allclose(res.row_min, -neg_max[:, 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.row_min, (x.astype(np.float64) @ x.T.astype(np.float64)).min(axis=1), atol=1e-5)


@pytest.mark.parametrize(("n", "block"), [(784, 65), (603, 100), (500, 1024)])
def test_self_topk_is_bit_identical_to_knn_with_duplicates(n: int, block: int) -> None:
    # Continuous unit vectors, a third of them exact copies: duplicates tie only if every similarity comes from the
    # same GEMM kernel as knn's. 784 % 65 = 4 and 603 % 100 = 3: edge tiles thinner than MKL's 12-column (4-row)
    # threshold, below which it sums in another order (computed here as a full block, then cut out).
    rng = np.random.default_rng(n)
    base = _clustered(n - n // 3, 24, seed=n)
    x = np.ascontiguousarray(np.concatenate([base, base[rng.choice(len(base), n // 3)]])[rng.permutation(n)])
    res = self_topk(x, 20, exclude_self=True, device="cpu", block_size=block)
    sims, idx = knn(x, x, 20, exclude_self=True)
    np.testing.assert_array_equal(res.sims, sims)
    np.testing.assert_array_equal(res.idx, idx)


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("block", [7, 32, 128, 1000])
def test_self_topk_ties_follow_the_search_rule(block: int, exclude_self: bool) -> None:
    # Small integer vectors: products are exact in float32 whatever the summation order, so many similarities tie
    # exactly and the order (-similarity, index) decides which tied items make the top k, as in search.
    rng = np.random.default_rng(3)
    base = rng.integers(-2, 3, size=(40, 4)).astype(np.float32)
    x = np.concatenate([base, base[rng.integers(0, 40, 160)]])  # (200, 4), with duplicate rows
    x = x[rng.permutation(len(x))]
    x[(x == 0).all(axis=1)] = 1.0  # no zero vector (any similarity is still an integer)
    for k in (1, 4, 9, 30):
        res = self_topk(x, k, exclude_self=exclude_self, row_min=True, device="cpu", block_size=block)
        ref_s, ref_idx = _reference(x, k, exclude_self)
        np.testing.assert_array_equal(res.idx, ref_idx)
        np.testing.assert_array_equal(res.sims, ref_s.astype(np.float32))
        np.testing.assert_array_equal(res.idx, search(x, x, k, exclude_self=exclude_self, backend="torch")[1])
        np.testing.assert_array_equal(res.row_min, (x @ x.T).min(axis=1))


@pytest.mark.parametrize("block", [48, 128])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_self_topk_same_with_one_or_two_threads(block: int, exclude_self: bool) -> None:
    # With more than one torch thread, two workers take tiles in turn (GEMM and pushes), in no fixed order.
    x = _clustered(500, 16, seed=7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            results.append(self_topk(x, 9, exclude_self=exclude_self, row_min=True, device="cpu", block_size=block))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0].idx, search(x, x, 9, exclude_self=exclude_self, backend="torch")[1])


def test_self_topk_without_numba_is_the_same(monkeypatch) -> None:
    x = _clustered(120, 8, seed=1)
    expected = self_topk(x, 6, row_min=True, device="cpu", block_size=16)
    monkeypatch.setattr(arcfold.retrieval.self_knn, "numba_available", lambda: False)
    fallback = self_topk(x, 6, row_min=True, device="cpu", block_size=16)
    np.testing.assert_array_equal(expected.idx, fallback.idx)
    np.testing.assert_allclose(expected.sims, fallback.sims, rtol=0, atol=1e-6)
    np.testing.assert_allclose(expected.row_min, fallback.row_min, rtol=0, atol=1e-6)
    assert self_topk(x, 6, device="cpu").row_min is None


def test_self_topk_errors() -> None:
    x = _clustered(10, 4, seed=0)
    with pytest.raises(ValueError, match="k=11 but only 10 items"):
        self_topk(x, 11)
    with pytest.raises(ValueError, match="k=10 but only 9 items"):
        self_topk(x, 10, exclude_self=True)
    with pytest.raises(ValueError, match="k must be an integer"):
        self_topk(x, 0)
    with pytest.raises(ValueError, match="block_size must be"):
        self_topk(x, 2, block_size=0)
    with pytest.raises(ValueError, match="unknown device"):
        self_topk(x, 2, device="tpu")
    with pytest.raises(ValueError, match="NaN/inf"):
        self_topk(np.where(np.arange(40).reshape(10, 4) == 5, np.nan, x), 2)
    with pytest.raises(ValueError, match="float32 overflow"):
        self_topk(x * np.float32(1e20), 2, device="cpu")


def test_doctests() -> None:
    assert doctest.testmod(arcfold.retrieval.self_knn).failed == 0


def test_self_topk_leaves_the_callers_openmp_threads(monkeypatch) -> None:
    # faiss and torch share one OpenMP runtime whose thread count is per thread. self_topk's workers set theirs to
    # one (each runs its own GEMMs); the caller's must stay as it was, or every later torch op in it runs on one
    # thread (a regression of an earlier version, which set it in the calling thread). Each GEMM runs in a worker.
    faiss = pytest.importorskip("faiss")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    threads = []
    matmul = torch.matmul

    def recording(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", recording)
    try:
        openmp_before = faiss.omp_get_max_threads()
        x = _clustered(300, 16, seed=3)
        res = self_topk(x, 5, row_min=True, device="cpu", block_size=64)
        assert faiss.omp_get_max_threads() == openmp_before == 2
        assert torch.get_num_threads() == 2
        assert threads and not any(threads)  # two workers did the GEMMs
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(res.idx, search(x, x, 5, backend="torch", device="cpu")[1])


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize(("r", "c", "k"), [(96, 200, 5), (64, 128, 21), (33, 7, 3)])
def test_kernels_leave_the_heaps_faiss_leaves(r: int, c: int, k: int, columns: bool) -> None:
    # The compiled compare-and-push against faiss's own HeapArray::addn (the reference it replaced): the same values
    # pushed in ascending index order, many of them tied (small integers), leave the same heap arrays, bit for bit.
    faiss = pytest.importorskip("faiss")
    import arcfold.retrieval.kernels as kernels

    rng = np.random.default_rng(r * c + k)
    n_heaps, n_ids = (c, r) if columns else (r, c)
    heap0, n = 11, 11 + n_heaps + 5  # the heaps at an offset inside larger arrays
    ours_v = np.full((n, k), np.finfo(np.float32).min, dtype=np.float32)
    ours_i = np.full((n, k), -1, dtype=np.int64)
    ref_v, ref_i = ours_v.copy(), ours_i.copy()
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k, heaps.val, heaps.ids = n, k, faiss.swig_ptr(ref_v), faiss.swig_ptr(ref_i)
    heaps.heapify()
    np.testing.assert_array_equal(ref_v, ours_v)  # faiss's empty heap is the one the kernels start from
    np.testing.assert_array_equal(ref_i, ours_i)
    thresholds = np.empty(c, dtype=np.float32)
    for t in range(4):  # several tiles into the same heaps, later tiles holding later items (as self_topk's)
        first_id = 10_000 - t * n_ids  # stored ids are reversed indices: ascending indices, descending ids
        ids = np.arange(first_id, first_id - n_ids, -1, dtype=np.int64)  # (n_ids,) the ids the kernels compute
        tile = rng.integers(-4, 5, size=(r, c)).astype(np.float32)
        if columns:
            column_mins = np.full(c, np.inf, np.float32)
            kernels.push_columns(tile, ours_v, ours_i, heap0, first_id, column_mins, thresholds, True)
            by_heap = np.ascontiguousarray(tile.T)
        else:
            kernels.push_rows(tile, ours_v, ours_i, heap0, first_id)
            by_heap = tile
        heaps.addn_with_ids(n_ids, faiss.swig_ptr(by_heap), faiss.swig_ptr(ids), 0, heap0, n_heaps)
        np.testing.assert_array_equal(ours_v, ref_v)
        np.testing.assert_array_equal(ours_i, ref_i)
    assert (ours_v[heap0 : heap0 + n_heaps] >= -4).all()  # every heap filled
    kernels.sort_heaps(ours_v, ours_i)  # in place, as faiss's reorder
    heaps.reorder()
    np.testing.assert_array_equal(ours_v, ref_v)
    np.testing.assert_array_equal(ours_i, ref_i)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_heaps_keep_the_same_items_whatever_the_push_order(exclude_self: bool) -> None:
    # Two workers push tiles in any order: the heaps keep the top k under (value, then lower index), so pushing the
    # tiles in reverse must give the same result; integer vectors make many exact ties.
    import arcfold.retrieval.kernels as kernels

    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, size=(300, 4)).astype(np.float32)
    x[(x == 0).all(axis=1)] = 1.0
    n, k, block = len(x), 7, 64
    s = x @ x.T  # (n, n) exact: small integers
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    vals = np.full((n, k), np.finfo(np.float32).min, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    starts = list(range(0, n, block))
    for i0 in reversed(starts):  # row blocks, and within each the tiles, last first
        for j0 in reversed(starts):
            tile = np.ascontiguousarray(s[i0 : i0 + block, j0 : j0 + block])
            kernels.push_rows(tile, vals, ids, i0, n - 1 - j0)
    order = np.lexsort((-ids, -vals), axis=1)
    ref_s, ref_idx = _reference(x, k, exclude_self)
    np.testing.assert_array_equal(n - 1 - np.take_along_axis(ids, order, axis=1), ref_idx)
    np.testing.assert_array_equal(np.take_along_axis(vals, order, axis=1), ref_s.astype(np.float32))
