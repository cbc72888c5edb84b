"""Compiled (numba) kernels of the retrieval layer: the only module that imports numba.

* :func:`push_rows`, :func:`push_columns`: compare-and-push of a similarity tile into per-row top-k heaps, for
  :func:`arcfold.retrieval.self_knn.self_topk`; :func:`sort_heaps` sorts the heaps in place at the end.
* :func:`min_overlap`: ``sum_j min(V[p, j], V[g, j])`` of pairs of rows of a sparse matrix, for k-reciprocal
  re-ranking (:mod:`arcfold.retrieval.postprocess`).

Heaps
    The heaps are faiss's: ``faiss::HeapArray<CMin<float, int64_t>>`` in two (n, k) arrays, values and ids, each
    row a binary min-heap keyed by (value, id) whose root (column 0) is the smallest kept item; among equal values
    the smaller id is "smaller". :func:`replace_top` is faiss's ``heap_replace_top`` for that comparator, line for
    line. An item enters a heap when it is above the root in that same order (value, then id), so each heap keeps
    the k largest items of everything pushed into it under one total order, whatever the order of the pushes: the
    tiles of :func:`arcfold.retrieval.self_knn.self_topk` can be pushed by two threads in any order. faiss's
    ``HeapArray::addn`` lets an item in only when its value is strictly above the root's; pushing in ascending id
    order (as faiss's users do, and the tests), the two rules take the same items and leave the same arrays
    (tested against ``faiss.float_minheap_array_t``).

    Why compiled: the selection's per-element work is one comparison, and numpy needs a full pass for the
    comparison, another for ``flatnonzero`` and a gather before it can push (~1.2-1.9 ms per side of a (1024, 1024)
    tile), about as long as faiss's own scalar ``addn`` loop. Here each group of ``GROUP`` consecutive entries is
    first tested with one vectorised count of the entries at or above their thresholds (LLVM turns the loop into
    SIMD compares), and only a group with a candidate is walked entry by entry: ~0.1-0.4 ms per side. No library
    offers a compare-and-push into existing heaps (faiss's ``addn`` is the scalar loop; torch's ``topk`` would
    re-sort the kept items every tile).

Min-overlap
    For each pair, the two CSR rows (sorted column indices) are merged; the minima of the columns both hold are
    summed in float32 exactly as scipy's ``a.minimum(b).sum(axis=1)`` sums them (``numpy.add.reduceat``: the first
    value plus numpy's pairwise sum of the rest), so the result is the scipy computation's to the last bit (tested),
    without building the two (pairs, |U|) row copies and their minimum (~8 s of k-reciprocal's 14 s of set work at
    100k queries).

numba is imported only here, when a caller first needs a kernel (its import costs ~0.3 s); the compiled code is
cached on disk (``cache=True``), so a new process does not compile it again.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["GROUP", "min_overlap", "push_columns", "push_rows", "replace_top", "sort_heaps"]

# numpy's pairwise summation: blocks of at most this many values are summed with 8 accumulators.
_PAIRWISE_BLOCK = 128
# Entries per vectorised test (a (1024, 1024) tile side holds 16 groups): one SIMD count, then a walk only if > 0.
GROUP = 64


@njit(nogil=True, cache=True)
def replace_top(vals: np.ndarray, ids: np.ndarray, val: float, idx: int) -> None:  # pragma: no cover - compiled
    """Replace the root of the min-heap (``vals``, ``ids``), both (k,), by (``val``, ``idx``) and sift it down.

    faiss's ``heap_replace_top<CMin<float, int64_t>>``: 1-based positions i, children 2i and 2i + 1; a child moves
    up while the new item is not below it in the order (value, then id).
    """
    k = len(vals)
    i = 1
    while True:
        left = 2 * i
        if left > k:
            break
        right = left + 1
        lv, li = vals[left - 1], ids[left - 1]
        if right == k + 1 or lv < vals[right - 1] or (lv == vals[right - 1] and li < ids[right - 1]):
            child, cv, ci = left, lv, li
        else:
            child, cv, ci = right, vals[right - 1], ids[right - 1]
        if val < cv or (val == cv and idx < ci):
            break
        vals[i - 1] = cv
        ids[i - 1] = ci
        i = child
    vals[i - 1] = val
    ids[i - 1] = idx


@njit(nogil=True, cache=True, inline="always")
def _beats_root(vals: np.ndarray, ids: np.ndarray, val: float, idx: int) -> bool:  # pragma: no cover - compiled
    """Whether (``val``, ``idx``) is above the heap's root in the order (value, then id): it enters the heap."""
    return val > vals[0] or (val == vals[0] and idx > ids[0])


