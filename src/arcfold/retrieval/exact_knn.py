"""Exact inner-product k-NN with a deterministic tie rule, chunked over queries (torch matmul + top-k).

:func:`knn` is the brute-force reference the rest of :mod:`arcfold.retrieval` builds on: :mod:`.metrics` (the
leave-one-out metrics), :mod:`.search` (its torch backend) and :mod:`.self_knn` (its fallback). It lives in its own
module so that :mod:`.metrics` can use :mod:`.self_knn`, which needs :func:`knn`, without an import cycle.

Ranking and ties
    Neighbours are ranked by descending similarity; equal similarities by ascending gallery index, exactly, including
    at the top-k boundary (:func:`topk_chunk` says how; :mod:`.metrics`' docstring states the rule).

Memory
    Queries are processed in chunks, so only a ``(chunk_size, N)`` similarity block exists at any time, never the
    ``(N, N)`` matrix. The default chunk size keeps that block at about 256 MiB of float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_float_matrix", "knn", "resolve_chunk_size", "resolve_device", "rows_message", "topk_chunk"]

# Budget for one float32 (chunk_size, N) similarity block; the default chunk size is derived from it.
_CHUNK_BYTES = 256 * 2**20
# How many offending row indices to name in an error message before abbreviating.
_MAX_ROWS_IN_MESSAGE = 10

# --------------------------------------------------------------------------------------------------------------------
# Exact k-NN with a deterministic tie rule
# --------------------------------------------------------------------------------------------------------------------


def rows_message(bad: np.ndarray) -> str:
    rows = np.flatnonzero(bad)
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_MESSAGE])
    more = f", ... ({len(rows)} rows in all)" if len(rows) > _MAX_ROWS_IN_MESSAGE else ""
    return f"[{shown}{more}]"


def as_float_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
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
        raise ValueError(f"{name} contain NaN/inf at rows {rows_message(~finite_rows.cpu().numpy())}")
    return t


def _default_chunk_size(n_gallery: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * n_gallery))


def resolve_chunk_size(chunk_size: int | None, n_gallery: int) -> int:
    if chunk_size is None:
        return _default_chunk_size(n_gallery)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


def resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(dev)!r} requested but CUDA is not available")
    return dev


def topk_chunk(
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


def check_knn_request(q_shape: tuple[int, ...], g_shape: tuple[int, ...], k: Any, exclude_self: bool) -> int:
    """``k`` as an int after checking a (Q, D) x (N, D) k-NN request (shared by :func:`knn` and ``search.search``)."""
    if q_shape[1] != g_shape[1]:
        raise ValueError(f"dimension mismatch: queries have D={q_shape[1]}, gallery has D={g_shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n = g_shape[0]
    if exclude_self and q_shape[0] != n:
        raise ValueError(
            f"exclude_self=True needs gallery-aligned queries (query i is gallery item i), "
            f"got {q_shape[0]} queries for a gallery of {n}"
        )
    available = n - 1 if exclude_self else n
    if k > available:
        raise ValueError(f"k={k} but only {available} gallery items are available per query")
    return int(k)


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
    q = as_float_matrix(queries, "queries")
    g = as_float_matrix(gallery, "gallery")
    k = check_knn_request(q.shape, g.shape, k, exclude_self)
    n = g.shape[0]

    dev = resolve_device(device)
    chunk = resolve_chunk_size(chunk_size, n)
    g = g.to(dev)
    buffer = torch.empty((min(chunk, q.shape[0]), n), dtype=torch.float32, device=dev)  # (chunk, N), reused
    sims_out = np.empty((q.shape[0], k), dtype=np.float32)  # (Q, k)
    idx_out = np.empty((q.shape[0], k), dtype=np.int64)  # (Q, k)
    with torch.inference_mode():
        for start in range(0, q.shape[0], chunk):
            stop = min(start + chunk, q.shape[0])
            self_index = torch.arange(start, stop, device=dev) if exclude_self else None
            vals, idx = topk_chunk(q[start:stop].to(dev), g, int(k), self_index, out=buffer)
            sims_out[start:stop] = vals.cpu().numpy()
            idx_out[start:stop] = idx.cpu().numpy()
    return sims_out, idx_out
