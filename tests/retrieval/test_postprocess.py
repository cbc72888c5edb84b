"""Tests for arcfold.postprocess: closed-form QE/DBA, k-reciprocal against a dense reference, voting, pipeline."""

from __future__ import annotations

import doctest
import functools

import numpy as np
import pytest
import scipy.sparse as sp

import arcfold.retrieval.postprocess
import arcfold.retrieval.voting
from arcfold.retrieval.postprocess import (
    POSTPROCESSORS,
    database_augmentation,
    k_reciprocal,
    query_expansion,
    rerank_pipeline,
)
from arcfold.retrieval.search import search
from arcfold.retrieval.self_knn import self_topk
from arcfold.retrieval.voting import vote_labels


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _on_circle(degrees: list[float]) -> np.ndarray:
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)  # (n, 2) unit vectors


# --------------------------------------------------------------------------------------------------------------------
# α-QE and DBA: 2-D cases computed by hand

GALLERY_2D = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
QUERY_2D = np.array([[0.6, 0.8]], dtype=np.float32)  # similarities 0.6, 0.8, -0.6


def test_query_expansion_closed_form() -> None:
    # alpha=3, k=2: q + 0.8^3 g1 + 0.6^3 g0 = (0.6 + 0.216, 0.8 + 0.512) = (0.816, 1.312).
    expected = np.array([[0.816, 1.312]]) / np.hypot(0.816, 1.312)
    np.testing.assert_allclose(query_expansion(QUERY_2D, GALLERY_2D, k=2, alpha=3.0), expected, atol=1e-6)
    # The third neighbour has similarity -0.6, so weight max(-0.6, 0)^3 = 0: k=3 changes nothing.
    np.testing.assert_allclose(query_expansion(QUERY_2D, GALLERY_2D, k=3, alpha=3.0), expected, atol=1e-6)
    # alpha=1, k=1: q + 0.8 g1 = (0.6, 1.6).
    expected = np.array([[0.6, 1.6]]) / np.hypot(0.6, 1.6)
    np.testing.assert_allclose(query_expansion(QUERY_2D, GALLERY_2D, k=1, alpha=1.0), expected, atol=1e-6)
    # alpha=0 is average QE over the top 2: q + g1 + g0 = (1.6, 1.8).
    expected = np.array([[1.6, 1.8]]) / np.hypot(1.6, 1.8)
    np.testing.assert_allclose(query_expansion(QUERY_2D, GALLERY_2D, k=2, alpha=0.0), expected, atol=1e-6)


