"""Tests for arcfold.search: faiss vs torch, exclude_self, chunking, approximate recall, -1 filling, errors, GPU."""

from __future__ import annotations

import doctest
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arcfold.retrieval.search
from arcfold.retrieval.metrics import knn
from arcfold.retrieval.search import (
    IVFPQ_K_FACTOR,
    build_index,
    default_nlist,
    default_nprobe,
    faiss_available,
    faiss_gpu_available,
    search,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def random_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return _unit(rng.normal(size=(300, 32))), _unit(rng.normal(size=(1000, 32)))  # queries, gallery


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """20k x 64 gallery and 500 queries drawn around 200 random centres (noise as large as the centres)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, 64))
    x = _unit(centres[rng.integers(0, 200, 20_500)] + rng.normal(size=(20_500, 64)))
    return x[20_000:], x[:20_000]


def _recall_at(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours that the approximate row also holds."""
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx_idx, exact_idx, strict=True)]))


# --------------------------------------------------------------------------------------------------------------------
# exact search: backends agree, exclude_self, chunking, ties


@needs_faiss
@pytest.mark.parametrize("exclude_self", [False, True])
def test_faiss_and_torch_find_the_same_neighbours(random_data, exclude_self: bool) -> None:
    queries, gallery = random_data
    if exclude_self:
        queries = gallery
    f_sims, f_idx = search(queries, gallery, 10, backend="faiss", device="cpu", exclude_self=exclude_self)
    t_sims, t_idx = search(queries, gallery, 10, backend="torch", device="cpu", exclude_self=exclude_self)
    assert f_idx.shape == (len(queries), 10) and f_idx.dtype == np.int64 and f_sims.dtype == np.float32
    np.testing.assert_array_equal(f_idx, t_idx)
    np.testing.assert_allclose(f_sims, t_sims, atol=1e-5)
    # Best first, and the similarities are the inner products of the returned pairs.
    assert (np.diff(f_sims, axis=1) <= 0).all()
    np.testing.assert_allclose(f_sims, np.einsum("qd,qkd->qk", queries, gallery[f_idx]), atol=1e-5)


def test_torch_backend_equals_metrics_knn_with_ties() -> None:
    # Integer-valued vectors with duplicates: exact ties everywhere, including across the k-th position.
    rng = np.random.default_rng(1)
    gallery = rng.integers(-1, 2, size=(60, 4)).astype(np.float32)
    gallery[10:20] = gallery[0]  # 11 copies of item 0
    for exclude_self in (False, True):
        expected = knn(gallery, gallery, 5, exclude_self=exclude_self)
        got = search(gallery, gallery, 5, backend="torch", exclude_self=exclude_self, chunk_size=7)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
    # Item 0 is excluded from its own row but its duplicates (3 and 5) are not; ties go to the lower index first.
    small = np.array([[1, 0], [0, 1], [0.6, 0.8], [1, 0], [-1, 0], [1, 0]], dtype=np.float32)
    for backend in ["torch"] + (["faiss"] if faiss_available() else []):
        assert search(small, small, 3, backend=backend, exclude_self=True)[1][0].tolist() == [3, 5, 2]


@needs_faiss
def test_exclude_self_drops_only_the_query(random_data) -> None:
    _, gallery = random_data
    gallery = gallery.copy()
    gallery[5] = gallery[4]  # a duplicate pair: each is the other's best neighbour at similarity 1
    sims, idx = search(gallery, gallery, 8, exclude_self=True, backend="faiss", device="cpu")
    assert not (idx == np.arange(len(gallery))[:, None]).any()
    assert idx[4, 0] == 5 and idx[5, 0] == 4 and sims[4, 0] == pytest.approx(1.0, abs=1e-6)
    # Elsewhere the result is the k + 1 search with the query's own index removed.
    full_sims, full_idx = search(gallery, gallery, 9, backend="faiss", device="cpu")
    for row in (0, 17, 999):
        keep = full_idx[row] != row
        np.testing.assert_array_equal(idx[row], full_idx[row][keep][:8])
        np.testing.assert_array_equal(sims[row], full_sims[row][keep][:8])


