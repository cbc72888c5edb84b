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

Memory
    Queries are processed in chunks, so only a ``(chunk_size, N)`` similarity block exists at any time, never the
    ``(N, N)`` matrix. The default chunk size keeps that block at about 256 MiB of float32. Besides it, memory is
    the (N, D) float32 embeddings (plus a normalised copy) and O(N) per-query results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

__all__ = ["DEFAULT_KS", "knn", "map_at_r", "recall_at_k", "retrieval_metrics"]

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 5, 8, 10)

# Budget for one float32 (chunk_size, N) similarity block; the default chunk size is derived from it.
_CHUNK_BYTES = 256 * 2**20
# How many offending row indices to name in an error message before abbreviating.
_MAX_ROWS_IN_MESSAGE = 10


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
# Exact k-NN with a deterministic tie rule
# --------------------------------------------------------------------------------------------------------------------


def _rows_message(bad: np.ndarray) -> str:
    rows = np.flatnonzero(bad)
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_MESSAGE])
    more = f", ... ({len(rows)} rows in all)" if len(rows) > _MAX_ROWS_IN_MESSAGE else ""
    return f"[{shown}{more}]"


def _as_float_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Validate a (n, D) real, finite, non-empty matrix; return it as a float32 tensor (on its own device), no grad."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(arr)
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, D), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    t = t.to(torch.float32)
    finite_rows = torch.isfinite(t).all(dim=1)  # (n,)
    if not bool(finite_rows.all()):
        raise ValueError(f"{name} contain NaN/inf at rows {_rows_message(~finite_rows.cpu().numpy())}")
    return t


def _default_chunk_size(n_gallery: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * n_gallery))


def _resolve_chunk_size(chunk_size: int | None, n_gallery: int) -> int:
    if chunk_size is None:
        return _default_chunk_size(n_gallery)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(dev)!r} requested but CUDA is not available")
    return dev


