"""Label voting over retrieved neighbours: the labels of a recognition or top-5 submission, with their confidences.

Over each query's first ``k`` neighbours, a label's score is the largest (``mode="max"``) or the summed
(``mode="sum"``) similarity of the neighbours carrying it. Labels are ranked by descending score, ties by the
rank of their first neighbour, and the first ``top`` are returned; rows with fewer distinct labels are padded
with label ``None`` and score NaN. With ``new_label`` and ``threshold`` (the Happywhale "new_individual" rule),
``new_label`` is inserted with score ``threshold`` at the first position whose score is below ``threshold``
(or is padding); labels after it move down one place and the last drops off. If ``new_label`` is itself a
gallery label its score is ``max(threshold, its vote)`` and it appears once. Scores are the confidences.
With ``fill=True`` (the top5 submission: always 5 labels), slots still empty after that are filled with the
labels of all the given neighbours (columns ``k`` and beyond included) not yet listed, in the order of the
same vote over all columns, with that vote's score (:func:`fill_labels`): the vote's own labels and the new
label keep their places (so a threshold chosen without filling still means the same), the filled ones come
after them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from arcfold.retrieval.checks import check_int, check_real

__all__ = ["VOTE_MODES", "fill_labels", "vote_labels"]

VOTE_MODES: tuple[str, ...] = ("max", "sum")


def _as_label_array(labels: Any) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise ValueError(f"gallery_labels must be 1-D, got shape {labels.shape}")
        return labels
    items = list(labels)
    out = np.empty(len(items), dtype=object)  # element-wise, so tuples stay single labels
    out[:] = items
    return out


def vote_labels(
    idx: np.ndarray,
    sims: np.ndarray,
    gallery_labels: Any,
    *,
    k: int | None = None,
    mode: str = "max",
    new_label: Any = None,
    threshold: float | None = None,
    top: int = 5,
    fill: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank labels by the similarity of the neighbours that carry them (module docstring); (Q, top) each.

    ``idx``/``sims`` (Q, K) neighbours best first; ``gallery_labels`` (N,) any hashable values. Returns labels
    (object, padded with None) and scores (float32, padded with NaN). ``fill=True`` fills the padding from the
    columns past ``k`` (module docstring):

    >>> idx = np.array([[0, 1, 2, 3]]); sims = np.array([[0.9, 0.8, 0.7, 0.6]])
    >>> labels, scores = vote_labels(idx, sims, ["a", "a", "b", "c"], k=2, new_label="new", threshold=0.5, top=4,
    ...                              fill=True)
    >>> labels.tolist(), scores.astype(float).round(2).tolist()
    ([['a', 'new', 'b', 'c']], [[0.9, 0.5, 0.7, 0.6]])

    >>> idx = np.array([[0, 1, 2]]); sims = np.array([[0.9, 0.8, 0.7]])
    >>> labels, scores = vote_labels(idx, sims, ["a", "b", "b"], mode="sum", top=3)
    >>> labels.tolist(), scores.astype(float).round(2).tolist()
    ([['b', 'a', None]], [[1.5, 0.9, nan]])
    >>> labels, scores = vote_labels(idx, sims, ["a", "b", "b"], new_label="new", threshold=0.85, top=3)
    >>> labels.tolist(), scores.astype(float).round(2).tolist()
    ([['a', 'new', 'b']], [[0.9, 0.85, 0.8]])

    Kept in one function: the vote, the new-label insertion and the padding share the same (Q, L) arrays; most of
    its length is the doctested docstring.
    """
    idx = np.asarray(idx)
    sims = np.asarray(sims)
    labels = _as_label_array(gallery_labels)  # (N,)
    if idx.ndim != 2 or idx.shape != sims.shape:
        raise ValueError(f"idx and sims must both be (Q, K), got {idx.shape} and {sims.shape}")
    n_queries, n_cols = idx.shape
    if n_cols == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"idx must be a non-empty integer array, got shape {idx.shape} dtype {idx.dtype}")
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= len(labels):
        raise ValueError(f"idx must hold gallery indices in [0, {len(labels)}) (one label per gallery item)")
    if not np.isfinite(sims).all():
        raise ValueError("sims contain NaN/inf")
    k = n_cols if k is None else check_int(k, "k", 1)
    if k > n_cols:
        raise ValueError(f"k={k} but idx has only {n_cols} columns")
    if mode not in VOTE_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(VOTE_MODES)}")
    if (new_label is None) != (threshold is None):
        raise ValueError("new_label and threshold go together: give both or neither")
    top = check_int(top, "top", 1)

    codes, uniques = pd.factorize(labels, use_na_sentinel=False)  # (N,), (C,)
    # One vote table per row, grouped by label: sort each row by label code (stably, so ranks stay ascending
    # within a label), then reduce every run of equal codes. Rows are short (k), so this is a per-row sort, not
    # a global one.
    order = np.argsort(codes[idx[:, :k]], axis=1, kind="stable")  # (Q, k) rank of each sorted vote
    vote_codes = np.take_along_axis(codes[idx[:, :k]], order, axis=1)  # (Q, k)
    vote_sims = np.take_along_axis(sims[:, :k].astype(np.float64), order, axis=1)  # (Q, k)
    run_start = np.ones((n_queries, k), dtype=bool)
    run_start[:, 1:] = vote_codes[:, 1:] != vote_codes[:, :-1]
    starts = np.flatnonzero(run_start)  # (G,) flat index of each (query, label) group's first vote
    reduce = np.maximum if mode == "max" else np.add
    group_score = reduce.reduceat(vote_sims.ravel(), starts)  # (G,)
    group_first = order.ravel()[starts]  # (G,) rank of the label's best-ranked neighbour
    group_code = vote_codes.ravel()[starts]  # (G,)
    group_query = starts // k  # (G,)

    new_score = None
    if new_label is not None:
        threshold = check_real(threshold, "threshold", -math.inf)
        new_score = np.full(n_queries, threshold)  # (Q,)
        matches = [code for code, label in enumerate(uniques) if label == new_label]
        if matches:  # new_label is also a gallery label: one entry, at the better of its vote and threshold
            own = group_code == matches[0]
            new_score[group_query[own]] = np.maximum(new_score[group_query[own]], group_score[own])
            group_score, group_first = group_score[~own], group_first[~own]
            group_code, group_query = group_code[~own], group_query[~own]

    # Scatter the groups back into (Q, k) tables (-inf score = no label there) and rank each row by
    # (-score, first rank).
    n_groups = np.bincount(group_query, minlength=n_queries)  # (Q,)
    slot = np.arange(len(group_query)) - (np.cumsum(n_groups) - n_groups)[group_query]  # (G,) position in its row
    score_table = np.full((n_queries, k), -np.inf)  # (Q, k)
    first_table = np.full((n_queries, k), k, dtype=np.int64)  # (Q, k)
    code_table = np.full((n_queries, k), -1, dtype=np.int64)  # (Q, k), -1 = padding
    score_table[group_query, slot], first_table[group_query, slot] = group_score, group_first
    code_table[group_query, slot] = group_code
    ranking = np.lexsort((first_table, -score_table), axis=1)[:, :top]  # (Q, min(k, top)); last key is primary
    out_codes = np.full((n_queries, top), -1, dtype=np.int64)  # (Q, top)
    out_scores = np.full((n_queries, top), np.nan, dtype=np.float64)  # (Q, top), NaN = padding
    out_codes[:, : ranking.shape[1]] = np.take_along_axis(code_table, ranking, axis=1)
    out_scores[:, : ranking.shape[1]] = np.take_along_axis(score_table, ranking, axis=1)
    out_scores[out_codes < 0] = np.nan

    out_labels = np.full((n_queries, top), None, dtype=object)  # (Q, top)
    valid = out_codes >= 0
    out_labels[valid] = np.asarray(uniques, dtype=object)[out_codes[valid]]
    if new_score is not None:
        # Rows are sorted by descending score, so the insertion point is the number of scores >= new_score.
        insert_at = (out_scores >= new_score[:, None]).sum(axis=1)  # (Q,); NaN padding compares False
        cols = np.arange(top)[None, :]  # (1, top)
        source = np.where(cols > insert_at[:, None], cols - 1, cols)  # (Q, top) column each entry comes from
        out_labels = np.take_along_axis(out_labels, source, axis=1)
        out_scores = np.take_along_axis(out_scores, source, axis=1)
        is_new = cols == insert_at[:, None]  # (Q, top); no True where insert_at == top
        out_labels[is_new] = new_label
        out_scores[is_new] = np.broadcast_to(new_score[:, None], (n_queries, top))[is_new]
    if fill and n_cols > k:
        return fill_labels(out_labels, out_scores, idx, sims, labels, mode=mode)
    return out_labels, out_scores.astype(np.float32)