@njit(nogil=True, cache=True)
def push_rows(  # pragma: no cover - compiled
    tile: np.ndarray, vals: np.ndarray, ids: np.ndarray, heap0: int, first_id: int
) -> None:
    """Push every entry of ``tile`` (r, c) into the heap of its row: row i -> heap ``heap0 + i``, column j -> id
    ``first_id - j``; an entry enters when it is above the heap's root in the order (value, then id). (A row's
    minimum is a reduction LLVM vectorises only with reassociation: the caller takes it with torch.)"""
    r, c = tile.shape
    whole = c - c % GROUP
    for i in range(r):
        row = tile[i]
        heap_vals, heap_ids = vals[heap0 + i], ids[heap0 + i]
        threshold = heap_vals[0]
        for g0 in range(0, whole, GROUP):
            group = row[g0 : g0 + GROUP]
            candidates = 0
            for j in range(GROUP):  # vectorised: a SIMD compare and count (>=: a tie may enter on its id)
                candidates += group[j] >= threshold
            if candidates:
                for j in range(GROUP):
                    value = group[j]
                    if value >= threshold and _beats_root(heap_vals, heap_ids, value, first_id - g0 - j):
                        replace_top(heap_vals, heap_ids, value, first_id - g0 - j)
                        threshold = heap_vals[0]
        for j in range(whole, c):
            if _beats_root(heap_vals, heap_ids, row[j], first_id - j):
                replace_top(heap_vals, heap_ids, row[j], first_id - j)


@njit(nogil=True, cache=True)
def push_columns(  # pragma: no cover - compiled
    tile: np.ndarray,
    vals: np.ndarray,
    ids: np.ndarray,
    heap0: int,
    first_id: int,
    mins: np.ndarray,
    thresholds: np.ndarray,
    with_mins: bool,
) -> None:
    """Push every entry of ``tile`` (r, c) into the heap of its column: column j -> heap ``heap0 + j``, row i -> id
    ``first_id - i``; an entry enters when it is above the heap's root in the order (value, then id). Row by row:
    the vectorised passes read the tile in memory order.

    ``mins`` (c,): lowered to each column's smallest entry when ``with_mins``. ``thresholds``: a (>= c,) float32
    work buffer.
    """
    r, c = tile.shape
    whole = c - c % GROUP
    for j in range(c):
        thresholds[j] = vals[heap0 + j, 0]
    for i in range(r):
        row = tile[i]
        if with_mins:
            for j in range(c):  # element-wise (a select, not a reduction): vectorised
                mins[j] = row[j] if row[j] < mins[j] else mins[j]
        for g0 in range(0, whole, GROUP):
            group, group_thresholds = row[g0 : g0 + GROUP], thresholds[g0 : g0 + GROUP]
            candidates = 0
            for j in range(GROUP):  # vectorised: a SIMD compare and count (>=: a tie may enter on its id)
                candidates += group[j] >= group_thresholds[j]
            if candidates:
                for j in range(GROUP):
                    value, heap = group[j], heap0 + g0 + j
                    if value >= group_thresholds[j] and _beats_root(vals[heap], ids[heap], value, first_id - i):
                        replace_top(vals[heap], ids[heap], value, first_id - i)
                        group_thresholds[j] = vals[heap, 0]
        for j in range(whole, c):
            heap = heap0 + j
            if _beats_root(vals[heap], ids[heap], row[j], first_id - i):
                replace_top(vals[heap], ids[heap], row[j], first_id - i)


@njit(nogil=True, cache=True)
def sort_heaps(vals: np.ndarray, ids: np.ndarray) -> None:  # pragma: no cover - compiled
    """Sort every row of the heaps (``vals``, ``ids``), both (n, k), in place: descending value, then descending id
    (the order faiss's ``HeapArray::reorder`` leaves); an insertion sort per row (k is small), no extra memory."""
    n, k = vals.shape
    for row in range(n):
        v, d = vals[row], ids[row]
        for i in range(1, k):
            value, idx = v[i], d[i]
            j = i - 1
            while j >= 0 and (v[j] < value or (v[j] == value and d[j] < idx)):
                v[j + 1] = v[j]
                d[j + 1] = d[j]
                j -= 1
            v[j + 1] = value
            d[j + 1] = idx


