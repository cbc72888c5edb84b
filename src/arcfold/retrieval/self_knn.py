"""Exact k-NN of a set against itself, blocked and symmetric, with each row's smallest similarity.

:func:`self_topk` returns what ``search(x, x, k)`` returns with an exact index (``exclude_self`` as there), in
about half the similarity work, and optionally each row's smallest similarity ``min_j <x_i, x_j>`` from the same
pass (k-reciprocal re-ranking needs both; the leave-one-out metrics need the first).

Method (CPU, with faiss importable)
    The similarities ``x @ x.T`` are computed by torch matmul on (block, block) tiles of the upper triangle only:
    tile (I, J) with J >= I serves the rows of I and, transposed, the rows of J, so the GEMM work is half of a
    square search. Selection keeps one faiss heap of the k largest values per row (``faiss.float_minheap_array_t``,
    C++). For each side of a tile, numpy finds the similarities above each heap's smallest kept value (one
    comparison and one ``flatnonzero`` per tile; after a row's first tiles, a small fraction) and only those are
    pushed (``addn_query_subset_with_ids``); while most of a tile passes (a row's very first tile), its rows (or
    its transpose's) are pushed whole (``addn_with_ids``). Row minima: numpy ``min`` over each tile's two axes.
    Threads: torch parallelises the GEMM; with more than one torch thread, a tile's two sides (disjoint heaps) are
    pushed by two worker threads at once (numpy and faiss release the GIL), each running faiss at one OpenMP thread
    (handing every tile between two OpenMP pools was slower). faiss and torch share one OpenMP runtime whose thread
    count is set per calling thread, so that setting is made in the workers only: made in the calling thread, as
    before, it ran torch's GEMM on one thread too (k-reciprocal's pass at 100k: 101 s, then 2x less GEMM speed than
    the GEMM alone). On a 2-core machine that other jobs also load, the per-tile synchronisation can make 2 threads
    slower than 1 (OMP_NUM_THREADS=1 then).

Ranking and ties
    The rule of :func:`arcfold.retrieval.search.search`: descending similarity, then ascending index, including which
    of several tied items make the top k. Each row's heap receives items in ascending index order (tiles of earlier
    row blocks first, then its own row block's tiles from left to right), and a pushed value enters only when it
    beats the heap's smallest kept value strictly, so a later equal value never displaces an earlier one. faiss's
    heaps break ties between kept values towards the larger id; ids are stored reversed (``n - 1 - i``), so the
    value evicted among equals is the one of larger index. Similarities are float32 GEMM values like those of
    ``search``'s torch backend and :func:`arcfold.retrieval.exact_knn.knn`. A BLAS may take another kernel (another
    summation order, so another last bit) for a thin product: MKL here does for fewer than 4 rows or 12 columns, and
    then exact duplicates stop tying. So every GEMM has the same (block, block) shape: an edge tile (the last, partial
    block of rows or columns) is computed as the full block ending at the set's end (overlapping the previous one)
    and cut out. Each value then comes from the kernel that the chunked ``knn`` uses for its (chunk, n) blocks, and
    the results are the same bit for bit (tested on data with duplicates, for block sizes that do not divide n;
    a different BLAS could still differ in the last bit, moving only items within ~1e-7 of each other). Tests:
    identical to ``search`` on random data, and to a brute-force reference on integer vectors with many exact ties.

``exclude_self``
    Row i's own similarity is set to -inf before selection (after the row minimum is taken), as in
    :func:`arcfold.retrieval.exact_knn.knn`: duplicates of i are kept.

Fallback
    Without faiss, or on CUDA (``device="auto"`` with a GPU, or ``"cuda"``): :func:`arcfold.retrieval.exact_knn.knn`
    (the square) and, for the row minima, a second k=1 pass over the negated vectors; same results, twice the work.

Memory
    The heaps, (n, k) float32 + int64, plus five (block, block) buffers (float32 tile, edge GEMM, transpose, two
    bool masks); never n x n. Hand-written because no library offers a self-join top-k that uses the symmetry:
    ``faiss.knn`` computes the full square and has no row minimum.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from arcfold.retrieval.checks import check_int
from arcfold.retrieval.exact_knn import knn
from arcfold.retrieval.search import DEVICES, as_matrix, faiss_available

__all__ = ["SelfTopK", "self_topk"]

# Tile side: a (1024, 1024) float32 tile (4 MiB) stays in the L3 cache between the GEMM and the selection passes.
_BLOCK = 1024
# Push a tile's columns through a transposed copy when more than this fraction of its similarities passes the
# columns' thresholds (a row's first tiles); otherwise push only the passing similarities.
_DENSE_FRACTION = 0.25


class SelfTopK(NamedTuple):
    """Result of :func:`self_topk`: (n, k) float32 ``sims``, (n, k) int64 ``idx`` (best first) and ``row_min``."""

    sims: np.ndarray
    idx: np.ndarray
    row_min: np.ndarray | None  # (n,) float32 min_j <x_i, x_j> over every j (itself included); None unless asked


def self_topk(
    x: np.ndarray | torch.Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    row_min: bool = False,
    device: str = "auto",
    block_size: int = _BLOCK,
) -> SelfTopK:
    """Top-``k`` items of ``x`` (n, D) for every item of ``x`` by inner product, as ``search(x, x, k)`` (exact).

    ``row_min``: also return each row's smallest similarity (over all n items, itself included). ``device``: "auto",
    "cpu" or "cuda" (module docstring: CUDA and a missing faiss use the torch fallback). Requires ``1 <= k <= n``
    (``n - 1`` with ``exclude_self``).

    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)  # items 0 and 3 equal
    >>> res = self_topk(x, 2, row_min=True, device="cpu", block_size=3)
    >>> res.idx.tolist(), res.row_min.astype(float).round(2).tolist()  # the tie 0/3 goes to the lower index first
    ([[0, 3], [1, 2], [2, 1], [0, 3]], [0.0, 0.6, 0.0, 0.0])
    """
    xs = as_matrix(x, "x")  # (n, D) float32
    n = len(xs)
    k = check_int(k, "k", 1)
    available = n - 1 if exclude_self else n
    if k > available:
        raise ValueError(f"k={k} but only {available} items are available per row")
    block = check_int(block_size, "block_size", 1)
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_gpu or not faiss_available():
        dev = "cuda" if on_gpu else "cpu"
        sims, idx = knn(xs, xs, k, exclude_self=exclude_self, device=dev)  # (n, k) each
        mins = -knn(-xs, xs, 1, device=dev)[0][:, 0] if row_min else None  # (n,)
        return SelfTopK(sims, idx, mins)
    sims, idx, mins = _heap_topk(xs, k, exclude_self, block, row_min)
    if not (np.isfinite(sims).all() and (mins is None or np.isfinite(mins).all()) and (idx < n).all()):
        # Inputs are finite, so this is float32 overflow in the dot products (huge un-normalised vectors).
        raise ValueError("similarities are not finite (float32 overflow); normalise or rescale the embeddings")
    return SelfTopK(sims, idx, mins)


def _heap_topk(
    x: np.ndarray, k: int, exclude_self: bool, block: int, row_min: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The tiled pass of the module docstring on the CPU; (n, k) float32 sims, (n, k) int64 idx, (n,) row minima."""
    import faiss

    n = len(x)
    xt = torch.from_numpy(x)  # (n, D), shares memory
    vals = np.empty((n, k), dtype=np.float32)  # (n, k) heap values; column 0 is each heap's smallest kept value
    rev_ids = np.empty((n, k), dtype=np.int64)  # (n, k) heap ids, stored as n - 1 - index
    heaps = faiss.float_minheap_array_t()  # keeps the k largest values per row
    heaps.nh, heaps.k = n, k
    heaps.val, heaps.ids = faiss.swig_ptr(vals), faiss.swig_ptr(rev_ids)
    heaps.heapify()
    reversed_index = np.arange(n - 1, -1, -1, dtype=np.int64)  # (n,) id pushed for item j: n - 1 - j
    mins = np.full(n, np.inf, dtype=np.float32)  # (n,)
    side = min(block, n)
    tile_buf = torch.empty(side * side, dtype=torch.float32)  # flat buffers: every (r, c) view is contiguous
    tran_buf = torch.empty(side * side, dtype=torch.float32)
    edge_buf = torch.empty((side, side), dtype=torch.float32)  # a full-shape GEMM around an edge tile

    def gemm(i0: int, j0: int) -> torch.Tensor:
        """Tile (I, J) as a contiguous (r, c) view of ``tile_buf``, from a GEMM of the full (side, side) shape."""
        i1, j1 = min(i0 + block, n), min(j0 + block, n)
        tile = tile_buf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
        if i1 - i0 == side and j1 - j0 == side:
            return torch.matmul(xt[i0:i1], xt[j0:j1].T, out=tile)
        # An edge tile: the side-long blocks ending at i1 and j1 (they overlap the previous ones), then the cut-out.
        a0, b0 = i1 - side, j1 - side
        torch.matmul(xt[a0:i1], xt[b0:j1].T, out=edge_buf)
        return tile.copy_(edge_buf[i0 - a0 :, j0 - b0 :])

    mask_bufs = {False: np.empty(side * side, dtype=bool), True: np.empty(side * side, dtype=bool)}  # rows, columns

    def push(tile: torch.Tensor, i0: int, j0: int, columns: bool) -> None:
        """Push a tile into the heaps of its rows (I; ids j0..j0+c-1) or of its columns (J; ids i0..i0+r-1)."""
        with torch.inference_mode():  # a worker thread: the tile is an inference tensor (fill_diagonal_ below)
            _push(tile, i0, j0, columns)

    def _push(tile: torch.Tensor, i0: int, j0: int, columns: bool) -> None:
        r, c = tile.shape
        s = tile.numpy()
        heap0, id0, n_heaps, n_ids = (j0, i0, c, r) if columns else (i0, j0, r, c)
        if row_min:
            np.minimum(
                mins[heap0 : heap0 + n_heaps], s.min(axis=0 if columns else 1), out=mins[heap0 : heap0 + n_heaps]
            )
        if j0 == i0 and exclude_self:
            tile.fill_diagonal_(-torch.inf)  # never selected: k <= n - 1 finite values remain per row
        # Only the values above each heap's smallest kept one can enter it (after a row's first tiles, a few).
        thresholds = np.ascontiguousarray(vals[heap0 : heap0 + n_heaps, 0])  # (n_heaps,)
        mask = mask_bufs[columns][: r * c].reshape(r, c)  # one buffer per side: both may run at once
        np.greater(s, thresholds[None, :] if columns else thresholds[:, None], out=mask)
        flat = np.flatnonzero(mask)  # (m,) row-major: by tile row, then column
        if len(flat) > _DENSE_FRACTION * r * c:  # push whole rows of s (or of its transpose)
            if columns:
                s = tran_buf[: r * c].view(c, r).copy_(tile.T).numpy()
            ids = faiss.swig_ptr(reversed_index[id0 : id0 + n_ids])
            heaps.addn_with_ids(n_ids, faiss.swig_ptr(s), ids, 0, heap0, n_heaps)
        elif len(flat):
            _push_sparse(heaps, s.ravel()[flat], flat, c, columns, heap0, id0, reversed_index)

    # Threads: module docstring (faiss's one OpenMP thread is set in the workers only, never in this thread).
    faiss_threads = faiss.omp_get_max_threads()
    if torch.get_num_threads() > 1:  # pushes in two workers at one OpenMP thread each; this thread keeps torch's
        helper = ThreadPoolExecutor(max_workers=2, initializer=faiss.omp_set_num_threads, initargs=(1,))
    else:
        helper = None
        faiss.omp_set_num_threads(1)
    try:
        with torch.inference_mode():
            for i0 in range(0, n, block):
                for j0 in range(i0, n, block):
                    tile = gemm(i0, j0)  # (r, c)
                    sides = (False,) if j0 == i0 else (False, True)  # a diagonal tile holds both orders of each pair
                    if helper is None:
                        for columns in sides:
                            push(tile, i0, j0, columns)
                    else:
                        for pushing in [helper.submit(push, tile, i0, j0, columns) for columns in sides]:
                            pushing.result()
    finally:
        if helper is None:
            faiss.omp_set_num_threads(faiss_threads)
        else:
            helper.shutdown()
    heaps.reorder()  # each row sorted: descending value, ties by descending stored id = ascending index
    return vals, n - 1 - rev_ids, mins if row_min else None