def test_query_expansion_k0_is_identity_and_output_is_unit() -> None:
    np.testing.assert_allclose(query_expansion(QUERY_2D, GALLERY_2D, k=0), QUERY_2D, atol=1e-7)
    np.testing.assert_allclose(query_expansion(2 * QUERY_2D, GALLERY_2D, k=0), QUERY_2D, atol=1e-7)
    rng = np.random.default_rng(0)
    out = query_expansion(_unit(rng.normal(size=(20, 8))), _unit(rng.normal(size=(50, 8))), k=5, alpha=1.0)
    assert out.shape == (20, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_query_expansion_exclude_self() -> None:
    # a=(1,0), b=(0.8,0.6), c=(0,1): a's neighbours other than itself are b (0.8) then c (0).
    g = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    out = query_expansion(g, g, k=1, alpha=1.0, exclude_self=True)
    np.testing.assert_allclose(out[0], np.array([1.64, 0.48]) / np.hypot(1.64, 0.48), atol=1e-6)
    # Without exclude_self a's first neighbour is a itself: a + 1 * a, i.e. a unchanged.
    np.testing.assert_allclose(query_expansion(g, g, k=1, alpha=1.0)[0], [1.0, 0.0], atol=1e-6)


def test_database_augmentation_closed_form() -> None:
    # a=(1,0), b=(0.8,0.6), c=(0,1); a.b = 0.8, a.c = 0, b.c = 0.6. Each item keeps itself with weight 1.
    g = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    expected = np.array(
        [
            [1.0 + 0.8 * 0.8, 0.0 + 0.8 * 0.6],  # a + 0.8 b = (1.64, 0.48)
            [0.8 + 0.8 * 1.0, 0.6 + 0.8 * 0.0],  # b + 0.8 a = (1.6, 0.6)
            [0.0 + 0.6 * 0.8, 1.0 + 0.6 * 0.6],  # c + 0.6 b = (0.48, 1.36)
        ]
    )
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(database_augmentation(g, k=1, alpha=1.0), expected, atol=1e-6)
    # k=2, alpha=3 for a: a + 0.8^3 b + 0^3 c = (1.4096, 0.3072).
    np.testing.assert_allclose(
        database_augmentation(g, k=2, alpha=3.0)[0], np.array([1.4096, 0.3072]) / np.hypot(1.4096, 0.3072), atol=1e-6
    )
    np.testing.assert_allclose(database_augmentation(g, k=0), g, atol=1e-7)


def test_expansion_errors() -> None:
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        query_expansion(QUERY_2D, GALLERY_2D, k=-1)
    with pytest.raises(ValueError, match="alpha must be in"):
        query_expansion(QUERY_2D, GALLERY_2D, alpha=-1.0)
    with pytest.raises(ValueError, match="k=4 but only 3 gallery items"):
        query_expansion(QUERY_2D, GALLERY_2D, k=4)
    with pytest.raises(ValueError, match="k=3 but only 2 gallery items"):
        database_augmentation(GALLERY_2D, k=3)


# --------------------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking


def dense_k_reciprocal(
    queries: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_: float, exclude_self: bool = False, scale=None
) -> np.ndarray:
    """The paper's algorithm on dense (|U|, |U|) matrices in float64; returns final distances (Q, N).

    Written loop by loop from Zhong et al. (CVPR 2017), section 3 and their released code's conventions: original
    distance = squared Euclidean, each row divided by its maximum (or by ``scale``); k-reciprocal sets from the
    (k1 + 1)-NN lists including the item itself; expansion with the round(k1/2)-reciprocal sets of candidates that
    overlap by more than 2/3; Gaussian weights normalised per row; local QE over the k2-NN; Jaccard from the
    minimum of weights.
    """
    union = (gallery if exclude_self else np.concatenate([queries, gallery])).astype(np.float64)
    n_queries, n_items = len(queries), len(union)
    dist = 2.0 - 2.0 * union @ union.T  # squared Euclidean of unit vectors
    dist = dist / (dist.max(axis=1, keepdims=True) if scale is None else scale)
    rank = np.argsort(dist, axis=1, kind="stable")  # ties by index, the search module's rule

    def reciprocal(i: int, k: int) -> list[int]:
        return [j for j in rank[i, : k + 1] if i in rank[j, : k + 1]]

    half = int(np.around(k1 / 2))
    v = np.zeros((n_items, n_items))
    for i in range(n_items):
        r = reciprocal(i, k1)
        expanded = set(r)
        for candidate in r:
            r_candidate = reciprocal(candidate, half)
            if len(set(r_candidate) & set(r)) > 2 / 3 * len(r_candidate):
                expanded |= set(r_candidate)
        cols = sorted(expanded)
        weights = np.exp(-dist[i, cols])
        v[i, cols] = weights / weights.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n_items)])
    jaccard = np.empty((n_queries, n_items))
    for i in range(n_queries):
        overlap = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    final = (1 - lambda_) * jaccard + lambda_ * dist[:n_queries]
    return final if exclude_self else final[:, n_queries:]


@pytest.fixture(scope="module")
def small_clustered() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16))
    gallery = _unit(centres[rng.integers(0, 8, 120)] + 0.8 * rng.normal(size=(120, 16)))
    queries = _unit(centres[rng.integers(0, 8, 30)] + 0.8 * rng.normal(size=(30, 16)))
    return queries, gallery


