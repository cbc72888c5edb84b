"""retrieval_metrics' symmetric path (self_topk, upper-triangle tiles) against its chunked path and the references.

The two paths must give the same numbers to the last digit: compared with ``==`` on continuous data (with and without
exact duplicate vectors under different labels, so the tie rule decides), and both against the brute-force reference
of test_metrics.py (exact fractions) on grid data, for tile sides that do not divide N, with singleton classes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arcfold.retrieval.metrics as metrics_module
from arcfold.retrieval.metrics import retrieval_metrics
from tests.retrieval.test_metrics import brute_force, clustered

KS = [1, 2, 4, 5, 8, 10]


def with_duplicates(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Append exact copies of a third of the rows, half of them under another label (ties the rule must break)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(y), size=len(y) // 3, replace=False)  # (m,)
    copy_y = y[src].copy()
    flip = rng.random(len(src)) < 0.5
    copy_y[flip] = rng.integers(0, y.max() + 1, int(flip.sum()))
    x2, y2 = np.concatenate([x, x[src]]), np.concatenate([y, copy_y])
    perm = rng.permutation(len(y2))  # duplicates on both sides of each other, in other tiles
    return np.ascontiguousarray(x2[perm]), y2[perm]


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("block", [65, 100, 1024])  # 65: edge tiles of 3-4 items
def test_symmetric_equals_chunked_to_the_last_digit(
    monkeypatch: pytest.MonkeyPatch, duplicates: bool, block: int
) -> None:
    x, y = clustered(3, n_singletons=5, n_classes=40, dim=24)  # ~650 items, classes of 1..31
    if duplicates:
        x, y = with_duplicates(x, y, seed=block)
    assert len(y) % block != 0 or block > len(y)
    monkeypatch.setattr(metrics_module, "_SYMMETRIC_BLOCK", block)
    new = retrieval_metrics(x, y, ks=KS, method="symmetric")
    old = retrieval_metrics(x, y, ks=KS, method="chunked")
    assert new == old  # every key, exactly
    assert new["n_queries"] < new["n_items"]  # singletons are distractors, not queries
    assert 0.2 < new["map@r"] < 0.95


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block", [5, 16, 1024])
def test_symmetric_matches_brute_force_with_many_exact_ties(
    monkeypatch: pytest.MonkeyPatch, seed: int, block: int
) -> None:
    # {-1, 0, 1}^4: 81 distinct vectors for 150 items, so most rankings are decided by the tie rule (exact in float32).
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(150, 4)).astype(np.float32)
    y = rng.integers(0, 6, size=150)
    y[:3] = [100, 101, 102]  # singletons
    ks = [1, 2, 3, 5, 10, 200]  # 200 > N - 1: all 149 others
    expected = brute_force(x, y, ks)
    monkeypatch.setattr(metrics_module, "_SYMMETRIC_BLOCK", block)
    got = retrieval_metrics(x, y, ks=ks, normalize=False, method="symmetric")
    assert got == retrieval_metrics(x, y, ks=ks, normalize=False, method="chunked", chunk_size=7)
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key
    assert got["n_queries"] == 147


def test_symmetric_matches_brute_force_on_grid_data_with_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = clustered(6, 4)
    x, y = with_duplicates(np.round(x * 1024) / 1024, y, seed=0)  # 2^-10 grid: float32 products exact
    expected = brute_force(x, y, KS)
    monkeypatch.setattr(metrics_module, "_SYMMETRIC_BLOCK", 100)
    got = retrieval_metrics(x.astype(np.float32), y, ks=KS, normalize=False, method="symmetric")
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key


def test_auto_takes_the_symmetric_path_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = metrics_module.self_topk
    monkeypatch.setattr(metrics_module, "self_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, y = clustered(7, 3)
    full = retrieval_metrics(x, y)
    assert len(calls) == 1
    retrieval_metrics(x, y, query_subset=np.arange(0, len(y), 2))  # a sample: chunked
    monkeypatch.setattr(metrics_module, "_HEAP_BYTES", 0)  # heaps over budget: chunked
    assert retrieval_metrics(x, y) == full
    assert len(calls) == 1


def test_method_errors() -> None:
    x, y = clustered(7, 3)
    with pytest.raises(ValueError, match="unknown method"):
        retrieval_metrics(x, y, method="square")
    with pytest.raises(ValueError, match="no query_subset"):
        retrieval_metrics(x, y, method="symmetric", query_subset=[0, 1, 2])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            retrieval_metrics(x, y, method="symmetric", device="cuda")