def _topk_chunk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    self_index: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by inner product for one chunk of queries, ranked by (-similarity, gallery index).

    ``queries`` (c, D), ``gallery`` (N, D), same device; ``self_index`` (c,) gallery index of each query to exclude,
    or None. Requires ``k <= N`` (``k <= N - 1`` with ``self_index``). ``out``: optional float32 buffer of at least
    (c, N) for the similarity block, reused across chunks so that each chunk does not fault in fresh pages.
    Returns (c, k) float32 similarities and (c, k) int64 gallery indices.
    """
    c, n = len(queries), len(gallery)
    sims = torch.matmul(queries, gallery.T, out=out[:c]) if out is not None else queries @ gallery.T  # (c, N)
    if self_index is not None:
        # -inf ranks the query itself below every finite similarity; since k <= N - 1 it is never retrieved.
        sims[torch.arange(c, device=sims.device), self_index] = -torch.inf
    # One extra candidate tells whether a tie straddles the k-th position (see below) without another pass over sims.
    k_fetch = min(k + 1, n)
    vals, idx = torch.topk(sims, k_fetch, dim=1, largest=True, sorted=True)  # (c, k_fetch) each
    if not bool(torch.isfinite(vals[:, :k]).all()):
        # Inputs are finite, so this is float32 overflow in the dot products (huge un-normalised vectors).
        raise ValueError("similarities are not finite (float32 overflow); normalise or rescale the embeddings")

    # A tie straddles the k-th position when the full row holds more values equal to the k-th value than the top k
    # do; topk may then have kept higher indices than the rule wants. topk's *values* are exact, so this happens iff
    # the (k+1)-th largest value equals the k-th (impossible when k_fetch == k: the whole row was retrieved, and the
    # excluded self is -inf, never equal to a finite k-th value).
    if k_fetch > k:
        straddle = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()  # (s,), rare
    else:
        straddle = torch.empty(0, dtype=torch.long, device=sims.device)
    vals, idx = vals[:, :k], idx[:, :k]  # (c, k)

    # Elsewhere the candidate set is right, but topk may order equal values arbitrarily. Sort the candidates by
    # index, then stably by -similarity: the result is ordered by (-sim, index).
    idx, order = torch.sort(idx, dim=1)  # (c, k)
    vals = vals.gather(1, order)
    order = torch.sort(-vals, dim=1, stable=True).indices  # (c, k)
    vals, idx = vals.gather(1, order), idx.gather(1, order)

    if len(straddle) > 0:
        # Recompute those rows with a full stable sort: ascending -sim keeps equal values in ascending index order.
        sub = sims[straddle]  # (s, N)
        order = torch.sort(-sub, dim=1, stable=True).indices[:, :k]  # (s, k)
        vals[straddle] = sub.gather(1, order)
        idx[straddle] = order
    return vals, idx


def knn(
    queries: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN with the documented tie rule (descending similarity, then ascending index).

    ``queries`` (Q, D), ``gallery`` (N, D); no normalisation is applied here. Returns ``(similarities, indices)``,
    (Q, k) float32 and (Q, k) int64, best first. ``exclude_self=True`` requires the queries to be gallery-aligned
    (query i *is* gallery item i, so Q == N) and removes index i from query i's results; duplicates of item i are
    kept. Requires ``1 <= k <= N`` (``N - 1`` with ``exclude_self``). Work is chunked over queries, so memory is
    O(chunk_size * N) (default chunk: ~256 MiB of float32), never N x N. ``device`` (default CPU) runs the matmul.

    >>> g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # items 0 and 2 are identical
    >>> sims, idx = knn(np.array([[1.0, 0.0]]), g, k=2)
    >>> idx.tolist(), sims.tolist()  # the tie between 0 and 2 goes to the lower index first
    ([[0, 2]], [[1.0, 1.0]])
    >>> knn(g, g, k=1, exclude_self=True)[1].ravel().tolist()  # 0 and 2 find each other; 1 ties 0 and 2 at 0.0
    [2, 0, 0]
    """
    q = _as_float_matrix(queries, "queries")
    g = _as_float_matrix(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"dimension mismatch: queries have D={q.shape[1]}, gallery has D={g.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n = g.shape[0]
    if exclude_self and q.shape[0] != n:
        raise ValueError(
            f"exclude_self=True needs gallery-aligned queries (query i is gallery item i), "
            f"got {q.shape[0]} queries for a gallery of {n}"
        )
    available = n - 1 if exclude_self else n
    if k > available:
        raise ValueError(f"k={k} but only {available} gallery items are available per query")

    dev = _resolve_device(device)
    chunk = _resolve_chunk_size(chunk_size, n)
    g = g.to(dev)
    buffer = torch.empty((min(chunk, q.shape[0]), n), dtype=torch.float32, device=dev)  # (chunk, N), reused
    sims_out = np.empty((q.shape[0], k), dtype=np.float32)  # (Q, k)
    idx_out = np.empty((q.shape[0], k), dtype=np.int64)  # (Q, k)
    with torch.inference_mode():
        for start in range(0, q.shape[0], chunk):
            stop = min(start + chunk, q.shape[0])
            self_index = torch.arange(start, stop, device=dev) if exclude_self else None
            vals, idx = _topk_chunk(q[start:stop].to(dev), g, int(k), self_index, out=buffer)
            sims_out[start:stop] = vals.cpu().numpy()
            idx_out[start:stop] = idx.cpu().numpy()
    return sims_out, idx_out


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

    Returns ``{"recall@K": ... for K in ks, "map@r": ..., "n_queries": int, "n_items": N}``.
    """
    x = _as_float_matrix(embeddings, "embeddings")  # (N, D)
    codes = _factorize_labels(labels)  # (N,)
    n = x.shape[0]
    if len(codes) != n:
        raise ValueError(f"length mismatch: {n} embeddings but {len(codes)} labels")
    ks = _check_ks(ks)

    if normalize:
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (N, 1)
        bad = (norms[:, 0] == 0) | ~torch.isfinite(norms[:, 0])
        if bool(bad.any()):
            rows = _rows_message(bad.cpu().numpy())
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

    dev = _resolve_device(device)
    chunk = _resolve_chunk_size(chunk_size, n)
    x = x.to(dev)
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
            _, nbr = _topk_chunk(x[qid_t], x, k, self_index=qid_t, out=buffer)  # (c, k)
            relevant = codes[nbr.cpu().numpy()] == codes[qid][:, None]  # (c, k) bool
            stop = start + len(qid)
            hits[start:stop] = _hits(relevant, ks)  # K > k means "all N - 1 items", which is what k holds then
            ap[start:stop] = average_precision_at_r(relevant, r)

    out: dict[str, float] = {f"recall@{k}": float(hits[:, j].mean()) for j, k in enumerate(ks)}
    out["map@r"] = float(ap.mean())
    out["n_queries"] = int(len(query_ids))
    out["n_items"] = int(n)
    return out