@pytest.mark.parametrize("block", [None, 37])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize(
    ("k1", "k2", "lambda_", "scale"), [(20, 6, 0.3, None), (7, 1, 0.3, None), (5, 3, 0.0, None), (9, 4, 0.5, 4.0)]
)
def test_k_reciprocal_matches_dense_reference(
    small_clustered, monkeypatch, block, exclude_self, k1, k2, lambda_, scale
) -> None:
    if block is not None:  # the union's k-NN graph from several (block, block) tiles (its own tests: test_self_knn)
        monkeypatch.setattr(arcfold.retrieval.postprocess, "self_topk", functools.partial(self_topk, block_size=block))
    queries, gallery = small_clustered
    if exclude_self:
        queries = gallery
    sims, idx = search(queries, gallery, 25, exclude_self=exclude_self)
    new_sims, new_idx = k_reciprocal(
        queries,
        gallery,
        sims,
        idx,
        k1=k1,
        k2=k2,
        lambda_=lambda_,
        exclude_self=exclude_self,
        original_scale="row_max" if scale is None else scale,
    )
    final = dense_k_reciprocal(queries, gallery, k1, k2, lambda_, exclude_self=exclude_self, scale=scale)  # (Q, N)
    assert new_sims.shape == sims.shape and new_sims.dtype == np.float32 and new_idx.dtype == np.int64
    # Same candidates, re-sorted; the score is 1 - final distance.
    np.testing.assert_array_equal(np.sort(new_idx, axis=1), np.sort(idx, axis=1))
    np.testing.assert_allclose(new_sims, 1 - np.take_along_axis(final, new_idx, axis=1), atol=1e-5)
    # Sorted by the reference's final distance; mathematically equal distances (common in the Jaccard term) may
    # round differently in float32 and float64, so order is checked up to that rounding.
    assert (np.diff(np.take_along_axis(final, new_idx, axis=1), axis=1) >= -1e-6).all()
    assert (np.diff(new_sims, axis=1) <= 0).all()
    if lambda_ == 0:
        # Candidates sharing nothing with the query (J = 1, score exactly 0) tie and keep their first-stage order.
        for row in range(len(idx)):
            tied = new_idx[row][new_sims[row] == 0]
            assert tied.tolist() == [j for j in idx[row] if j in set(tied.tolist())]
        assert (new_sims == 0).sum() > 10
    # Re-ranking must matter on this data, or the comparison above would prove little.
    assert (new_idx[:, 0] != idx[:, 0]).mean() > 0.2


@pytest.mark.parametrize("width", [40, 400])
def test_min_overlap_kernel_equals_scipy_bit_for_bit(monkeypatch, width: int) -> None:
    # The compiled Jaccard sums against the scipy path they replace (a.minimum(b).sum(axis=1) in float32): the same
    # float64 numbers, not merely close. Rows paired with themselves (or near copies) make overlaps of up to 400
    # entries: numpy's pairwise summation then recurses, which the kernel must follow.
    pytest.importorskip("numba")
    rng = np.random.default_rng(width)
    n_rows, n_cols = 300, 2 * width
    nnz = rng.integers(0, width, n_rows)
    rows = np.repeat(np.arange(n_rows), nnz)
    cols = np.concatenate([rng.choice(n_cols, m, replace=False) for m in nnz])
    v = sp.csr_matrix(((rng.random(len(rows)) ** 3).astype(np.float32), (rows, cols)), shape=(n_rows, n_cols))
    v.sort_indices()
    query_rows = rng.integers(0, n_rows, 60)
    cand_rows = rng.integers(0, n_rows, (60, 9))
    cand_rows[:, 0] = query_rows  # overlap = the whole row
    compiled = arcfold.retrieval.postprocess._min_overlap(v, query_rows, cand_rows)
    monkeypatch.setattr(arcfold.retrieval.postprocess, "numba_available", lambda: False)
    scipy_sums = arcfold.retrieval.postprocess._min_overlap(v, query_rows, cand_rows)
    np.testing.assert_array_equal(compiled, scipy_sums)
    np.testing.assert_allclose(compiled[:, 0], [v[r].sum() for r in query_rows], rtol=1e-6)  # min(a, a) = a
    assert nnz[query_rows].max() > 128 or width < 128


def test_k_reciprocal_expansion_step_is_exercised(small_clustered) -> None:
    # With k1=20 some items' sets R*(i) grow beyond R(i, k1) (step 3), so the reference test covers the expansion.
    queries, gallery = small_clustered
    union = np.concatenate([queries, gallery])
    _, nn = search(union, union, 21)
    rows, _ = arcfold.retrieval.postprocess._expansion_sets(nn, 20)
    expanded_sizes = np.bincount(rows, minlength=len(union))
    recip = arcfold.retrieval.postprocess._reciprocal_sets(nn)
    # R(i, 20) by its definition, item by item: j in N(i) and i in N(j)
    expected = [sorted(j for j in nn[i] if i in nn[j]) for i in range(len(union))]
    assert [recip.indices[recip.indptr[i] : recip.indptr[i + 1]].tolist() for i in range(len(union))] == expected
    reciprocal_sizes = np.diff(recip.indptr)  # |R(i, 20)|
    assert (expanded_sizes >= reciprocal_sizes).all() and (expanded_sizes > reciprocal_sizes).any()


