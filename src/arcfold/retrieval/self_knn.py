"""Exact k-NN of a set against itself, blocked and symmetric, with each row's smallest similarity.

:func:`self_topk` returns what ``search(x, x, k)`` returns with an exact index (``exclude_self`` as there), in
about half the similarity work, and optionally each row's smallest similarity ``min_j <x_i, x_j>`` from the same
pass (k-reciprocal re-ranking needs both; the leave-one-out metrics need the first).

Method (CPU, with numba importable)
    The similarities ``x @ x.T`` are computed by torch matmul on (block, block) tiles of the upper triangle only:
    tile (I, J) with J >= I serves the rows of I and, transposed, the rows of J, so the GEMM work is half of a
    square search. Selection keeps one heap of the k largest items per row, in faiss's layout
    (``HeapArray<CMin<float, int64>>``: two (n, k) arrays). Each side of a tile goes through a compiled
    compare-and-push (:mod:`arcfold.retrieval.kernels`, numba): groups of 64 entries are tested against their
    heaps' smallest kept values with one SIMD count, and only a group with a candidate is walked and pushed
    (faiss's ``heap_replace_top``); after a row's first tiles, a few groups per tile. Row minima: torch ``amin``
    over a tile's rows, the column kernel over its columns. The numpy selection this replaced (a comparison,
    ``flatnonzero`` and a gather per tile side, then faiss's ``addn``) took ~1.2-1.9 ms per side of a
    (1024, 1024) tile, the kernels ~0.2-0.6 ms, so k-reciprocal's pass at 100k queries x 100k went from 72 s to
    ~40 s (``BENCHMARKS.md``).
    Threads: with more than one torch thread, two workers take tiles in turn from the list of the upper triangle;
    each computes its tile's GEMM on one OpenMP thread (its own: OpenMP's count is per thread, and faiss, which
    shares torch's OpenMP runtime, sets it) and pushes both sides while the tile is in its cache, holding the lock
    of the row block whose heaps it fills. No core waits for another between tiles (the earlier design, a
    two-thread GEMM then the two sides pushed by two helpers, idled both cores at every hand-off and left
    torch's OpenMP threads spinning while the helpers pushed). With one torch thread, one loop does it all.

Ranking and ties
    The rule of :func:`arcfold.retrieval.search.search`: descending similarity, then ascending index, including which
    of several tied items make the top k. An item enters a row's heap when it is above the smallest kept one in the
    order (similarity, then smaller index), the order in which the heap also evicts (ids are stored reversed,
    ``n - 1 - i``, so a larger stored id is a smaller index); each heap thus keeps the top k of everything pushed
    into it under one total order, whatever order the two workers push the tiles in (tested: tiles pushed in
    reverse give the brute-force result). Similarities are float32 GEMM values like those of
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
    Without numba, or on CUDA (``device="auto"`` with a GPU, or ``"cuda"``): :func:`arcfold.retrieval.exact_knn.knn`
    (the square) and, for the row minima, a second k=1 pass over the negated vectors; same results, twice the work.

Memory
    The heaps, (n, k) float32 + int64, plus two (block, block) float32 buffers per worker (the tile, an edge
    GEMM); never n x n. Hand-written because no library offers a self-join top-k that uses the symmetry:
    ``faiss.knn`` computes the full square and has no row minimum.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from arcfold.retrieval.checks import check_int, numba_available
from arcfold.retrieval.exact_knn import knn
from arcfold.retrieval.search import DEVICES, as_matrix

__all__ = ["SelfTopK", "self_topk"]

# Tile side: a (1024, 1024) float32 tile (4 MiB) stays in the L3 cache between the GEMM and the selection passes.
_BLOCK = 1024


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
    "cpu" or "cuda" (module docstring: CUDA and a missing numba use the torch fallback). Requires ``1 <= k <= n``
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
    if on_gpu or not numba_available():
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
    import arcfold.retrieval.kernels as kernels

    n = len(x)
    xt = torch.from_numpy(x)  # (n, D), shares memory
    # (n, k) min-heaps of the k largest, column 0 the smallest; empty as faiss's: -FLT_MAX, id -1 (-inf never enters)
    vals = np.full((n, k), np.finfo(np.float32).min, dtype=np.float32)
    rev_ids = np.full((n, k), -1, dtype=np.int64)  # (n, k) heap ids, stored as n - 1 - index
    mins = np.full(n, np.inf, dtype=np.float32)  # (n,)
    side = min(block, n)
    starts = range(0, n, block)
    tiles = [(i0, j0) for i0 in starts for j0 in range(i0, n, block)]  # the upper triangle, J >= I
    locks = {i0: threading.Lock() for i0 in starts}  # one per row block: its heaps and row minima
    next_tile = itertools.count()  # shared by the workers (next() is atomic under the GIL)

    def work() -> None:
        """Take tiles until none is left: GEMM, then push into the heaps of I, then (off the diagonal) of J."""
        tile_buf = torch.empty(side * side, dtype=torch.float32)  # flat: every (r, c) view is contiguous
        edge_buf = torch.empty((side, side), dtype=torch.float32)  # a full-shape GEMM around an edge tile
        thresholds = np.empty(side, dtype=np.float32)  # push_columns' work buffer
        with torch.inference_mode():
            while (t := next(next_tile)) < len(tiles):
                i0, j0 = tiles[t]
                i1, j1 = min(i0 + block, n), min(j0 + block, n)
                tile = tile_buf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
                if i1 - i0 == side and j1 - j0 == side:
                    torch.matmul(xt[i0:i1], xt[j0:j1].T, out=tile)
                else:  # an edge tile: the side-long blocks ending at i1 and j1 (overlapping the previous), cut out
                    a0, b0 = i1 - side, j1 - side
                    torch.matmul(xt[a0:i1], xt[b0:j1].T, out=edge_buf)
                    tile.copy_(edge_buf[i0 - a0 :, j0 - b0 :])
                s = tile.numpy()  # (r, c)
                with locks[i0]:
                    if row_min:
                        np.minimum(mins[i0:i1], tile.amin(dim=1).numpy(), out=mins[i0:i1])
                    if j0 == i0 and exclude_self:
                        np.fill_diagonal(s, -np.inf)  # never selected: k <= n - 1 finite values remain per row
                    kernels.push_rows(s, vals, rev_ids, i0, n - 1 - j0)
                if j0 != i0:  # a diagonal tile holds both orders of each of its pairs already
                    with locks[j0]:
                        kernels.push_columns(s, vals, rev_ids, j0, n - 1 - i0, mins[j0:j1], thresholds, row_min)

    n_workers = min(2, torch.get_num_threads(), len(tiles))
    if n_workers == 1:
        work()
    else:  # each worker runs its GEMMs on one OpenMP thread (module docstring)
        with ThreadPoolExecutor(max_workers=n_workers, initializer=_one_openmp_thread) as pool:
            for done in [pool.submit(work) for _ in range(n_workers)]:
                done.result()
    # Each row sorted in place as faiss's heap reorder does: descending value, ties by descending stored id
    # (ascending index); then the ids turned back into indices, in place too (no (n, k) copy at 1M rows).
    kernels.sort_heaps(vals, rev_ids)
    np.subtract(n - 1, rev_ids, out=rev_ids)
    return vals, rev_ids, (mins if row_min else None)


def _one_openmp_thread() -> None:
    """Set the calling thread's OpenMP thread count to 1 (through faiss, which shares torch's OpenMP runtime).

    The count is per thread in OpenMP: a worker's GEMMs then run on one thread, and the caller's are untouched.
    """
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a requirement; without it the GEMMs oversubscribe the cores
        return
    faiss.omp_set_num_threads(1)