@pytest.mark.parametrize("backend", [pytest.param("faiss", marks=needs_faiss), "torch"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_chunked_equals_unchunked(random_data, backend: str, exclude_self: bool) -> None:
    queries, gallery = random_data
    if exclude_self:
        queries = gallery
    whole = search(queries, gallery, 6, backend=backend, device="cpu", exclude_self=exclude_self)
    chunked = search(
        queries, gallery, 6, backend=backend, device="cpu", exclude_self=exclude_self, chunk_size=37, progress=True
    )
    np.testing.assert_array_equal(chunked[1], whole[1])
    # The matmul may round differently for another block shape (1 ulp); faiss searches rows independently.
    np.testing.assert_allclose(chunked[0], whole[0], rtol=0, atol=1e-6)


def test_accepts_torch_tensors_and_float64(random_data) -> None:
    queries, gallery = random_data
    expected = search(queries, gallery, 3, backend="torch")
    got = search(torch.from_numpy(queries), gallery.astype(np.float64), 3, backend="torch")
    np.testing.assert_array_equal(got[1], expected[1])


# --------------------------------------------------------------------------------------------------------------------
# approximate indexes


@needs_faiss
def test_build_index_kinds_and_defaults() -> None:
    import faiss

    gallery = _unit(np.random.default_rng(2).normal(size=(4000, 16)))
    assert isinstance(build_index(gallery, index="exact"), faiss.IndexFlatIP)
    ivf = build_index(gallery, index="ivf", nprobe=8)
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    assert ivf.nlist == default_nlist(4000) == 102  # 4 * sqrt(4000) = 253, but 4000 // 39 = 102
    assert ivf.nprobe == 8 and ivf.ntotal == 4000
    assert build_index(gallery, index="ivf", target_recall=None).nprobe == default_nprobe(102) == 26  # a quarter
    assert default_nprobe(1265) == 317 and default_nprobe(40) == 16 and default_nprobe(8) == 8
    assert build_index(gallery, index="ivf", nlist=4, nprobe=16).nprobe == 4  # nprobe is capped at nlist
    hnsw = build_index(gallery, index="hnsw", hnsw_m=16, ef_search=77)
    assert isinstance(hnsw, faiss.IndexHNSWFlat) and hnsw.metric_type == faiss.METRIC_INNER_PRODUCT
    assert hnsw.hnsw.efSearch == 77 and hnsw.ntotal == 4000
    assert default_nlist(20_000) == 512 and default_nlist(10**6) == 4000 and default_nlist(10) == 1
    ivfpq = build_index(gallery, index="ivfpq", nprobe=8)  # IVF lists of 4-bit PQ codes, re-scored on the floats
    assert isinstance(ivfpq, faiss.IndexRefineFlat) and ivfpq.k_factor == IVFPQ_K_FACTOR and ivfpq.ntotal == 4000
    base = faiss.downcast_index(ivfpq.base_index)
    assert isinstance(base, faiss.IndexIVFPQFastScan) and base.metric_type == faiss.METRIC_INNER_PRODUCT
    assert (base.nlist, base.nprobe, base.pq.M, base.pq.nbits) == (102, 8, 8, 4)  # the nlist of ivf; D / 2 codes


@needs_faiss
def test_ivfpq_on_a_gallery_too_small_to_train_its_codes_searches_exactly(caplog) -> None:
    import faiss

    gallery = _unit(np.random.default_rng(3).normal(size=(600, 8)))
    with caplog.at_level(logging.WARNING, logger="arcfold.retrieval.search"):
        index = build_index(gallery, index="ivfpq", target_recall=None)
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == 600
    want = "index='ivfpq' needs 624 gallery rows to train its codes on, got 600: exact search instead"
    assert caplog.messages == [want]
    got = search(gallery[:20], gallery, 5, index="ivfpq", device="cpu")
    want = search(gallery[:20], gallery, 5, index="exact", device="cpu")
    np.testing.assert_array_equal(got[1], want[1])


@needs_faiss
@pytest.mark.parametrize("index", ["hnsw", "ivfpq"])
def test_cpu_only_kinds_refuse_a_gpu_build(index) -> None:
    with pytest.raises(ValueError, match=f"faiss has no GPU {index} index"):
        build_index(_unit(np.random.default_rng(4).normal(size=(700, 8))), index=index, gpu=True)


@needs_faiss
@pytest.mark.parametrize("index", ["ivf", "hnsw", "ivfpq"])
def test_approximate_recall_at_10(clustered, index: str) -> None:
    queries, gallery = clustered
    _, exact_idx = search(queries, gallery, 10, backend="faiss", device="cpu")
    sims, idx = search(queries, gallery, 10, index=index, backend="faiss", device="cpu")
    assert _recall_at(idx, exact_idx) >= 0.95
    assert (idx >= 0).all() and (np.diff(sims, axis=1) <= 0).all()
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", queries, gallery[idx]), atol=1e-5)


@needs_faiss
def test_ivf_defaults_reach_recall_on_near_isotropic_clusters() -> None:
    """Classes of 1-15 items, noise of norm 0.8 around unit centres in 128-D, as in bench_search: IVF's hard case.

    (Harder data, e.g. Poisson class sizes at the same noise, gives ~0.92 here: the default is a measured point.)
    """
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(10_500), rng.integers(1, 16, size=10_500))[:10_500]  # class sizes uniform on 1..15
    centres = _unit(rng.normal(size=(labels.max() + 1, 128)))
    x = _unit(centres[labels] + 0.8 / np.sqrt(128) * rng.normal(size=(10_500, 128)))[rng.permutation(10_500)]
    queries, gallery = x[10_000:], x[:10_000]
    _, exact_idx = search(queries, gallery, 10, backend="faiss", device="cpu")
    _, idx = search(queries, gallery, 10, index="ivf", backend="faiss", device="cpu")
    assert _recall_at(idx, exact_idx) >= 0.95
    _, idx16 = search(queries, gallery, 10, index="ivf", nprobe=16, backend="faiss", device="cpu")
    assert _recall_at(idx16, exact_idx) < 0.95  # the former default: the data is hard enough to tell them apart


@needs_faiss
def test_missing_ids_are_filled_by_an_exact_search(caplog) -> None:
    # 50 lists of ~40 items, one probed, 100 neighbours wanted: every row comes back with -1 ids from faiss.
    rng = np.random.default_rng(3)
    gallery = _unit(rng.normal(size=(2000, 16)))
    queries = _unit(rng.normal(size=(40, 16)))
    with caplog.at_level(logging.WARNING, logger="arcfold.retrieval.search"):
        sims, idx = search(queries, gallery, 100, index="ivf", nlist=50, nprobe=1, backend="faiss", device="cpu")
    assert "fewer than 100 neighbours for 40 queries" in caplog.text
    exact_sims, exact_idx = search(queries, gallery, 100, backend="faiss", device="cpu")
    np.testing.assert_array_equal(idx, exact_idx)
    np.testing.assert_allclose(sims, exact_sims, atol=1e-6)
    # With exclude_self the filled rows still drop the query itself.
    _, self_idx = search(gallery, gallery, 100, index="ivf", nlist=50, nprobe=1, exclude_self=True, device="cpu")
    assert (self_idx >= 0).all() and not (self_idx == np.arange(2000)[:, None]).any()


def test_auto_backend_without_faiss_falls_back_to_exact_torch(random_data, monkeypatch, caplog) -> None:
    queries, gallery = random_data
    monkeypatch.setattr(arcfold.retrieval.search, "faiss_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="arcfold.retrieval.search"):
        sims, idx = search(queries, gallery, 5, index="hnsw")
    assert "falls back to exact search" in caplog.text
    np.testing.assert_array_equal(idx, knn(queries, gallery, 5)[1])
    with pytest.raises(ValueError, match="faiss cannot be imported"):
        search(queries, gallery, 5, backend="faiss")


# --------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 1001}, r"k=1001 but only 1000 gallery items"),
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 2.0}, "k must be a positive integer"),
        ({"k": 3, "index": "ivf", "backend": "torch"}, "torch backend is exact only"),
        ({"k": 3, "index": "annoy"}, "unknown index 'annoy'"),
        ({"k": 3, "backend": "jax"}, "unknown backend 'jax'"),
        ({"k": 3, "device": "tpu"}, "unknown device 'tpu'"),
        ({"k": 3, "exclude_self": True}, "gallery-aligned"),
        ({"k": 3, "chunk_size": 0}, "chunk_size must be a positive integer"),
    ],
)
def test_argument_errors(random_data, kwargs: dict, message: str) -> None:
    queries, gallery = random_data
    with pytest.raises(ValueError, match=message):
        search(queries, gallery, **kwargs)


