"""Retrieval metrics for metric learning: leave-one-out Recall@K and MAP@R, exact and chunked.

Definitions
-----------
Leave-one-out evaluation (the SOP / CUB protocol)
    One set of ``N`` embeddings with labels. Every item is a query against all the *other* ``N - 1`` items: the
    query itself is excluded **by index**; other items that happen to be exact duplicates of it are *not* excluded.
    Similarity is the inner product. Embeddings are expected to be L2-normalised, so this is cosine similarity;
    :func:`retrieval_metrics` normalises them itself when ``normalize=True`` (the default).

Queries
    An item whose class has only one member has nothing to retrieve, so it is *not* a query. It stays in the
    gallery as a distractor that can appear among other queries' neighbours (pytorch-metric-learning's
    ``AccuracyCalculator`` treats such "lone" queries the same way). If no item is a query (every class is a
    singleton), :func:`retrieval_metrics` raises ``ValueError``. Labels may be any hashable values; they are only
    compared for equality.

Ranking and ties
    Neighbours are ranked by descending similarity; equal similarities are ranked by ascending gallery index. The
    rule is exact, including at the top-k boundary: ``torch.topk`` makes no promise about *which* of several tied
    values it returns, so the retrieved candidates are re-sorted stably by ``(-similarity, index)``, and a row where
    a tie straddles the k-th position (more values in the full row equal the k-th value than were retrieved;
    detected by fetching k + 1 candidates and comparing the k-th and (k+1)-th values) is recomputed with a full
    stable sort. "Equal" means equal float32 similarities as computed by the matmul: integer-valued (or otherwise
    exactly representable) embeddings give exact ties; exact duplicate vectors tie in practice.

Recall@K
    The metric-learning "Recall@K" (a hit rate, not the IR recall): the fraction of queries with at least one
    same-label item among their top ``K`` neighbours. If ``K > N - 1`` the query's whole gallery (all ``N - 1``
    other items) is used, i.e. Recall@K equals Recall@(N-1).

MAP@R
    Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (ECCV 2020). For a query whose class has
    ``R + 1`` members (``R`` relevant items besides itself)::

        AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i),    P(i) = (number of relevant items in the top i) / i

    where ``rel(i)`` is 1 if the i-th neighbour has the query's label. MAP@R is the mean of AP@R over queries.
    Retrieving ``k = max R`` neighbours per query makes this exact (as pytorch-metric-learning does with
    ``k="max_bin_count"``); :func:`retrieval_metrics` picks ``k`` per chunk of queries.

Two paths (``method``), same numbers
    *symmetric* (``"auto"``'s choice when every item is scored on the CPU): one
    :func:`arcfold.retrieval.self_knn.self_topk` pass over the set against itself, self excluded, with one ``k`` for
    all rows: GEMM on (1024, 1024) tiles of the upper triangle only (half the multiply-adds of the square) and a
    compiled (numba) compare-and-push of each tile into per-row heaps of the k largest. *chunked* (a
    ``query_subset``, a CUDA device, or heaps over 1 GiB: N x k x 12 bytes): chunks of queries against all N items,
    torch top-k as above.
    *symmetric* needs numba (a requirement); without it ``"auto"`` takes *chunked*.
    Both apply the tie rule above (self_topk keeps the lower index among equal values, see its docstring), so each
    query gets the same ranked neighbours; a similarity may differ in the last float32 bit between the two GEMM
    shapes, which can only swap items within ~1e-7 of each other (none in the tests and benchmarks, where the
    metrics agree to the last digit, on data with duplicate vectors too).

Memory
    Chunked: only a ``(chunk_size, N)`` similarity block exists at any time, never the ``(N, N)`` matrix; the
    default chunk size keeps that block at about 256 MiB of float32. Symmetric: the (N, k) heaps (12 bytes an
    entry: 168 MiB at 1M x k=14) and two 4 MiB tiles. Besides, the (N, D) float32 embeddings (plus a normalised
    copy) and O(N) per-query results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from arcfold.retrieval.checks import numba_available
from arcfold.retrieval.exact_knn import (
    as_float_matrix,
    knn,
    resolve_chunk_size,
    resolve_device,
    rows_message,
    topk_chunk,
)
from arcfold.retrieval.self_knn import self_topk

__all__ = ["DEFAULT_KS", "METHODS", "knn", "map_at_r", "recall_at_k", "retrieval_metrics"]

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 5, 8, 10)
# How retrieval_metrics finds the neighbours (module docstring, "Two paths").
METHODS: tuple[str, ...] = ("auto", "symmetric", "chunked")

# The symmetric path keeps (N, k) float32 + int64 heaps (12 bytes an entry); above this, "auto" takes the chunked one.
_HEAP_BYTES = 2**30
# The symmetric path's tile side (self_knn's default; tests use small odd ones).
_SYMMETRIC_BLOCK = 1024
# Queries scored at a time from the symmetric path's neighbour table (bounds the (rows, k) temporaries).
_SCORE_ROWS = 2**16


# --------------------------------------------------------------------------------------------------------------------
# Pure metric functions on ranked neighbour-label tables
# --------------------------------------------------------------------------------------------------------------------


def _check_ks(ks: Sequence[int]) -> list[int]:
    """Validate ``ks`` and return them de-duplicated, keeping the caller's order."""
    ks = list(ks)
    if len(ks) == 0:
        raise ValueError("ks must contain at least one K")
    out: list[int] = []
    for k in ks:
        # bool is an int subclass; True as "K=1" is almost certainly a bug at the call site.
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every K in ks must be a positive integer, got {ks!r}")
        if int(k) not in out:
            out.append(int(k))
    return out


