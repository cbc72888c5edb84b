"""Property tests (hypothesis) of the retrieval metrics: monotone in K, equal to a brute-force reference, invariant to
the order of the gallery, MAP@R within [0, 1] and 1 for separated clusters.

Data are drawn as a seed plus sizes, then made with NumPy: values on a 2^-6 grid in at most 8 dimensions, so every
inner product is exact in float32 and float64 alike, in any summation order. Exact ties then happen (and are
decided by the documented rule, lower gallery index first); the permutation property holds only where no tie
decides a ranking, and says so with ``assume``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from arcfold.retrieval.metrics import map_at_r, recall_at_k, retrieval_metrics

from .test_metrics import brute_force

# no example database: nothing is written into the working tree
SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled_sets(draw, min_items: int = 3, max_items: int = 40):
    """(x, labels): x (N, D) float32 on a 2^-6 grid, labels (N,) ints with at least one class of 2+ items."""
    n = draw(st.integers(min_items, max_items))
    d = draw(st.integers(1, 8))
    n_classes = draw(st.integers(1, max(1, n // 2)))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.sampled_from([0.3, 1.0, 3.0]))  # within-class noise: from separable to hopeless
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    labels[:2] = labels[0]  # at least one query
    centres = rng.normal(size=(n_classes, d))
    x = centres[labels] + spread * rng.normal(size=(n, d))
    x = np.clip(np.round(x * 64), -256, 256) / 64  # |x| <= 4 on a 2^-6 grid: exact dot products
    return x.astype(np.float32), labels


def _ties_decide_a_ranking(x: np.ndarray) -> bool:
    """True if some query has two other items at exactly the same similarity (then gallery order decides)."""
    sims = x.astype(np.float64) @ x.astype(np.float64).T  # exact: grid values
    np.fill_diagonal(sims, np.nan)
    for row in sims:
        values = row[~np.isnan(row)]
        if len(np.unique(values)) < len(values):
            return True
    return False


@SETTINGS
@given(labelled_sets())
def test_recall_at_k_is_non_decreasing_in_k_and_reaches_1(data):
    x, labels = data
    n = len(labels)
    ks = list(range(1, n + 2))  # past N - 1: the whole gallery
    got = retrieval_metrics(x, labels, ks=ks, normalize=False)
    recalls = [got[f"recall@{k}"] for k in ks]
    assert all(a <= b for a, b in zip(recalls, recalls[1:], strict=False))
    assert recalls[n - 2] == 1.0  # K = N - 1 retrieves every other item, a same-class one among them
    assert 0.0 <= got["map@r"] <= 1.0


@SETTINGS
@given(labelled_sets(), st.sampled_from([None, 1, 5]))
def test_equal_to_the_brute_force_reference(data, chunk_size):
    x, labels = data
    ks = [1, 2, 3, 5, 10]
    expected = brute_force(x, labels, ks)  # exact fractions, full stable sort, ties to the lower index
    got = retrieval_metrics(x, labels, ks=ks, normalize=False, chunk_size=chunk_size)
    for key, value in expected.items():
        assert abs(got[key] - float(value)) < 1e-12, key


@SETTINGS
@given(labelled_sets(), st.integers(0, 2**32 - 1))
def test_invariant_to_the_order_of_the_gallery(data, perm_seed):
    x, labels = data
    assume(not _ties_decide_a_ranking(x))  # with exact ties the documented rule makes order matter, by design
    perm = np.random.default_rng(perm_seed).permutation(len(labels))
    permuted = retrieval_metrics(x[perm], labels[perm], normalize=False)
    original = retrieval_metrics(x, labels, normalize=False)
    # the same neighbours and hits; only the mean of the per-query AP@R is summed in another order
    assert permuted == pytest.approx(original, abs=1e-12, rel=0)


@SETTINGS
@given(
    st.integers(1, 8),  # classes
    st.lists(st.integers(2, 6), min_size=8, max_size=8),  # images per class
    st.integers(0, 2**32 - 1),
)
def test_map_at_r_is_1_for_perfectly_separated_clusters(n_classes, sizes, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), sizes[:n_classes])
    # class c on axis c, jittered by less than the gap between axes: same-class cosines ~1, others ~0
    x = np.eye(n_classes)[labels] + 0.05 * rng.uniform(-1, 1, (len(labels), n_classes))
    got = retrieval_metrics(x, labels)
    assert got["map@r"] == 1.0 and got["recall@1"] == 1.0


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_pure_functions_on_random_neighbour_tables(n_queries, k, seed):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 4, (n_queries, k))  # neighbour labels, best first
    query = rng.integers(0, 4, n_queries)
    recalls = recall_at_k(table, query, ks=range(1, k + 1))
    assert all(recalls[j] <= recalls[j + 1] for j in range(1, k))
    r = rng.integers(1, k + 1, n_queries)
    value = map_at_r(table, query, r)
    assert 0.0 <= value <= 1.0
    assert map_at_r(np.repeat(query[:, None], k, axis=1), query, r) == 1.0  # every neighbour relevant