def test_k_reciprocal_with_an_index_searches_as_before(small_clustered) -> None:
    # index="ivf" takes the search(U, U, k1 + 1) / search(-U, U, 1) path; visiting every list makes it exact, so it
    # must agree with the default one-pass self_topk path.
    queries, gallery = small_clustered
    sims, idx = search(queries, gallery, 25)
    expected = k_reciprocal(queries, gallery, sims, idx, k1=9, k2=3)
    got = k_reciprocal(queries, gallery, sims, idx, k1=9, k2=3, index="ivf", nlist=2, nprobe=2)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)


def test_k_reciprocal_moves_the_reciprocal_match_up() -> None:
    # Unit vectors on a circle (angles in degrees). The query q (0) belongs with cluster A at -10, -19, -27; the hub
    # x at 9 is closer to q than a = -10 but its own 3 nearest are cluster B (12, 14.5, 17.5), so q is not among
    # them. With k1 = 3: N(q) = {q, x, a, b1}, N(x) = {x, b1, b2, b3}, N(a) = {a, a2, q, a3}, so R(q) = {q, a}
    # and x is not k-reciprocal to q; R*(x) = {x, b1, b2, b3} shares nothing with R*(q) = {q, a}: J(q, x) = 1.
    queries = _on_circle([0])
    gallery = _on_circle([9, -10, -19, -27, 12, 14.5, 17.5])  # x, a, a2, a3, b1, b2, b3
    sims, idx = search(queries, gallery, 7)
    assert idx[0, :2].tolist() == [0, 1]  # x first, a second
    new_sims, new_idx = k_reciprocal(queries, gallery, sims, idx, k1=3, k2=1, lambda_=0.3)
    assert new_idx[0, 0] == 1  # a moves to the top
    assert new_idx[0].tolist().index(0) > 1  # and x drops below a2 as well
    # x's score: 1 - (0.7 * J + 0.3 * d) with J = 1 and d = (2 - 2 cos 9°) / (2 - 2 cos 27°) (farthest item: a3).
    d_x = (1 - np.cos(np.deg2rad(9))) / (1 - np.cos(np.deg2rad(27)))
    assert new_sims[0, new_idx[0].tolist().index(0)] == pytest.approx(1 - 0.7 - 0.3 * d_x, abs=1e-6)


def test_k_reciprocal_lambda_one_keeps_the_original_order(small_clustered) -> None:
    queries, gallery = small_clustered
    sims, idx = search(queries, gallery, 15)
    new_sims, new_idx = k_reciprocal(queries, gallery, sims, idx, k1=6, k2=2, lambda_=1.0, original_scale=2.0)
    np.testing.assert_array_equal(new_idx, idx)
    np.testing.assert_allclose(new_sims, sims, atol=1e-6)  # 1 - (2 - 2 s) / 2 = s


def test_k_reciprocal_errors(small_clustered) -> None:
    queries, gallery = small_clustered
    sims, idx = search(queries, gallery, 5)
    with pytest.raises(ValueError, match="gallery indices in"):
        k_reciprocal(queries, gallery, sims, np.where(idx == idx[0, 0], -1, idx))
    with pytest.raises(ValueError, match="must both be"):
        k_reciprocal(queries, gallery, sims[:, :3], idx)
    with pytest.raises(ValueError, match=r"k1=200 needs k1 \+ 1 <= 150"):
        k_reciprocal(queries, gallery, sims, idx, k1=200)
    with pytest.raises(ValueError, match="k2=30 must be <= k1 \\+ 1 = 21"):
        k_reciprocal(queries, gallery, sims, idx, k2=30)
    with pytest.raises(ValueError, match="lambda_ must be in"):
        k_reciprocal(queries, gallery, sims, idx, lambda_=1.5)
    with pytest.raises(ValueError, match="original_scale"):
        k_reciprocal(queries, gallery, sims, idx, original_scale="mean")
    with pytest.raises(ValueError, match="gallery-aligned"):
        k_reciprocal(queries, gallery, sims, idx, exclude_self=True)


# --------------------------------------------------------------------------------------------------------------------
# label voting

