"""Re-ranking post-processors for retrieval: α-QE, DBA, k-reciprocal re-ranking, label voting, and a pipeline.

All functions are pure: numpy in, numpy out. Vectors are float32 and expected L2-normalised (similarity is the
inner product, i.e. the cosine); neighbour search goes through :func:`arcfold.retrieval.search.search`, and every
``**search_kwargs`` (``index``, ``backend``, ``device``, ``nprobe``, ...) is passed on to it.

Definitions
-----------
α-query expansion (α-QE; Radenović, Tolias & Chum, TPAMI 2018)
    With ``s_i`` and ``g_{n_i}`` the similarity and vector of query ``q``'s i-th gallery neighbour::

        q' = l2( q + sum_{i=1..k} max(s_i, 0)^α * g_{n_i} )

    ``k = 0`` gives ``l2(q)``. With ``exclude_self`` (queries are gallery-aligned) a query's own gallery copy is not
    one of its neighbours. ``α = 0`` is plain average QE (``0^0 = 1``: every neighbour counts).

Database-side augmentation (DBA; Arandjelović & Zisserman 2012, in the weighted form of the Google Landmarks
winners)
    Every gallery vector is replaced by ``l2( sum_{i=0..k} w_i g_{n_i} )``, its neighbours within the gallery,
    itself at rank 0 with weight 1 and ``w_i = max(s_i, 0)^α``: α-QE of the gallery against itself with
    ``exclude_self``.

k-reciprocal re-ranking (Zhong, Zheng, Cao & Li, CVPR 2017)
    Over the union ``U`` of queries and gallery (with ``exclude_self`` the queries *are* the gallery, so ``U`` is
    the gallery; the ``queries`` argument then only sets Q and the query rows' graph uses the gallery vectors):

    1. Original distance: the squared Euclidean distance of unit vectors, ``2 - 2 s``, divided by a per-row scale.
       ``original_scale="row_max"`` (the default, as in the paper's code) divides row ``i`` by its largest
       distance to any item of ``U``, ``2 - 2 min_j s(i, j)``, so distances lie in [0, 1]; a float ``c`` divides
       every row by ``c`` instead (e.g. ``4.0``, the largest possible distance between unit vectors).
    2. ``N(i, k)``: the ``k + 1`` nearest items of ``i`` in ``U`` (``i`` itself, normally at rank 0, and its k
       nearest others). ``R(i, k) = {j in N(i, k) : i in N(j, k)}`` (the k-reciprocal neighbours). With an exact
       index (the default) one pass of :func:`arcfold.retrieval.self_knn.self_topk` gives both the
       ``search(U, U, k1 + 1)`` table and the row minima of step 1, computing only the upper triangle of ``U U^T``;
       with ``index="ivf"``/``"hnsw"``/``"ivfpq"`` they come from ``search(U, U, k1 + 1)`` and ``search(-U, U, 1)``.
    3. Expansion: ``R*(i) = R(i, k1)`` united with ``R(c, h)`` of every ``c in R(i, k1)`` for which
       ``|R(c, h) ∩ R(i, k1)| > 2/3 |R(c, h)|``, where ``h = round(k1 / 2)`` (numpy rounding, half to even); the
       overlaps are one sparse product of the two sets' 0/1 matrices.
    4. ``V[i, j] = exp(-d(i, j)) / sum_{j' in R*(i)} exp(-d(i, j'))`` for ``j in R*(i)``, else 0: a sparse
       (|U|, |U|) CSR matrix whose rows sum to 1.
    5. Local query expansion: ``V[i] <- mean of V[j] over the k2 nearest items j of i`` (skipped when k2 = 1).
    6. Jaccard distance, only between each query p and its first-stage candidates g::

           J(p, g) = 1 - m / (2 - m),    m = sum_j min(V[p, j], V[g, j])

    7. ``final(p, g) = (1 - λ) J(p, g) + λ d(p, g)``, where ``d(p, g) = (2 - 2 s) / scale_p`` uses the first-stage
       similarity ``s`` passed in ``sims``.

    The returned score is ``1 - final`` (higher is better; in [0, 1] with ``"row_max"``, 1 for a duplicate of the
    query) and each row's candidates are re-sorted by it; equal computed scores keep their first-stage order. V is
    stored in float32 (scores agree with a float64 computation to ~1e-6). Memory is linear in |U|: the (|U|, k1+1)
    k-NN table and V, whose rows hold at most (k1 + 1)(h + 2) entries before local QE (typically a few tens) and
    at most k2 times that after, never a dense |U|^2 matrix. Hand-written (on scipy.sparse) because no maintained
    library offers a sparse version; the tests check it against a dense implementation of the paper's algorithm.

Label voting
    :mod:`arcfold.retrieval.voting`.

Pipeline (:func:`rerank_pipeline`)
    ``steps`` is a list of dicts, each ``{"name": NAME, PARAM: VALUE, ...}`` with names and parameters (and their
    defaults) from ``POSTPROCESSORS``::

        [{"name": "dba", "k": 2, "alpha": 3.0}, {"name": "qe", "k": 2, "alpha": 3.0},
         {"name": "kr", "k1": 20, "k2": 6, "lambda": 0.3}]

    Embedding steps (``dba``, ``qe``) run in the order given and must all come before ``kr``, which may appear once.
    ``dba`` augments the gallery (with ``exclude_self`` the queries are the same set, so they become the augmented
    gallery too); ``qe`` expands the queries against the current gallery; then ``search(queries, gallery, k)``;
    then ``kr`` re-ranks those k candidates. Empty steps are a plain search.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from arcfold.errors import RerankError
from arcfold.retrieval.checks import check_int, check_real, numba_available
from arcfold.retrieval.search import as_matrix, search
from arcfold.retrieval.self_knn import self_topk

log = logging.getLogger(__name__)

__all__ = [
    "POSTPROCESSORS",
    "RERANK_FORMAT",
    "PostProcessor",
    "database_augmentation",
    "k_reciprocal",
    "query_expansion",
    "load_rerank_spec",
    "rerank_pipeline",
    "spec_path",
]

# Stored entries per chunk when computing the query-candidate Jaccard sums (two sparse (pairs, |U|) blocks), and the
# bound on the entries of R @ H.T per chunk of rows in the expansion step.
_KR_JACCARD_NNZ = 4_000_000


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _l2(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    bad = (norms[:, 0] == 0) | ~np.isfinite(norms[:, 0])
    if bad.any():
        raise ValueError(f"cannot L2-normalise {name}: zero or non-finite norm at rows {np.flatnonzero(bad)[:10]}")
    return (x / norms).astype(np.float32)


def _neighbour_matrix(weights: np.ndarray, idx: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """Sparse (R, n_cols) matrix with ``weights[r, j]`` at column ``idx[r, j]``; both (R, k)."""
    n_rows, k = idx.shape
    indptr = np.arange(0, n_rows * k + 1, k, dtype=np.int64)  # (R + 1,)
    return sp.csr_matrix((weights.ravel(), idx.ravel(), indptr), shape=(n_rows, n_cols))


# --------------------------------------------------------------------------------------------------------------------
# embedding post-processors
# --------------------------------------------------------------------------------------------------------------------


def query_expansion(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int = 2,
    alpha: float = 3.0,
    *,
    exclude_self: bool = False,
    **search_kwargs: Any,
) -> np.ndarray:
    """α-QE: ``l2(q + sum_i max(s_i, 0)^α g_{n_i})`` over each query's top-``k`` gallery neighbours; (Q, D) float32.

    ``queries`` (Q, D), ``gallery`` (N, D). ``k = 0`` returns ``l2(queries)``. With ``exclude_self`` query i is
    gallery item i and is not its own neighbour.

    >>> g = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> q = np.array([[0.6, 0.8]], dtype=np.float32)  # neighbours: g1 (s=0.8), g0 (s=0.6)
    >>> query_expansion(q, g, k=1, alpha=1.0).astype(float).round(4).tolist()  # l2([0.6, 0.8 + 0.8])
    [[0.3511, 0.9363]]
    """
    q = as_matrix(queries, "queries")  # (Q, D)
    g = as_matrix(gallery, "gallery")  # (N, D)
    k = check_int(k, "k", 0)
    alpha = check_real(alpha, "alpha", 0.0)
    if k == 0:
        return _l2(q, "queries")
    sims, idx = search(q, g, k, exclude_self=exclude_self, **search_kwargs)  # (Q, k) each
    weights = np.maximum(sims, 0.0) ** np.float32(alpha)  # (Q, k)
    expanded = q + _neighbour_matrix(weights, idx, len(g)) @ g  # (Q, D)
    return _l2(np.asarray(expanded, dtype=np.float32), "expanded queries")


def database_augmentation(gallery: np.ndarray, k: int = 2, alpha: float = 3.0, **search_kwargs: Any) -> np.ndarray:
    """DBA: every gallery vector becomes ``l2(g + sum_{i=1..k} max(s_i, 0)^α g_{n_i})``; (N, D) float32.

    Its neighbours are found within the gallery without itself; itself counts at rank 0 with weight 1.
    """
    return query_expansion(gallery, gallery, k, alpha, exclude_self=True, **search_kwargs)


# --------------------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking
# --------------------------------------------------------------------------------------------------------------------


def _reciprocal_sets(nn: np.ndarray) -> sp.csr_matrix:
    """``R(i, k)`` of every item as a 0/1 (|U|, |U|) int32 CSR with sorted indices; ``nn`` (|U|, k + 1).

    ``N[i, j] = 1`` for j in N(i, k); ``R = N * N.T`` element-wise: j in N(i, k) and i in N(j, k).
    """
    n_items, width = nn.shape
    indptr = np.arange(0, n_items * width + 1, width, dtype=np.int64)  # (|U| + 1,)
    near = sp.csr_matrix((np.ones(n_items * width, dtype=np.int32), nn.ravel(), indptr), shape=(n_items, n_items))
    near.sort_indices()
    sets = near.multiply(near.T.tocsr()).tocsr()
    sets.sort_indices()
    return sets


def _expansion_sets(nn: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of every pair (i, j) with j in R*(i) (module docstring, steps 2-3), sorted by (i, j).

    With R = R(., k1) and H = R(., h) as 0/1 sparse matrices, ``(R @ H.T)[i, c] = |R(i, k1) ∩ R(c, h)|``; read at the
    candidates c in R(i, k1), it says which qualify (Q), and R*(i) is the pattern of ``R + Q @ H``. kNN rows hold
    distinct ids, so these counts are set sizes.
    """
    n_items = len(nn)
    h = int(np.around(k1 / 2))
    recip = _reciprocal_sets(nn)  # (|U|, |U|): R(i, k1)
    half = _reciprocal_sets(np.ascontiguousarray(nn[:, : h + 1]))  # (|U|, |U|): R(c, h)
    half_t = half.T.tocsr()
    half_size = np.diff(half.indptr)  # (|U|,) |R(c, h)|
    row_chunk = max(1, _KR_JACCARD_NNZ // ((k1 + 1) * (h + 1)))  # R @ H.T holds <= (k1 + 1)(h + 1) per row
    out_rows, out_cols = [], []
    for start in range(0, n_items, row_chunk):
        r = recip[start : start + row_chunk]  # (c, |U|)
        overlap = r.multiply(r @ half_t).tocsr()  # (c, |U|): |R(c,h) ∩ R(i,k1)| at c in R(i,k1) (zeros left out)
        overlap.sort_indices()
        row_of = np.repeat(np.arange(overlap.shape[0]), np.diff(overlap.indptr))  # (nnz,)
        qualifies = 3 * overlap.data > 2 * half_size[overlap.indices]  # |R(c,h) ∩ R(i,k1)| > 2/3 |R(c,h)|
        chosen = sp.csr_matrix(
            (np.ones(int(qualifies.sum()), dtype=np.int32), (row_of[qualifies], overlap.indices[qualifies])),
            shape=overlap.shape,
        )
        expanded = (r + chosen @ half).tocsr()  # (c, |U|): pattern R*(i)
        expanded.sort_indices()
        out_rows.append(np.repeat(np.arange(start, start + expanded.shape[0]), np.diff(expanded.indptr)))
        out_cols.append(expanded.indices.astype(np.int64))
    return np.concatenate(out_rows), np.concatenate(out_cols)


def _check_original_scale(original_scale: str | float) -> str | float:
    if isinstance(original_scale, str):
        if original_scale != "row_max":
            raise ValueError(f"original_scale must be 'row_max' or a positive number, got {original_scale!r}")
        return original_scale
    scale = check_real(original_scale, "original_scale", 0.0)
    if scale == 0:
        raise ValueError("original_scale must be positive")
    return scale


def _row_scales(
    union: np.ndarray, original_scale: str | float, search_kwargs: dict[str, Any], row_min: np.ndarray | None = None
) -> np.ndarray:
    """Per-row divisor of ``2 - 2 s`` (module docstring, step 1); (|U|,) float64. ``row_min``: min_j s(i, j) or None."""
    if original_scale == "row_max":
        if row_min is None:
            neg_max, _ = search(-union, union, 1, **search_kwargs)  # (|U|, 1): max_j <-x_i, x_j> = -min_j s(i, j)
            row_min = -neg_max[:, 0]
        scales = 2.0 - 2.0 * row_min.astype(np.float64)  # (|U|,) = 2 - 2 min_j s(i, j)
        # All items identical (largest distance 0): any positive scale gives the same all-zero distances.
        return np.where(scales > 0, scales, 1.0)
    return np.full(len(union), original_scale)


def _jaccard_weights(
    union: np.ndarray, nn: np.ndarray, scales: np.ndarray, k1: int, k2: int, row_chunk: int = 65536
) -> sp.csr_matrix:
    """The sparse V of the module docstring after local query expansion (steps 2-5); (|U|, |U|) float32 CSR."""
    n_items = len(union)
    rows, cols = _expansion_sets(nn, k1)  # (nnz,) each
    dist = np.empty(len(rows), dtype=np.float64)  # (nnz,) d(i, j)
    for start in range(0, len(rows), row_chunk):
        r, c = rows[start : start + row_chunk], cols[start : start + row_chunk]
        s = np.einsum("nd,nd->n", union[r], union[c], dtype=np.float64)  # (n,) s(i, j)
        dist[start : start + row_chunk] = (2.0 - 2.0 * s) / scales[r]
    weights = np.exp(-dist)  # (nnz,)
    weights /= np.bincount(rows, weights=weights, minlength=n_items)[rows]  # every row sums to 1
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_items))])  # rows are sorted by (i, j)
    v = sp.csr_matrix((weights.astype(np.float32), cols, indptr), shape=(n_items, n_items))
    if k2 > 1:
        mean_rows = _neighbour_matrix(np.full((n_items, k2), 1.0 / k2, dtype=np.float32), nn[:, :k2], n_items)
        v = (mean_rows @ v).tocsr()  # (|U|, |U|), row i = mean of V over the k2 nearest items of i
    v.sort_indices()
    return v


