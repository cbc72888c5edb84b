"""Tests for arcfold.metrics: hand-computed tables, a hand-built embedding set, PML and brute-force references."""

from __future__ import annotations

import doctest
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch

import arcfold.retrieval.exact_knn
import arcfold.retrieval.metrics
from arcfold.retrieval.metrics import DEFAULT_KS, knn, map_at_r, recall_at_k, retrieval_metrics

# --------------------------------------------------------------------------------------------------------------------
# Helpers: data and an independent brute-force reference
# --------------------------------------------------------------------------------------------------------------------


def clustered(seed: int, n_singletons: int, n_classes: int = 30, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm float32 points around random class centres; class sizes 2..31 except n_singletons classes of 1."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 32, n_classes)
    sizes[:n_singletons] = 1
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), sizes)  # (N,)
    x = centres[labels] + 0.9 * rng.normal(size=(len(labels), dim))  # (N, D)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(labels))  # shuffle so classes are not contiguous (chunks then mix classes)
    return x.astype(np.float32)[perm], labels[perm]


def min_top_gap(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Smallest gap between consecutive similarities in the top max(k, R)+1 of any query row (float64)."""
    sims = x.astype(np.float64) @ x.astype(np.float64).T  # (N, N)
    np.fill_diagonal(sims, -np.inf)
    r = np.bincount(labels)[labels] - 1  # (N,)
    gaps = []
    for i in np.flatnonzero(r >= 1):
        top = np.sort(sims[i])[::-1][: max(k, r[i]) + 1]
        gaps.append(np.min(top[:-1] - top[1:]))
    return float(min(gaps))


def brute_force(x: np.ndarray, labels: np.ndarray, ks: list[int], only: set[int] | None = None) -> dict[str, Fraction]:
    """Leave-one-out metrics straight from the definitions, as exact fractions (over the queries in ``only``).

    Full (N, N) similarities in float64 (exact for the small-integer / dyadic inputs used with it), full stable
    argsort of -similarity per row (ties -> lower index), self removed by index, AP@R summed term by term.
    """
    labels = np.asarray(labels)
    sims = x.astype(np.float64) @ x.astype(np.float64).T  # (N, N)
    n = len(labels)
    hits = {k: 0 for k in ks}
    ap_sum = Fraction(0)
    n_queries = 0
    for i in range(n):
        r = int(np.sum(labels == labels[i])) - 1
        if r == 0 or (only is not None and i not in only):
            continue
        n_queries += 1
        order = np.argsort(-sims[i], kind="stable")  # (N,)
        order = order[order != i]  # (N-1,)
        rel = labels[order] == labels[i]  # (N-1,)
        for k in ks:
            hits[k] += bool(rel[:k].any())
        found = 0
        ap = Fraction(0)
        for rank in range(1, r + 1):
            if rel[rank - 1]:
                found += 1
                ap += Fraction(found, rank)
        ap_sum += ap / r
    out = {f"recall@{k}": Fraction(hits[k], n_queries) for k in ks}
    out["map@r"] = ap_sum / n_queries
    return out


# --------------------------------------------------------------------------------------------------------------------
# 1. Pure functions on hand-written neighbour tables
# --------------------------------------------------------------------------------------------------------------------


def test_recall_at_k_hand_table() -> None:
    neighbour_labels = np.array(
        [
            [3, 3, 1, 3],  # query 3: hit at rank 1
            [0, 2, 2, 1],  # query 1: first hit at rank 4
            [0, 1, 2, 0],  # query 2: first hit at rank 3
            [1, 0, 1, 1],  # query 0: first hit at rank 2
            [1, 1, 1, 1],  # query 2: no hit
        ]
    )
    query_labels = np.array([3, 1, 2, 0, 2])
    got = recall_at_k(neighbour_labels, query_labels, ks=[1, 2, 3, 4])
    assert got == pytest.approx({1: 1 / 5, 2: 2 / 5, 3: 3 / 5, 4: 4 / 5}, abs=1e-15)
    assert list(got) == [1, 2, 3, 4]


def test_recall_at_k_string_labels_and_duplicate_ks() -> None:
    neighbour_labels = np.array([["cat", "dog"], ["dog", "dog"], ["cow", "cat"]])
    got = recall_at_k(neighbour_labels, np.array(["dog", "dog", "cat"]), ks=[2, 1, 2])
    # Duplicate Ks collapse, caller's order kept. K=1: only query 1; K=2: all three.
    assert got == pytest.approx({2: 3 / 3, 1: 1 / 3}, abs=1e-15)
    assert list(got) == [2, 1]


def test_map_at_r_hand_table() -> None:
    neighbour_labels = np.array(
        [
            [5, 0, 5, 5, 0],  # R=3, rel [1,0,1]:      (1/3)(1/1 + 2/3)
            [0, 5, 5, 0, 0],  # R=3, rel [0,1,1]:      (1/3)(1/2 + 2/3)
            [0, 0, 0, 5, 5],  # R=3, rel [0,0,0]:      0 (hits beyond R do not count)
            [7, 7, 0, 7, 0],  # R=2, rel [1,1]:        (1/2)(1/1 + 2/2) = 1
            [0, 9, 9, 9, 9],  # R=1, rel [0]:          0
            [0, 0, 0, 0, 1],  # R=5, rel [0,0,0,0,1]:  (1/5)(1/5)
        ]
    )
    query_labels = np.array([5, 5, 5, 7, 9, 1])
    n_relevant = np.array([3, 3, 3, 2, 1, 5])
    per_query = [
        Fraction(1, 3) * (1 + Fraction(2, 3)),
        Fraction(1, 3) * (Fraction(1, 2) + Fraction(2, 3)),
        Fraction(0),
        Fraction(1, 2) * (1 + 1),
        Fraction(0),
        Fraction(1, 5) * Fraction(1, 5),
    ]
    expected = sum(per_query) / len(per_query)
    assert map_at_r(neighbour_labels, query_labels, n_relevant) == pytest.approx(float(expected), abs=1e-15)
    # Columns beyond a query's R are ignored: appending extra relevant columns changes nothing.
    wider = np.concatenate([neighbour_labels, query_labels[:, None].repeat(3, axis=1)], axis=1)
    assert map_at_r(wider, query_labels, n_relevant) == pytest.approx(float(expected), abs=1e-15)


def test_pure_functions_reject_bad_tables() -> None:
    table = np.array([[1, 2], [2, 1]])
    with pytest.raises(ValueError, match="only 2 columns"):
        recall_at_k(table, np.array([1, 2]), ks=[3])
    with pytest.raises(ValueError, match="positive integer"):
        recall_at_k(table, np.array([1, 2]), ks=[0])
    with pytest.raises(ValueError, match="length mismatch"):
        recall_at_k(table, np.array([1, 2, 3]), ks=[1])
    with pytest.raises(ValueError, match="max\\(R\\)=3"):
        map_at_r(table, np.array([1, 2]), np.array([1, 3]))
    with pytest.raises(ValueError, match=">= 1"):
        map_at_r(table, np.array([1, 2]), np.array([1, 0]))


# --------------------------------------------------------------------------------------------------------------------
# 2. A hand-built embedding set
# --------------------------------------------------------------------------------------------------------------------

# Eight points on the circle of radius 5 with integer coordinates, so every inner product is an exact integer
# (25 * cos of the angle between them) and ties are exact. normalize=False keeps the arithmetic exact; all norms are
# equal, so ranking by inner product is ranking by angle.
#
#   idx  point    angle    label
#   0    ( 5, 0)    0.0°   "a"
#   1    ( 4, 3)   36.9°   "a"
#   2    ( 4, 3)   36.9°   "b"   exact duplicate of 1, other class
#   3    ( 3, 4)   53.1°   "b"
#   4    ( 0, 5)   90.0°   "c"   singleton: not a query, still a neighbour of others
#   5    (-3, 4)  126.9°   "d"
#   6    (-5, 0)  180.0°   "d"
#   7    ( 4,-3)  -36.9°   "a"
#
# Class sizes: a=3 (R=2), b=2 (R=1), c=1 (no query), d=2 (R=1). Queries: 0,1,2,3,5,6,7 (7 queries).
# Neighbour lists (index:similarity:label), self removed, ties by lower index:
#   q0 a R=2: 1:20:a 2:20:b 7:20:a 3:15:b ...   3-way tie at 20 -> 1,2,7. first hit 1. AP=(1/2)(1/1+0)=1/2
#   q1 a R=2: 2:25:b 3:24:b 0:20:a 4:15:c ...   its duplicate (other class) first. first hit 3. AP=0
#   q2 b R=1: 1:25:a 3:24:b ...                 first hit 2. AP=0
#   q3 b R=1: 1:24:a 2:24:b 4:20:c ...          tie 1 vs 2 -> 1 (wrong class) first. first hit 2. AP=0
#   q5 d R=1: 4:20:c 6:15:d ...                 the singleton is the nearest. first hit 2. AP=0
#   q6 d R=1: 5:15:d ...                        first hit 1. AP=1
#   q7 a R=2: 0:20:a 1:7:a 2:7:b ...            tie 1 vs 2 -> 1 (right class). first hit 1. AP=(1/2)(1+2/2)=1
# First-hit ranks [1,3,2,2,2,1,1]: Recall@1=3/7, @2=6/7, @3=7/7; K=10 > N-1=7 uses all 7 others: 7/7.
# MAP@R = (1/2 + 0 + 0 + 0 + 0 + 1 + 1) / 7 = 5/14.
HAND_X = np.array([[5, 0], [4, 3], [4, 3], [3, 4], [0, 5], [-3, 4], [-5, 0], [4, -3]], dtype=np.float32)
HAND_Y = ["a", "a", "b", "b", "c", "d", "d", "a"]
HAND_EXPECTED = {
    "recall@1": 3 / 7,
    "recall@2": 6 / 7,
    "recall@3": 7 / 7,
    "recall@10": 7 / 7,
    "map@r": 5 / 14,
    "n_queries": 7,
    "n_items": 8,
}


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_hand_built_set(chunk_size: int | None) -> None:
    got = retrieval_metrics(HAND_X, HAND_Y, ks=(1, 2, 3, 10), normalize=False, chunk_size=chunk_size)
    assert list(got) == list(HAND_EXPECTED)
    assert got == pytest.approx(HAND_EXPECTED, abs=1e-15)
    assert isinstance(got["n_queries"], int) and isinstance(got["n_items"], int)


def test_hand_built_set_any_label_type_and_torch_input() -> None:
    # The same partition under integer labels (as a tensor) and tuple labels gives the same numbers.
    int_labels = torch.tensor([10, 10, 20, 20, 30, 40, 40, 10])
    tuple_labels = [("x", 1), ("x", 1), ("y",), ("y",), (), ("z", 0), ("z", 0), ("x", 1)]
    for labels in (int_labels, tuple_labels):
        got = retrieval_metrics(torch.from_numpy(HAND_X), labels, ks=(1, 2, 3, 10), normalize=False)
        assert got == pytest.approx(HAND_EXPECTED, abs=1e-15)


def test_hand_built_set_tie_at_the_k_boundary() -> None:
    # ks=(1,) makes the per-chunk k = max(1, max R) = 2. For q0 the 3-way tie at 20 (items 1, 2, 7) straddles rank 2,
    # so only the tie rule decides that rank 1 is item 1 ("a", a hit) rather than item 2 ("b").
    got = retrieval_metrics(HAND_X, HAND_Y, ks=(1,), normalize=False, chunk_size=1)
    assert got["recall@1"] == pytest.approx(3 / 7, abs=1e-15)
    assert got["map@r"] == pytest.approx(5 / 14, abs=1e-15)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_all_identical_points_tie_rule_decides_everything(chunk_size: int | None) -> None:
    # Seven identical vectors: every similarity is 1, so the ranking is purely by index (self removed).
    #   idx 0, 1: "q" (R=1);  idx 2..6: "z" (R=4)
    #   q0: 1q 2z ...  hit@1, AP=1        q1: 0q 2z ...  hit@1, AP=1
    #   z2..z6: 0q 1q z z z z  first hit at rank 3, AP=(1/4)(1/3 + 2/4) = 5/24
    # With ks=(1,) the per-chunk k is 1 for q-only chunks and 4 for chunks with a z: the 6-way tie always straddles
    # the k-th position, and torch.topk alone returns arbitrary members of it.
    x = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (7, 1))
    y = ["q", "q", "z", "z", "z", "z", "z"]
    got = retrieval_metrics(x, y, ks=(1, 2, 3), chunk_size=chunk_size)
    expected_map = (1 + 1 + 5 * Fraction(5, 24)) / 7
    expected = {"recall@1": 2 / 7, "recall@2": 2 / 7, "recall@3": 1.0, "map@r": float(expected_map)}
    assert got == pytest.approx({**expected, "n_queries": 7, "n_items": 7}, abs=1e-15)
    assert retrieval_metrics(x, y, ks=(1,), chunk_size=chunk_size)["recall@1"] == pytest.approx(2 / 7, abs=1e-15)


def test_normalize_makes_metrics_scale_invariant() -> None:
    # Positive integer scales keep the normalised vectors bit-identical (exact norms, correctly rounded division).
    scales = np.array([1, 2, 3, 1, 4, 2, 5, 3], dtype=np.float32)[:, None]
    scaled = HAND_X * scales
    assert retrieval_metrics(scaled, HAND_Y, ks=(1, 2, 3, 10)) == pytest.approx(HAND_EXPECTED, abs=1e-15)
    # Without normalisation the scales change the ranking (e.g. q0's nearest becomes the 3x-scaled item 2, a "b").
    assert retrieval_metrics(scaled, HAND_Y, ks=(1, 2, 3, 10), normalize=False)["map@r"] != pytest.approx(5 / 14)


# --------------------------------------------------------------------------------------------------------------------
# 3. Independent references: pytorch-metric-learning and a brute-force reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "n_singletons"), [(6, 4), (2, 0)])
def test_matches_pytorch_metric_learning(seed: int, n_singletons: int) -> None:
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = clustered(seed, n_singletons)
    # Precondition: no near-ties in any ranking that matters (gaps far above float32 rounding), so PML's faiss L2
    # search and our float32 inner products must produce identical rankings.
    assert min_top_gap(x, y, 10) > 1e-6
    calc = pml.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count", device=torch.device("cpu")
    )
    ref = calc.get_accuracy(query=x, reference=x, query_labels=y, reference_labels=y, ref_includes_query=True)
    ours = retrieval_metrics(x, y)
    # PML, like us, drops queries whose class is a singleton ("lone" queries) but keeps them in the reference set.
    assert ours["n_queries"] == len(y) - n_singletons
    assert 0.5 < ours["recall@1"] < 0.95 and 0.3 < ours["map@r"] < 0.8  # non-trivial regime
    assert ours["recall@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)


def test_matches_brute_force_on_continuous_data() -> None:
    x, y = clustered(6, 4)
    # Snap to a 2^-10 grid so that float32 and float64 inner products are exact and agree bit for bit.
    x = np.round(x * 1024) / 1024
    ks = [1, 2, 4, 5, 8, 10, 32]
    expected = brute_force(x, y, ks)
    got = retrieval_metrics(x.astype(np.float32), y, ks=ks, normalize=False)
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_with_many_exact_ties(seed: int) -> None:
    # Entries in {-1, 0, 1}^4 with 6 classes: only 81 distinct vectors for 120 items, so there are many duplicates and
    # many equal similarities, i.e. the tie rule decides most rankings. Some classes are singletons.
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(120, 4)).astype(np.float32)
    y = rng.integers(0, 6, size=120)
    y[:3] = [100, 101, 102]  # three singletons
    ks = [1, 2, 3, 5, 10, 200]  # 200 > N-1: uses all 119 others, i.e. 1.0 for every query
    expected = brute_force(x, y, ks)
    for chunk_size in (1, 7, None):
        got = retrieval_metrics(x, y, ks=ks, normalize=False, chunk_size=chunk_size)
        for key, value in expected.items():
            assert got[key] == pytest.approx(float(value), abs=1e-12), (key, chunk_size)
    assert got["n_queries"] == 117
    assert expected["recall@200"] == 1


# --------------------------------------------------------------------------------------------------------------------
# 4. Chunking invariance
# --------------------------------------------------------------------------------------------------------------------


def test_chunking_invariance() -> None:
    x, y = clustered(6, 4)
    results = [retrieval_metrics(x, y, chunk_size=c) for c in (1, 7, None)]
    assert results[0] == results[1] == results[2]
    assert list(results[0]) == [f"recall@{k}" for k in DEFAULT_KS] + ["map@r", "n_queries", "n_items"]


def test_query_subset_scores_those_queries_exactly_as_the_full_run() -> None:
    x, y = clustered(7, 3)
    ks = [1, 2, 5]
    rng = np.random.default_rng(0)
    subset = rng.choice(len(y), size=len(y) // 3, replace=False)  # unsorted, includes some singletons
    got = retrieval_metrics(x, y, ks=ks, query_subset=subset, chunk_size=5)
    ref = brute_force(x, y, ks, only=set(subset.tolist()))
    singletons = np.bincount(y)[y] == 1
    assert got["n_queries"] == int((~singletons[subset]).sum()) and got["n_items"] == len(y)
    for name, value in ref.items():
        assert got[name] == pytest.approx(float(value), abs=1e-12)
    # the two halves of a partition of the items average to the full figures, weighted by their query counts
    halves = [retrieval_metrics(x, y, ks=ks, query_subset=h) for h in np.array_split(rng.permutation(len(y)), 2)]
    full = retrieval_metrics(x, y, ks=ks)
    for name in ("recall@1", "recall@5", "map@r"):
        weighted = sum(h[name] * h["n_queries"] for h in halves) / full["n_queries"]
        assert weighted == pytest.approx(full[name], abs=1e-12)
    assert retrieval_metrics(x, y, ks=ks, query_subset=np.arange(len(y))) == full


def test_query_subset_errors() -> None:
    x, y = clustered(8, 3)
    for bad in ([0, 0], [[0, 1]], [0.5], [len(y)], [-1]):
        with pytest.raises(ValueError, match="query_subset"):
            retrieval_metrics(x, y, query_subset=np.asarray(bad))
    singleton = int(np.flatnonzero(np.bincount(y)[y] == 1)[0])
    with pytest.raises(ValueError, match="no queries"):
        retrieval_metrics(x, y, query_subset=[singleton])


def test_progress_bar_does_not_change_results() -> None:
    assert retrieval_metrics(HAND_X, HAND_Y, normalize=False, chunk_size=2, progress=True) == retrieval_metrics(
        HAND_X, HAND_Y, normalize=False, chunk_size=2
    )


# --------------------------------------------------------------------------------------------------------------------
# 5. knn and its tie rule
# --------------------------------------------------------------------------------------------------------------------


def test_knn_identical_gallery() -> None:
    gallery = np.ones((6, 3), dtype=np.float32)  # six identical vectors: every similarity is 3.0
    sims, idx = knn(gallery[:1], gallery, k=2)
    assert idx.tolist() == [[0, 1]]
    assert sims.tolist() == [[3.0, 3.0]]
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    _, idx = knn(gallery, gallery, k=2, exclude_self=True, chunk_size=4)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]]
    _, idx = knn(gallery, gallery, k=5, exclude_self=True)
    assert idx[0].tolist() == [1, 2, 3, 4, 5] and idx[5].tolist() == [0, 1, 2, 3, 4]


def test_knn_tie_straddling_the_boundary() -> None:
    # 1-D: similarities to the query [1] are the values themselves.
    gallery = np.array([[2], [3], [2], [5], [2], [3]], dtype=np.float32)
    query = np.array([[1]], dtype=np.float32)
    # Full order: 3 (5), 1 (3), 5 (3), 0 (2), 2 (2), 4 (2)
    assert knn(query, gallery, k=1)[1].tolist() == [[3]]
    assert knn(query, gallery, k=2)[1].tolist() == [[3, 1]]  # tie 1/5 straddles k=2 -> 1
    assert knn(query, gallery, k=4)[1].tolist() == [[3, 1, 5, 0]]  # tie 0/2/4 straddles k=4 -> 0
    assert knn(query, gallery, k=5)[1].tolist() == [[3, 1, 5, 0, 2]]
    assert knn(query, gallery, k=6)[0].tolist() == [[5, 3, 3, 2, 2, 2]]


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_matches_stable_argsort_for_every_k(exclude_self: bool) -> None:
    rng = np.random.default_rng(3)
    gallery = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)  # 27 distinct vectors: many exact ties
    queries = gallery if exclude_self else rng.integers(-2, 3, size=(15, 3)).astype(np.float32)
    sims = queries.astype(np.float64) @ gallery.T.astype(np.float64)  # (Q, N) exact
    expected = []
    for i, row in enumerate(sims):
        order = np.argsort(-row, kind="stable")
        expected.append(order[order != i] if exclude_self else order)
    expected = np.stack(expected)  # (Q, N or N-1)
    for k in range(1, expected.shape[1] + 1):
        got_sims, got_idx = knn(queries, gallery, k, exclude_self=exclude_self, chunk_size=6)
        np.testing.assert_array_equal(got_idx, expected[:, :k], err_msg=f"k={k}")
        np.testing.assert_array_equal(got_sims, np.take_along_axis(sims, expected[:, :k], 1).astype(np.float32))


def test_knn_errors() -> None:
    g = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="positive integer"):
        knn(g, g, k=0)
    with pytest.raises(ValueError, match="only 2 gallery items"):
        knn(g, g, k=3, exclude_self=True)
    with pytest.raises(ValueError, match="gallery-aligned"):
        knn(g[:2], g, k=1, exclude_self=True)
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn(g[:, :2], g, k=1)
    with pytest.raises(ValueError, match="chunk_size"):
        knn(g, g, k=1, chunk_size=0)
    with pytest.raises(ValueError, match="gallery contain NaN/inf at rows \\[1\\]"):
        knn(g, np.array([[0, 0, 1], [np.inf, 0, 0]], dtype=np.float32), k=1)


# --------------------------------------------------------------------------------------------------------------------
# 6. Errors
# --------------------------------------------------------------------------------------------------------------------


def test_nan_and_inf_rows_are_named() -> None:
    x = np.ones((8, 4), dtype=np.float32)
    x[3, 1] = np.nan
    x[6, 0] = -np.inf
    with pytest.raises(ValueError, match="embeddings contain NaN/inf at rows \\[3, 6\\]"):
        retrieval_metrics(x, [0, 0, 1, 1, 2, 2, 3, 3])


def test_input_errors() -> None:
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="length mismatch: 4 embeddings but 3 labels"):
        retrieval_metrics(x, [0, 0, 1])
    with pytest.raises(ValueError, match="no queries"):
        retrieval_metrics(x, ["a", "b", "c", "d"])  # all singletons
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.zeros((0, 4), dtype=np.float32), [])
    with pytest.raises(ValueError, match="positive integer"):
        retrieval_metrics(x, [0, 0, 1, 1], ks=(1, -2))
    with pytest.raises(ValueError, match="at least one K"):
        retrieval_metrics(x, [0, 0, 1, 1], ks=())
    with pytest.raises(ValueError, match="zero/overflowing norm at rows \\[2\\]"):
        retrieval_metrics(np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32), [0, 0, 1])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.ones(4, dtype=np.float32), [0, 0, 1, 1])


# --------------------------------------------------------------------------------------------------------------------
# 7. Doctests and bounded memory
# --------------------------------------------------------------------------------------------------------------------


def test_doctests() -> None:
    result = doctest.testmod(arcfold.retrieval.metrics, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4
    assert result.failed == 0
    result = doctest.testmod(arcfold.retrieval.exact_knn, optionflags=doctest.ELLIPSIS)  # knn's, moved there
    assert result.attempted >= 2
    assert result.failed == 0


@pytest.mark.slow
def test_memory_stays_bounded() -> None:
    # 20k x 64: the full (N, N) float32 similarity matrix would be 1.6 GB. With chunk_size=512 one block is 41 MB, so
    # the child's peak RSS must stay far below the full matrix (torch itself accounts for a few hundred MB).
    script = textwrap.dedent(
        """
        import numpy as np
        from arcfold.retrieval.metrics import retrieval_metrics
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2000, 20_000)
        x = (rng.normal(size=(2000, 64))[y] + rng.normal(size=(20_000, 64))).astype(np.float32)
        out = retrieval_metrics(x, y, chunk_size=512)
        assert 0.0 < out["map@r"] < 1.0
        # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would include the forked pytest
        # parent's memory; VmHWM belongs to this process's own address space (kB)
        print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    peak_mib = int(proc.stdout.split()[-1]) / 1024
    assert peak_mib < 1200, f"peak RSS {peak_mib:.0f} MiB"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        retrieval_metrics(HAND_X, HAND_Y, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x, y = clustered(6, 4)
    assert retrieval_metrics(x, y, device="cuda") == retrieval_metrics(x, y)
    got = retrieval_metrics(HAND_X, HAND_Y, ks=(1, 2, 3, 10), normalize=False, chunk_size=3, device="cuda")
    assert got == pytest.approx(HAND_EXPECTED, abs=1e-15)
    gallery = np.ones((6, 3), dtype=np.float32)
    assert knn(gallery, gallery, k=2, exclude_self=True, device="cuda")[1][:3].tolist() == [[1, 2], [0, 2], [0, 1]]