VOTE_IDX = np.array([[0, 1, 2, 3], [4, 3, 2, 1]])
# Binary fractions, so sums and ties are exact in float32.
VOTE_SIMS = np.array([[0.875, 0.75, 0.5, 0.375], [0.5, 0.5, 0.375, 0.125]], dtype=np.float32)
VOTE_LABELS = np.array(["a", "b", "b", "c", "d"], dtype=object)


def test_vote_labels_max_and_sum() -> None:
    labels, scores = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, top=3)
    # Row 0: a 0.875, b max(0.75, 0.5), c 0.375. Row 1: d and c tie at 0.5, d came first; b max(0.375, 0.125).
    assert labels.tolist() == [["a", "b", "c"], ["d", "c", "b"]]
    np.testing.assert_array_equal(scores, [[0.875, 0.75, 0.375], [0.5, 0.5, 0.375]])
    assert labels.dtype == object and scores.dtype == np.float32
    labels, scores = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, mode="sum", top=3)
    # Row 0: b 0.75 + 0.5 = 1.25 beats a 0.875. Row 1: b 0.375 + 0.125 = 0.5 ties d and c, but b comes last.
    assert labels.tolist() == [["b", "a", "c"], ["d", "c", "b"]]
    np.testing.assert_array_equal(scores, [[1.25, 0.875, 0.375], [0.5, 0.5, 0.5]])


def test_vote_labels_k_and_padding() -> None:
    labels, scores = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, k=2, top=4)
    assert labels.tolist() == [["a", "b", None, None], ["d", "c", None, None]]
    assert np.isnan(scores[:, 2:]).all()
    np.testing.assert_array_equal(scores[:, :2], [[0.875, 0.75], [0.5, 0.5]])
    # Labels of any hashable type, given as a list.
    labels, _ = vote_labels(VOTE_IDX, VOTE_SIMS, [10, (1, 2), (1, 2), 30, 40], top=2)
    assert labels.tolist() == [[10, (1, 2)], [40, 30]]


def test_vote_labels_new_label_threshold() -> None:
    kwargs = {"new_label": "new", "top": 3}
    # Threshold 0.8: row 0 keeps a (0.875) first, then new; row 1's best (0.5) is below it: new first.
    labels, scores = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, threshold=0.8, **kwargs)
    assert labels.tolist() == [["a", "new", "b"], ["new", "d", "c"]]
    np.testing.assert_array_equal(scores, np.float32([[0.875, 0.8, 0.75], [0.8, 0.5, 0.5]]))
    # Scores equal to the threshold stay ahead of new_label (row 1: d and c at 0.5).
    labels, _ = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, threshold=0.5, **kwargs)
    assert labels.tolist() == [["a", "b", "new"], ["d", "c", "new"]]
    # All of the top 3 at or above the threshold: new_label does not make the list.
    labels, _ = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, threshold=0.375, **kwargs)
    assert labels.tolist() == [["a", "b", "c"], ["d", "c", "b"]]
    # Fewer labels than top: new_label takes the first padding position.
    labels, scores = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, k=1, threshold=0.25, **kwargs)
    assert labels.tolist() == [["a", "new", None], ["d", "new", None]]
    np.testing.assert_array_equal(scores[:, :2], [[0.875, 0.25], [0.5, 0.25]])
    # new_label that is also a gallery label appears once, at max(its vote, threshold): row 0 votes it 0.875;
    # row 1 has no such neighbour, so it gets 0.25 and falls below the top 3.
    labels, scores = vote_labels(VOTE_IDX, VOTE_SIMS, ["new", "b", "b", "c", "d"], threshold=0.25, **kwargs)
    assert labels.tolist() == [["new", "b", "c"], ["d", "c", "b"]]
    np.testing.assert_array_equal(scores[0], [0.875, 0.75, 0.375])