def _min_overlap(v: sp.csr_matrix, query_rows: np.ndarray, cand_rows: np.ndarray) -> np.ndarray:
    """``m[p, j] = sum_col min(V[query_rows[p], col], V[cand_rows[p, j], col])``; (Q, K) float64.

    With numba: a compiled merge of each pair's two sorted rows (:func:`arcfold.retrieval.kernels.min_overlap`,
    the same float32 sums as the scipy path to the last bit), the pairs split over torch's thread count (the kernel
    releases the GIL). Without: scipy, in chunks of ``_KR_JACCARD_NNZ`` stored entries.
    """
    if numba_available():
        return _min_overlap_compiled(v, query_rows, cand_rows)
    n_queries, k = cand_rows.shape
    row_nnz = np.diff(v.indptr)  # (|U|,)
    avg_pair_nnz = max(1.0, float(row_nnz[query_rows].mean()) + float(row_nnz[cand_rows].mean()))
    chunk = max(1, int(_KR_JACCARD_NNZ // (k * avg_pair_nnz)))
    out = np.empty((n_queries, k), dtype=np.float64)
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        a = v[np.repeat(query_rows[start:stop], k)]  # (c * K, |U|) each query row once per candidate
        b = v[cand_rows[start:stop].ravel()]  # (c * K, |U|)
        # V >= 0, so the element-wise minimum is non-zero only where both rows are.
        out[start:stop] = np.asarray(a.minimum(b).sum(axis=1), dtype=np.float64).reshape(stop - start, k)
    return out


def _min_overlap_compiled(v: sp.csr_matrix, query_rows: np.ndarray, cand_rows: np.ndarray) -> np.ndarray:
    """:func:`_min_overlap` by the numba kernel; (Q, K) float64."""
    import arcfold.retrieval.kernels as kernels

    query_rows = np.ascontiguousarray(query_rows, dtype=np.int64)  # (Q,)
    cand_rows = np.ascontiguousarray(cand_rows, dtype=np.int64)  # (Q, K)
    out = np.empty(cand_rows.shape, dtype=np.float64)  # (Q, K)
    csr = v.indptr.astype(np.int64), v.indices.astype(np.int64), np.ascontiguousarray(v.data, dtype=np.float32)
    bounds = np.linspace(0, len(out), torch.get_num_threads() + 1).astype(np.int64)  # a slice of queries a thread
    with ThreadPoolExecutor(max_workers=len(bounds) - 1) as pool:
        for done in [
            pool.submit(kernels.min_overlap, *csr, query_rows[a:b], cand_rows[a:b], out[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]:
            done.result()
    return out


def k_reciprocal(
    queries: np.ndarray,
    gallery: np.ndarray,
    sims: np.ndarray,
    idx: np.ndarray,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_: float = 0.3,
    exclude_self: bool = False,
    original_scale: str | float = "row_max",
    **search_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse k-reciprocal re-ranking of first-stage candidates (module docstring); (Q, K) float32 and int64.

    ``queries`` (Q, D) and ``gallery`` (N, D), L2-normalised; ``sims``/``idx`` (Q, K): the first-stage similarities
    and gallery indices (e.g. from :func:`arcfold.retrieval.search.search`). Returns each row's candidates re-sorted by
    the final distance, with score ``1 - final`` (higher is better); ties keep the first-stage order. ``exclude_self``:
    query i is gallery item i (Q == N), the union is the gallery alone. Needs ``k1 + 1 <= |U|`` and
    ``1 <= k2 <= k1 + 1``.
    """
    q = as_matrix(queries, "queries")  # (Q, D)
    g = as_matrix(gallery, "gallery")  # (N, D)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"dimension mismatch: queries have D={q.shape[1]}, gallery has D={g.shape[1]}")
    sims = np.asarray(sims)
    idx = np.asarray(idx)
    n_queries, n = len(q), len(g)
    if sims.ndim != 2 or sims.shape != idx.shape or len(sims) != n_queries:
        raise ValueError(f"sims and idx must both be (Q={n_queries}, K), got {sims.shape} and {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer) or idx.size == 0 or idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"idx must hold gallery indices in [0, {n}) (no -1), got dtype {idx.dtype}")
    if not np.isfinite(sims).all():
        raise ValueError("sims contain NaN/inf")
    k1 = check_int(k1, "k1", 1)
    k2 = check_int(k2, "k2", 1)
    lambda_ = check_real(lambda_, "lambda_", 0.0, 1.0)
    if exclude_self:
        if n_queries != n:
            raise ValueError(f"exclude_self=True needs gallery-aligned queries, got {n_queries} for a gallery of {n}")
        union, query_rows, offset = g, np.arange(n), 0  # (|U| = N, D)
    else:
        union, query_rows, offset = np.concatenate([q, g]), np.arange(n_queries), n_queries  # (|U| = Q + N, D)
    n_items = len(union)
    if k1 + 1 > n_items:
        raise ValueError(f"k1={k1} needs k1 + 1 <= {n_items} items in the union of queries and gallery")
    if k2 > k1 + 1:
        raise ValueError(f"k2={k2} must be <= k1 + 1 = {k1 + 1}")

    original_scale = _check_original_scale(original_scale)
    if search_kwargs.get("index", "exact") == "exact":
        # One blocked pass over the symmetric union gives the k-NN table and each row's smallest similarity.
        graph = self_topk(
            union, k1 + 1, row_min=original_scale == "row_max", device=search_kwargs.get("device", "auto")
        )
        nn, row_min = graph.idx, graph.row_min  # (|U|, k1 + 1), self normally at rank 0; (|U|,) or None
    else:
        row_min = None
        _, nn = search(union, union, k1 + 1, **search_kwargs)  # (|U|, k1 + 1), self normally at rank 0
    scales = _row_scales(union, original_scale, search_kwargs, row_min)  # (|U|,)
    v = _jaccard_weights(union, nn, scales, k1, k2)  # (|U|, |U|) sparse
    overlap = _min_overlap(v, query_rows, idx.astype(np.int64) + offset)  # (Q, K)
    jaccard = 1.0 - overlap / (2.0 - overlap)  # (Q, K)
    original = (2.0 - 2.0 * sims.astype(np.float64)) / scales[query_rows][:, None]  # (Q, K)
    final = (1.0 - lambda_) * jaccard + lambda_ * original  # (Q, K)
    order = np.argsort(final, axis=1, kind="stable")  # ties keep the first-stage order
    new_sims = (1.0 - np.take_along_axis(final, order, axis=1)).astype(np.float32)
    return new_sims, np.take_along_axis(idx, order, axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# label voting
# --------------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostProcessor:
    """A pipeline step: ``fn`` called with ``params`` (step key -> default), renamed by ``kwargs`` where needed."""

    fn: Callable[..., Any]
    kind: str  # "embedding" (changes vectors, before search) or "rerank" (re-sorts search candidates)
    params: Mapping[str, Any]
    kwargs: Mapping[str, str] = field(default_factory=dict)  # step key -> keyword of fn, where they differ

    def call_kwargs(self, step: Mapping[str, Any]) -> dict[str, Any]:
        values = {**self.params, **{key: value for key, value in step.items() if key != "name"}}
        return {self.kwargs.get(key, key): value for key, value in values.items()}


POSTPROCESSORS: dict[str, PostProcessor] = {
    "dba": PostProcessor(database_augmentation, "embedding", {"k": 2, "alpha": 3.0}),
    "qe": PostProcessor(query_expansion, "embedding", {"k": 2, "alpha": 3.0}),
    "kr": PostProcessor(
        k_reciprocal,
        "rerank",
        {"k1": 20, "k2": 6, "lambda": 0.3, "original_scale": "row_max"},
        kwargs={"lambda": "lambda_"},
    ),
}


def _check_steps(steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, PostProcessor, dict[str, Any]]]:
    """Validate names, parameters and order before any work; return (name, post-processor, call kwargs) per step."""
    if isinstance(steps, (str, Mapping)):
        raise ValueError(f"steps must be a list of step dicts, got {type(steps).__name__}")
    out = []
    seen_rerank = False
    for position, step in enumerate(steps):
        if not isinstance(step, Mapping) or "name" not in step:
            raise ValueError(f"step {position} must be a dict with a 'name', got {step!r}")
        name = step["name"]
        if name not in POSTPROCESSORS:
            raise ValueError(
                f"unknown post-processor {name!r} in step {position}; accepted: {', '.join(POSTPROCESSORS)}"
            )
        post = POSTPROCESSORS[name]
        unknown = sorted(set(step) - set(post.params) - {"name"})
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for step {position} ({name!r}); accepted: {', '.join(post.params)}"
            )
        if seen_rerank:
            raise ValueError(
                f"step {position} ({name!r}) comes after 'kr': embedding steps (dba, qe) must come before kr, "
                "and kr may appear only once, last"
            )
        seen_rerank = post.kind == "rerank"
        out.append((name, post, post.call_kwargs(step)))
    return out


def rerank_pipeline(
    queries: np.ndarray,
    gallery: np.ndarray,
    steps: Sequence[Mapping[str, Any]],
    k: int,
    *,
    exclude_self: bool = False,
    **search_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``steps`` (module docstring), then search and optional ``kr``; (Q, k) float32 sims, (Q, k) int64 idx."""
    plan = _check_steps(steps)
    q = as_matrix(queries, "queries")  # (Q, D)
    g = as_matrix(gallery, "gallery")  # (N, D)
    if exclude_self and len(q) != len(g):
        raise ValueError(f"exclude_self=True needs gallery-aligned queries, got {len(q)} for a gallery of {len(g)}")
    rerank = None
    for name, post, kwargs in plan:
        if name == "dba":
            g = post.fn(g, **kwargs, **search_kwargs)
            if exclude_self:
                q = g  # the queries are the gallery items themselves
        elif name == "qe":
            q = post.fn(q, g, **kwargs, exclude_self=exclude_self, **search_kwargs)
        else:
            rerank = (post, kwargs)
    sims, idx = search(q, g, k, exclude_self=exclude_self, **search_kwargs)  # (Q, k) each
    if rerank is not None:
        post, kwargs = rerank
        sims, idx = post.fn(q, g, sims, idx, **kwargs, exclude_self=exclude_self, **search_kwargs)
    return sims, idx


# --------------------------------------------------------------------------------------------------------------------
# rerank specs (oof/<exp>/rerank-<task>.json): written by the rerank stage, run by inference

RERANK_FORMAT = "arcfold.rerank/1"


def spec_path(
    oof_dir: str | Path, task: str, *, experiment: str | None = None, blend: str | Path | None = None
) -> Path:
    """Where the rerank spec of an experiment (``oof/<exp>/rerank-<task>.json``) or a blend lives."""
    if blend is not None:
        blend = Path(blend)
        return blend.with_name(f"{blend.stem}.rerank-{task}.json")
    return Path(oof_dir) / str(experiment) / f"rerank-{task}.json"


def load_rerank_spec(path: str | Path) -> dict[str, Any]:
    """Read a rerank spec and check its format; ``spec["steps"]`` and ``spec["vote"]`` are what inference runs."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RerankError(f"{path}: not valid JSON (truncated?): {e}") from None
    if spec.get("format") != RERANK_FORMAT:
        raise RerankError(f"{path} is not a rerank spec of format {RERANK_FORMAT} (got {spec.get('format')!r})")
    return spec