def test_input_errors(random_data) -> None:
    queries, gallery = random_data
    with pytest.raises(ValueError, match="k=1000 but only 999 gallery items"):
        search(gallery, gallery, 1000, exclude_self=True)
    with pytest.raises(ValueError, match="dimension mismatch: queries have D=16, gallery has D=32"):
        search(queries[:, :16], gallery, 3)
    bad = queries.copy()
    bad[[3, 7], 0] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"queries contain NaN/inf at rows \[3, 7\]"):
        search(bad, gallery, 3)
    with pytest.raises(ValueError, match="must be 2-D"):
        search(queries[0], gallery, 3)
    with pytest.raises(ValueError, match="gallery is empty"):
        search(queries, gallery[:0], 3)
    with pytest.raises(ValueError, match="real numeric"):
        search(queries.astype(str), gallery, 3)


@pytest.mark.skipif(faiss_gpu_available(), reason="checks the error raised without GPU faiss")
def test_cuda_without_gpu_faiss_is_an_error(random_data) -> None:
    queries, gallery = random_data
    with pytest.raises(ValueError, match="device='cuda'"):
        search(queries, gallery, 3, device="cuda")


# --------------------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss with GPU support and a CUDA device")
def test_faiss_gpu_matches_cpu(random_data, clustered) -> None:
    queries, gallery = random_data
    cpu = search(queries, gallery, 10, device="cpu")
    gpu = search(queries, gallery, 10, device="cuda")
    np.testing.assert_array_equal(gpu[1], cpu[1])
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-4)
    queries, gallery = clustered
    _, exact_idx = search(queries, gallery, 10, device="cpu")
    _, ivf_idx = search(queries, gallery, 10, index="ivf", device="cuda")
    assert _recall_at(ivf_idx, exact_idx) >= 0.95
    for index in ("hnsw", "ivfpq"):
        with pytest.raises(ValueError, match=f"no GPU {index} index"):
            search(queries, gallery, 10, index=index, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_cuda_matches_cpu(random_data) -> None:
    queries, gallery = random_data
    cpu = search(queries, gallery, 10, backend="torch", device="cpu")
    gpu = search(queries, gallery, 10, backend="torch", device="cuda")
    np.testing.assert_array_equal(gpu[1], cpu[1])
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-5)