def fill_labels(
    labels: np.ndarray,
    scores: np.ndarray,
    idx: np.ndarray,
    sims: np.ndarray,
    gallery_labels: Any,
    *,
    mode: str = "max",
) -> tuple[np.ndarray, np.ndarray]:
    """Fill the padding of voted rows with the labels of other neighbours, in the order of their own vote.

    ``labels``/``scores`` (Q, top) from :func:`vote_labels` (padding: label None, score NaN, at the end of a row);
    ``idx``/``sims`` (Q, K) neighbours of the same queries, best first. Each padded slot takes the next label of
    the vote (``mode``) over all K neighbours that the row does not list yet, with that vote's score; rows without
    padding, and the labels already listed, are unchanged. Returns new arrays ((Q, top) object and float32).

    >>> labels = np.array([["a", "new", None, None]], dtype=object)
    >>> scores = np.array([[0.9, 0.5, np.nan, np.nan]])
    >>> filled, filled_scores = fill_labels(labels, scores, np.array([[0, 1, 2]]), np.array([[0.9, 0.7, 0.6]]),
    ...                                     ["a", "b", "c"])
    >>> filled.tolist(), filled_scores.astype(float).round(2).tolist()
    ([['a', 'new', 'b', 'c']], [[0.9, 0.5, 0.7, 0.6]])
    """
    out_labels = np.array(labels, dtype=object)  # (Q, top), a copy
    out_scores = np.array(scores, dtype=np.float64)  # (Q, top)
    top = out_labels.shape[1]
    short = np.flatnonzero(np.isnan(out_scores[:, -1]))  # rows ending in padding
    if len(short):
        # A row lists `slot` < top labels, so the first `top` of the vote hold the top - slot others it needs
        # (when there are that many).
        deep_labels, deep_scores = vote_labels(np.asarray(idx)[short], np.asarray(sims)[short], gallery_labels,
                                               mode=mode, top=top)  # fmt: skip
        for row, candidates, candidate_scores in zip(short, deep_labels, deep_scores, strict=True):
            slot = int((~np.isnan(out_scores[row])).sum())
            listed = set(out_labels[row, :slot].tolist())
            for label, score in zip(candidates, candidate_scores, strict=True):
                if slot == top:
                    break
                if not np.isnan(score) and label not in listed:
                    out_labels[row, slot], out_scores[row, slot] = label, score
                    slot += 1
    return out_labels, out_scores.astype(np.float32)