def _check_table(neighbour_labels: np.ndarray, query_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    neighbour_labels = np.asarray(neighbour_labels)  # (Q, k)
    query_labels = np.asarray(query_labels)  # (Q,)
    if neighbour_labels.ndim != 2:
        raise ValueError(f"neighbour_labels must be 2-D (Q, k), got shape {neighbour_labels.shape}")
    if query_labels.ndim != 1:
        raise ValueError(f"query_labels must be 1-D (Q,), got shape {query_labels.shape}")
    if len(neighbour_labels) != len(query_labels):
        raise ValueError(
            f"length mismatch: neighbour_labels has {len(neighbour_labels)} rows, query_labels has {len(query_labels)}"
        )
    if len(query_labels) == 0:
        raise ValueError("no queries: neighbour_labels and query_labels are empty")
    return neighbour_labels, query_labels


def _hits(relevant: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Per-query hit flags: ``out[q, j]`` is True iff ``relevant[q, :ks[j]]`` has a True.

    ``relevant`` (Q, k) bool. A K larger than ``k`` uses all ``k`` columns (the caller decides whether that is
    allowed). Returns (Q, len(ks)) bool.
    """
    # The rank of the first relevant neighbour decides every K at once: hit@K <=> first_rank < K.
    any_rel = relevant.any(axis=1)  # (Q,)
    first_rank = np.where(any_rel, relevant.argmax(axis=1), np.iinfo(np.int64).max)  # (Q,)
    return first_rank[:, None] < np.asarray(ks, dtype=np.int64)[None, :]  # (Q, len(ks))


def average_precision_at_r(relevant: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Per-query AP@R in float64. ``relevant`` (Q, k) bool with ``k >= max(n_relevant)``; ``n_relevant`` (Q,) >= 1."""
    k = relevant.shape[1]
    ranks = np.arange(1, k + 1, dtype=np.int64)  # (k,) 1-based rank i
    # Only the first R positions of each row count for AP@R.
    rel = relevant & (ranks[None, :] <= n_relevant[:, None])  # (Q, k)
    hits_so_far = np.cumsum(rel, axis=1, dtype=np.int64)  # (Q, k) relevant items within the top i
    precision = hits_so_far / ranks[None, :]  # (Q, k) float64, P(i)
    return np.where(rel, precision, 0.0).sum(axis=1) / n_relevant  # (Q,)


def recall_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K (hit rate) from a table of ranked neighbour labels.

    ``neighbour_labels`` (Q, k_max): labels of each query's neighbours, best first. ``query_labels`` (Q,). Returns
    ``{K: fraction of queries with a same-label item among the first K neighbours}`` for each K in ``ks`` (every
    ``K <= k_max``; a larger K raises, because the table cannot answer it). Labels may be of any comparable type.

    >>> nbr = np.array([[0, 5, 5],   # query label 0: hit at rank 1
    ...                 [5, 1, 5],   # query label 1: hit at rank 2
    ...                 [5, 5, 2],   # query label 2: hit at rank 3
    ...                 [5, 5, 5]])  # query label 3: no hit
    >>> recall_at_k(nbr, np.array([0, 1, 2, 3]), ks=[1, 2, 3])
    {1: 0.25, 2: 0.5, 3: 0.75}
    """
    neighbour_labels, query_labels = _check_table(neighbour_labels, query_labels)
    ks = _check_ks(ks)
    if max(ks) > neighbour_labels.shape[1]:
        raise ValueError(f"K={max(ks)} requested but neighbour_labels has only {neighbour_labels.shape[1]} columns")
    hits = _hits(neighbour_labels == query_labels[:, None], ks)  # (Q, len(ks))
    return {k: float(hits[:, j].mean()) for j, k in enumerate(ks)}


def map_at_r(neighbour_labels: np.ndarray, query_labels: np.ndarray, n_relevant: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020) from a table of ranked neighbour labels.

    ``neighbour_labels`` (Q, k) with ``k >= max(n_relevant)``, best first; ``query_labels`` (Q,); ``n_relevant``
    (Q,) = R per query, the number of relevant items in the gallery (>= 1). Columns beyond a query's R are ignored.

    >>> nbr = np.array([[7, 0, 7],   # R=2: (1/2)(1/1 + 0)   = 1/2  (the hit at rank 3 is beyond R)
    ...                 [3, 0, 0],   # R=1: (1/1)(1/1)       = 1
    ...                 [0, 7, 9],   # R=2: (1/2)(0 + 1/2)   = 1/4
    ...                 [1, 1, 1]])  # R=3: no relevant item = 0
    >>> map_at_r(nbr, np.array([7, 3, 7, 4]), np.array([2, 1, 2, 3]))
    0.4375
    """
    neighbour_labels, query_labels = _check_table(neighbour_labels, query_labels)
    n_relevant = np.asarray(n_relevant)  # (Q,)
    if n_relevant.shape != query_labels.shape:
        raise ValueError(f"n_relevant must have shape {query_labels.shape}, got {n_relevant.shape}")
    if not np.issubdtype(n_relevant.dtype, np.integer) or (n_relevant < 1).any():
        raise ValueError("n_relevant must be integers >= 1 (queries without relevant items are not queries)")
    if n_relevant.max() > neighbour_labels.shape[1]:
        raise ValueError(
            f"MAP@R needs at least max(R)={n_relevant.max()} neighbours per query, "
            f"neighbour_labels has {neighbour_labels.shape[1]} columns"
        )
    ap = average_precision_at_r(neighbour_labels == query_labels[:, None], n_relevant.astype(np.int64))
    return float(ap.mean())


# --------------------------------------------------------------------------------------------------------------------
# Leave-one-out evaluation
# --------------------------------------------------------------------------------------------------------------------


def _factorize_labels(labels: np.ndarray | Sequence | torch.Tensor) -> np.ndarray:
    """Map arbitrary hashable labels to int64 codes 0..C-1 (equal labels <=> equal codes)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        values = labels
    else:
        # Build an object array element by element so that tuples stay single labels instead of becoming a 2-D array.
        items = list(labels)
        values = np.empty(len(items), dtype=object)
        values[:] = items
    # use_na_sentinel=False: a NaN/None label is a class of its own rather than the code -1.
    codes, _ = pd.factorize(values, use_na_sentinel=False)
    return np.asarray(codes, dtype=np.int64)


def retrieval_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | Sequence,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    normalize: bool = True,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    query_subset: Sequence[int] | np.ndarray | None = None,
    method: str = "auto",
) -> dict[str, float]:
    """Leave-one-out Recall@K and MAP@R over one labelled embedding set (definitions in the module docstring).

    ``embeddings`` (N, D); ``labels`` (N,) of any hashable values (ints, strings, ...). Singleton classes are not
    queries but remain in the gallery as distractors. ``normalize`` L2-normalises rows first (zero rows raise).
    A K larger than N - 1 uses all N - 1 other items. ``chunk_size`` queries are scored at a time (default: a
    ~256 MiB float32 (chunk_size, N) block); ``device`` (default CPU) runs the matmul; ``progress`` shows tqdm.

    ``query_subset``: indices of the items to score as queries (default: all). The gallery is still all N items and
    each query's Recall@K / AP@R is exactly what the full run gives it (a query's result depends only on its own
    row), so the metrics are the means over the subset's queries: a sample estimate of the full figures at a
    fraction of the cost (work is linear in the number of queries). Singletons in it are not queries, as always.

    ``method`` (module docstring, "Two paths"): "symmetric" (every item a query, CPU; ``chunk_size`` and ``progress``
    do not apply), "chunked", or "auto" (default): symmetric when it applies and its heaps fit, else chunked.

    Returns ``{"recall@K": ... for K in ks, "map@r": ..., "n_queries": int, "n_items": N}``.
    """
    x = as_float_matrix(embeddings, "embeddings")  # (N, D)
    codes = _factorize_labels(labels)  # (N,)
    n = x.shape[0]
    if len(codes) != n:
        raise ValueError(f"length mismatch: {n} embeddings but {len(codes)} labels")
    ks = _check_ks(ks)

    if normalize:
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (N, 1)
        bad = (norms[:, 0] == 0) | ~torch.isfinite(norms[:, 0])
        if bool(bad.any()):
            rows = rows_message(bad.cpu().numpy())
            raise ValueError(f"cannot L2-normalise embeddings with zero/overflowing norm at rows {rows}")
        x = x / norms

    class_size = np.bincount(codes)  # (C,)
    n_relevant = class_size[codes] - 1  # (N,) R: other items of the same class
    query_ids = np.flatnonzero(n_relevant >= 1)  # (Q,) singletons are distractors only
    if query_subset is not None:
        subset = np.asarray(query_subset)
        if subset.ndim != 1 or subset.dtype.kind not in "iu" or len(np.unique(subset)) != len(subset):
            raise ValueError("query_subset must be a 1-D array of distinct integer item indices")
        if len(subset) and (subset.min() < 0 or subset.max() >= n):
            raise ValueError(f"query_subset holds indices outside 0..{n - 1}")
        query_ids = np.intersect1d(query_ids, subset)  # sorted, like the full set
    if len(query_ids) == 0:
        raise ValueError(
            f"no queries: all {n if query_subset is None else 'selected'} items are in singleton classes, so no item "
            "has a relevant neighbour to retrieve"
        )

    dev = resolve_device(device)
    max_k = max(ks)
    # One k for every row on the symmetric path (the chunked one picks k per chunk; both give each query the same
    # ranked prefix, so the same hits and AP@R): enough for every K and every R, never more than exist.
    k_all = int(min(max(max_k, int(n_relevant[query_ids].max())), n - 1))
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "auto":
        heap_fits = n * k_all * 12 <= _HEAP_BYTES
        symmetric = query_subset is None and dev.type == "cpu" and heap_fits and numba_available()
        method = "symmetric" if symmetric else "chunked"
    if method == "symmetric":
        if query_subset is not None or dev.type != "cpu":
            raise ValueError("method='symmetric' scores every item on the CPU: no query_subset, no CUDA device")
        hits, ap = _symmetric_scores(x.cpu().numpy(), codes, n_relevant, query_ids, k_all, ks)
    else:
        hits, ap = _chunked_scores(x.to(dev), codes, n_relevant, query_ids, ks, chunk_size, progress)

    out: dict[str, float] = {f"recall@{k}": float(hits[:, j].mean()) for j, k in enumerate(ks)}
    out["map@r"] = float(ap.mean())
    out["n_queries"] = int(len(query_ids))
    out["n_items"] = int(n)
    return out


def _chunked_scores(
    x: torch.Tensor,
    codes: np.ndarray,
    n_relevant: np.ndarray,
    query_ids: np.ndarray,
    ks: list[int],
    chunk_size: int | None,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query hits (Q, len(ks)) and AP@R (Q,): chunks of queries against all of ``x`` (N, D), on its device."""
    n = len(x)
    dev = x.device
    chunk = resolve_chunk_size(chunk_size, n)
    buffer = torch.empty((min(chunk, len(query_ids)), n), dtype=torch.float32, device=dev)  # (chunk, N), reused
    max_k = max(ks)
    # Per-query results, filled chunk by chunk; the final means do not depend on the chunking.
    hits = np.zeros((len(query_ids), len(ks)), dtype=bool)  # (Q, len(ks))
    ap = np.zeros(len(query_ids), dtype=np.float64)  # (Q,)

    starts = range(0, len(query_ids), chunk)
    if progress:
        starts = tqdm(starts, total=len(starts), desc="retrieval metrics", unit="chunk")
    with torch.inference_mode():
        for start in starts:
            qid = query_ids[start : start + chunk]  # (c,) gallery index of each query
            r = n_relevant[qid]  # (c,)
            # Enough neighbours for every K and for MAP@R's R of every query in the chunk, but never more than exist.
            k = int(min(max(max_k, r.max()), n - 1))
            qid_t = torch.from_numpy(qid).to(dev)
            _, nbr = topk_chunk(x[qid_t], x, k, self_index=qid_t, out=buffer)  # (c, k)
            stop = start + len(qid)
            hits[start:stop], ap[start:stop] = _query_scores(nbr.cpu().numpy(), qid, codes, r, ks)
    return hits, ap


def _symmetric_scores(
    x: np.ndarray,
    codes: np.ndarray,
    n_relevant: np.ndarray,
    query_ids: np.ndarray,
    k: int,
    ks: list[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query hits (Q, len(ks)) and AP@R (Q,) from one :func:`self_topk` pass over ``x`` (N, D), self excluded."""
    nbr = self_topk(x, k, exclude_self=True, device="cpu", block_size=_SYMMETRIC_BLOCK).idx  # (N, k) each top k
    hits = np.empty((len(query_ids), len(ks)), dtype=bool)  # (Q, len(ks))
    ap = np.empty(len(query_ids), dtype=np.float64)  # (Q,)
    for start in range(0, len(query_ids), _SCORE_ROWS):  # bounded temporaries: (rows, k) per step
        qid = query_ids[start : start + _SCORE_ROWS]  # (c,)
        hits[start : start + len(qid)], ap[start : start + len(qid)] = _query_scores(
            nbr[qid], qid, codes, n_relevant[qid], ks
        )
    return hits, ap


def _query_scores(
    nbr: np.ndarray, qid: np.ndarray, codes: np.ndarray, r: np.ndarray, ks: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Hits (c, len(ks)) and AP@R (c,) of queries ``qid`` (c,) from their ranked neighbours ``nbr`` (c, k) and R ``r``.

    K > k means "all N - 1 items", which is what ``k`` holds then.
    """
    relevant = codes[nbr] == codes[qid][:, None]  # (c, k) bool
    return _hits(relevant, ks), average_precision_at_r(relevant, r)