def test_doctests() -> None:
    result = doctest.testmod(arcfold.retrieval.search, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------------------------------
# logging: faiss's loader stays quiet below WARNING


@needs_faiss
@pytest.mark.parametrize(
    "configure", ["from arcfold.logs import setup_logging; setup_logging()", "logging.basicConfig(level=logging.INFO)"]
)
def test_faiss_loader_info_lines_are_silenced_but_its_warnings_show(configure: str) -> None:
    """A stage (setup_logging) or a notebook that logs at INFO itself: importing search and searching with faiss
    prints none of faiss's six loader lines (one a ModuleNotFoundError), while a faiss.loader warning still shows."""
    code = f"""
import logging
{configure}
import numpy as np
from arcfold.retrieval.search import search
x = np.eye(4, dtype=np.float32)
print(search(x, x, 1, backend="faiss", device="cpu")[1].ravel().tolist())
logging.getLogger("faiss.loader").warning("a real faiss warning")
"""
    env = {**os.environ, "PYTHONPATH": str(Path(arcfold.retrieval.search.__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True)
    assert out.stdout.strip() == "[0, 1, 2, 3]"
    assert "a real faiss warning" in out.stderr
    assert [line for line in out.stderr.splitlines() if "faiss.loader" in line and "WARNING" not in line] == []
    assert "ModuleNotFoundError" not in out.stderr