def _push_sparse(
    heaps: Any,
    values: np.ndarray,
    flat: np.ndarray,
    c: int,
    columns: bool,
    heap0: int,
    id0: int,
    reversed_index: np.ndarray,
) -> None:
    """Push the (r, c) tile entries at row-major positions ``flat`` (m,) into the heaps of their rows (heap0 + row,
    id id0 + column) or, with ``columns``, of their columns (heap0 + column, id id0 + row).

    Each heap's entries go in ascending id, padded with -inf (never pushed: a heap only takes values above its
    smallest kept one) to the largest count of a heap.
    """
    import faiss

    rows, cols = np.divmod(flat, c)  # (m,) each, sorted by (row, column)
    heap, ids = (cols, rows) if columns else (rows, cols)
    if columns:  # by column, rows still ascending within a column (radix sort on 16 bits when it fits)
        order = np.argsort(cols.astype(np.int16) if c <= 2**15 else cols, kind="stable")
        heap, ids, values = heap[order], ids[order], values[order]
    counts = np.bincount(heap)  # (h_max,)
    present = np.flatnonzero(counts)  # (h,) heaps with entries
    slot = np.cumsum(counts > 0) - 1  # row of each present heap in the padded arrays
    pos = np.arange(len(heap)) - (np.cumsum(counts) - counts)[heap]  # (m,) position within its heap
    width = int(counts.max())
    padded_vals = np.full((len(present), width), -np.inf, dtype=np.float32)  # (h, width)
    padded_ids = np.zeros((len(present), width), dtype=np.int64)  # (h, width)
    padded_vals[slot[heap], pos] = values
    padded_ids[slot[heap], pos] = reversed_index[id0 + ids]
    subset = (present + heap0).astype(np.int64)  # (h,) heaps to push into
    heaps.addn_query_subset_with_ids(
        len(subset), faiss.swig_ptr(subset), width, faiss.swig_ptr(padded_vals), faiss.swig_ptr(padded_ids), width
    )