def test_vote_labels_fill_lists_the_further_neighbours_after_the_vote_and_the_new_label() -> None:
    # k=1: the vote itself sees one neighbour (row 0: a; row 1: d); fill=True takes the labels of the other
    # columns in the order of the vote over all 4 (row 0 max: b 0.75, c 0.375; row 1: c 0.5, b 0.375).
    labels, scores = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, k=1, top=4, fill=True)
    assert labels.tolist() == [["a", "b", "c", None], ["d", "c", "b", None]]  # only 3 labels among 4 neighbours
    np.testing.assert_array_equal(scores[:, :3], [[0.875, 0.75, 0.375], [0.5, 0.5, 0.375]])
    assert np.isnan(scores[:, 3]).all()
    # The new label keeps the place the threshold gives it without filling (right after the vote's own label,
    # even where a filled label scores more than the threshold: row 0's b 0.75 > 0.25); the fill comes after it.
    labels, scores = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, k=1, new_label="new", threshold=0.25, top=4,
                                 fill=True)  # fmt: skip
    assert labels.tolist() == [["a", "new", "b", "c"], ["d", "new", "c", "b"]]
    np.testing.assert_array_equal(scores, np.float32([[0.875, 0.25, 0.75, 0.375], [0.5, 0.25, 0.5, 0.375]]))
    # sum mode: the fill is ranked by the summed vote (row 0: b 0.75 + 0.5 = 1.25 before c 0.375)
    labels, _ = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, k=1, mode="sum", top=3, fill=True)
    assert labels.tolist() == [["a", "b", "c"], ["d", "c", "b"]]
    # a full row, or k = all columns: fill changes nothing
    for k, top in ((4, 3), (2, 2)):
        plain = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, k=k, top=top)
        filled = vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, k=k, top=top, fill=True)
        assert plain[0].tolist() == filled[0].tolist()
        np.testing.assert_array_equal(plain[1], filled[1])


def _vote_row_by_hand(labels: list, sims: list, mode: str, top: int) -> list:
    """The voting rule for one row, in plain Python: score per label, ranked by (-score, first rank)."""
    scores: dict = {}
    first: dict = {}
    for rank, (label, sim) in enumerate(zip(labels, sims, strict=True)):
        scores[label] = sim if label not in scores else (max if mode == "max" else sum)((scores[label], sim))
        first.setdefault(label, rank)
    ranked = sorted(scores, key=lambda label: (-scores[label], first[label]))[:top]
    return [(label, scores[label]) for label in ranked] + [(None, None)] * (top - len(ranked))


@pytest.mark.parametrize("mode", ["max", "sum"])
def test_vote_labels_matches_the_rule_on_random_tables(mode: str) -> None:
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 30, size=(200, 12))
    sims = (rng.integers(0, 8, size=(200, 12)) / 8).astype(np.float32)  # eighths: many exact ties
    gallery_labels = rng.choice(["p", "q", "r", "s", "t", "u"], size=30).astype(object)
    labels, scores = vote_labels(idx, sims, gallery_labels, k=9, mode=mode, top=5)
    for row in range(len(idx)):
        expected = _vote_row_by_hand(list(gallery_labels[idx[row, :9]]), list(sims[row, :9]), mode, 5)
        assert labels[row].tolist() == [label for label, _ in expected]
        got = [None if np.isnan(score) else float(score) for score in scores[row]]
        assert got == [None if score is None else float(score) for _, score in expected]


def test_vote_labels_errors() -> None:
    with pytest.raises(ValueError, match="give both or neither"):
        vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, new_label="new")
    with pytest.raises(ValueError, match="unknown mode 'mean'"):
        vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, mode="mean")
    with pytest.raises(ValueError, match="k=5 but idx has only 4 columns"):
        vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS, k=5)
    with pytest.raises(ValueError, match=r"gallery indices in \[0, 4\)"):
        vote_labels(VOTE_IDX, VOTE_SIMS, VOTE_LABELS[:4])
    with pytest.raises(ValueError, match="must both be"):
        vote_labels(VOTE_IDX, VOTE_SIMS[:, :2], VOTE_LABELS)
    with pytest.raises(ValueError, match="sims contain NaN"):
        vote_labels(VOTE_IDX, np.where(VOTE_SIMS > 0.8, np.nan, VOTE_SIMS), VOTE_LABELS)


# --------------------------------------------------------------------------------------------------------------------
# pipeline


def _clustered_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """100 classes x 10 items in 32-D around a common direction (fine-grained); 2 per class are queries."""
    rng = np.random.default_rng(seed)
    dim, per_class = 32, 10
    base = _unit(rng.normal(size=(1, dim)))
    centres = _unit(base + rng.normal(size=(100, dim)) / np.sqrt(dim))
    labels = np.repeat(np.arange(100), per_class)
    x = _unit(centres[labels] + 0.7 * rng.normal(size=(len(labels), dim)) / np.sqrt(dim))
    is_query = np.arange(len(x)) % per_class < 2
    return x[is_query], labels[is_query], x[~is_query], labels[~is_query]