@njit(nogil=True, cache=True)
def _block_sum(a: np.ndarray, lo: int, n: int) -> np.float32:  # pragma: no cover - compiled
    """numpy's pairwise sum of ``a[lo : lo + n]`` for ``n <= _PAIRWISE_BLOCK`` (its leaves), in float32."""
    if n < 8:
        res = np.float32(-0.0)
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(nogil=True, cache=True)
def _pairwise_sum(a: np.ndarray, lo: int, n: int) -> np.float32:  # pragma: no cover - compiled
    """numpy's ``pairwise_sum`` of the float32 values ``a[lo : lo + n]`` (``loops_utils.h``), in float32.

    numpy recurses: above ``_PAIRWISE_BLOCK`` values, the sum of the first ``n2`` plus the sum of the rest, with
    ``n2 = n // 2`` rounded down to a multiple of 8. The same tree is walked here with an explicit stack (numba's
    on-disk cache does not hold recursive functions safely): frames (lo, n, 0) evaluate, (., ., 1) add the two
    values on top of the value stack, left operand first.
    """
    if n <= _PAIRWISE_BLOCK:
        return _block_sum(a, lo, n)
    frames = np.empty((192, 3), dtype=np.int64)  # depth <= 3 frames per halving
    values = np.empty(96, dtype=np.float32)
    frames[0, 0], frames[0, 1], frames[0, 2] = lo, n, 0
    n_frames, n_values = 1, 0
    while n_frames:
        n_frames -= 1
        f_lo, f_n, combine = frames[n_frames, 0], frames[n_frames, 1], frames[n_frames, 2]
        if combine:
            values[n_values - 2] = values[n_values - 2] + values[n_values - 1]
            n_values -= 1
        elif f_n <= _PAIRWISE_BLOCK:
            values[n_values] = _block_sum(a, f_lo, f_n)
            n_values += 1
        else:
            half = f_n // 2
            half -= half % 8
            frames[n_frames, 0], frames[n_frames, 1], frames[n_frames, 2] = 0, 0, 1  # popped last: add
            frames[n_frames + 1, 0], frames[n_frames + 1, 1], frames[n_frames + 1, 2] = f_lo + half, f_n - half, 0
            frames[n_frames + 2, 0], frames[n_frames + 2, 1], frames[n_frames + 2, 2] = f_lo, half, 0  # first
            n_frames += 3
    return values[0]


@njit(nogil=True, cache=True)
def min_overlap(  # pragma: no cover - compiled
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    query_rows: np.ndarray,
    cand_rows: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out[p, j] = sum_col min(V[query_rows[p], col], V[cand_rows[p, j], col])`` over the columns both rows hold,
    for a CSR matrix V (``indptr``, sorted ``indices``, float32 ``data`` >= 0); ``query_rows`` (Q,), ``cand_rows``
    and ``out`` (Q, K). Summed as ``a.minimum(b).sum(axis=1)`` sums in float32 (module docstring), then stored in
    ``out``'s dtype."""
    width = 0
    for row in range(len(indptr) - 1):
        width = max(width, indptr[row + 1] - indptr[row])
    minima = np.empty(width, dtype=np.float32)
    for p in range(cand_rows.shape[0]):
        a0, a1 = indptr[query_rows[p]], indptr[query_rows[p] + 1]
        for k in range(cand_rows.shape[1]):
            i, i_end = a0, a1
            j, j_end = indptr[cand_rows[p, k]], indptr[cand_rows[p, k] + 1]
            m = 0
            while i < i_end and j < j_end:
                ci, cj = indices[i], indices[j]
                if ci == cj:
                    value = min(data[i], data[j])
                    if value != 0:  # scipy keeps no explicit zero
                        minima[m] = value
                        m += 1
                    i += 1
                    j += 1
                elif ci < cj:
                    i += 1
                else:
                    j += 1
            if m == 0:
                out[p, k] = 0.0
            elif m == 1:
                out[p, k] = minima[0]
            else:  # reduceat: the first value, then the pairwise sum of the rest added to it
                out[p, k] = minima[0] + _pairwise_sum(minima, 1, m - 1)