def test_pipeline_dba_qe_improves_recall_at_1() -> None:
    queries, query_labels, gallery, gallery_labels = _clustered_split()
    steps = [{"name": "dba", "k": 2, "alpha": 3.0}, {"name": "qe", "k": 2, "alpha": 3.0}]
    _, plain = rerank_pipeline(queries, gallery, [], 10)
    _, augmented = rerank_pipeline(queries, gallery, steps, 10)
    recall_plain = (gallery_labels[plain[:, 0]] == query_labels).mean()
    recall_augmented = (gallery_labels[augmented[:, 0]] == query_labels).mean()
    # 200 queries: 0.825 -> 0.89 here; the tolerance allows two queries to flip on another BLAS.
    assert recall_plain == pytest.approx(0.825, abs=0.011)
    assert recall_augmented == pytest.approx(0.89, abs=0.011)
    assert recall_augmented >= recall_plain + 0.04
    # Leave-one-out on all 1000 items (exclude_self): DBA also augments the queries, since they are the gallery.
    x = np.concatenate([queries, gallery])
    labels = np.concatenate([query_labels, gallery_labels])
    _, plain = rerank_pipeline(x, x, [], 10, exclude_self=True)
    _, augmented = rerank_pipeline(x, x, steps, 10, exclude_self=True)
    assert not (augmented == np.arange(len(x))[:, None]).any()
    assert (labels[augmented[:, 0]] == labels).mean() > (labels[plain[:, 0]] == labels).mean() + 0.01


def test_pipeline_equals_the_steps_by_hand(small_clustered) -> None:
    queries, gallery = small_clustered
    assert rerank_pipeline(queries, gallery, [], 7)[1].tolist() == search(queries, gallery, 7)[1].tolist()
    steps = [{"name": "dba", "k": 3}, {"name": "qe", "alpha": 1.0}, {"name": "kr", "k1": 8, "k2": 3, "lambda": 0.2}]
    sims, idx = rerank_pipeline(queries, gallery, steps, 12)
    g = database_augmentation(gallery, k=3, alpha=3.0)
    q = query_expansion(queries, g, k=2, alpha=1.0)
    first_sims, first_idx = search(q, g, 12)
    expected = k_reciprocal(q, g, first_sims, first_idx, k1=8, k2=3, lambda_=0.2)
    np.testing.assert_array_equal(idx, expected[1])
    np.testing.assert_allclose(sims, expected[0], atol=1e-6)
    # Search options reach every search (here: the torch backend gives the same answer).
    torch_sims, torch_idx = rerank_pipeline(queries, gallery, steps, 12, backend="torch")
    np.testing.assert_array_equal(torch_idx, idx)
    np.testing.assert_allclose(torch_sims, sims, atol=1e-5)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"name": "kr"}, {"name": "qe"}], r"step 1 \('qe'\) comes after 'kr'"),
        ([{"name": "kr"}, {"name": "kr"}], "kr may appear only once"),
        ([{"name": "pca"}], "unknown post-processor 'pca' in step 0; accepted: dba, qe, kr"),
        ([{"name": "qe", "beta": 1}], r"unknown parameter\(s\) \['beta'\] for step 0 \('qe'\); accepted: k, alpha"),
        ([{"name": "kr", "lambda_": 0.1}], "accepted: k1, k2, lambda, original_scale"),
        ([{"k": 2}], "must be a dict with a 'name'"),
        ({"name": "qe"}, "must be a list of step dicts"),
    ],
)
def test_pipeline_step_errors(small_clustered, steps, message: str) -> None:
    queries, gallery = small_clustered
    with pytest.raises(ValueError, match=message):
        rerank_pipeline(queries, gallery, steps, 5)


def test_registry_defaults_match_the_functions() -> None:
    assert set(POSTPROCESSORS) == {"dba", "qe", "kr"}
    assert POSTPROCESSORS["qe"].params == {"k": 2, "alpha": 3.0}
    assert POSTPROCESSORS["kr"].call_kwargs({"name": "kr", "lambda": 0.1}) == {
        "k1": 20,
        "k2": 6,
        "lambda_": 0.1,
        "original_scale": "row_max",
    }


@pytest.mark.parametrize("module", [arcfold.retrieval.postprocess, arcfold.retrieval.voting])
def test_doctests(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
