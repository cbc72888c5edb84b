"""Neighbour search for inference: inner-product k-NN over a gallery, exact or approximate, faiss or torch.

Definitions
-----------
Similarity
    The inner product of float32 vectors. Callers pass L2-normalised embeddings, so it is the cosine similarity;
    nothing is normalised here. Results are ``(sims, idx)``: (Q, k) float32 similarities and (Q, k) int64 gallery
    indices, best first.

Index kinds (``INDEX_KINDS``)
    ``"exact"``
        Brute force: faiss ``IndexFlatIP`` or :func:`arcfold.retrieval.exact_knn.knn` (torch matmul).
    ``"ivf"``
        faiss ``IndexIVFFlat`` with an inner-product coarse quantizer. ``nlist`` defaults to ``4 * sqrt(N)``, lowered
        so that every list gets at least 39 training points (faiss's k-means warns below that), and at least 1. It is
        trained on the gallery itself, or on a seeded sample of ``256 * nlist`` rows when the gallery is larger (faiss
        would subsample that much anyway); with a ``target_recall`` sweep, N and the gallery exclude the held-out rows.
        Vectors are stored uncompressed, so returned similarities are exact; only the candidate set is approximate.
        ``nprobe`` lists are visited per query (at most ``nlist``): the value chosen for ``target_recall`` (below)
        unless ``nprobe`` is given; with ``target_recall=None`` a quarter of them (:func:`default_nprobe`, at least
        16), which scans about a quarter of the gallery.
    ``"hnsw"``
        faiss ``IndexHNSWFlat(D, hnsw_m, METRIC_INNER_PRODUCT)`` searched with ``efSearch = max(ef_search, k)``,
        ``ef_search`` being the value chosen for ``target_recall`` unless given (128 with ``target_recall=None``).
        Always built and searched on the CPU: faiss has no GPU HNSW.
    ``"ivfpq"``
        faiss ``IVF{nlist},PQ{D/2}x4fs,RFlat`` (``index_factory``): the lists of ``"ivf"`` (same ``nlist``, training
        sample and ``nprobe`` rules) hold 4-bit product-quantisation codes of 2 dimensions each, scanned with SIMD
        "fast-scan" kernels (André et al., faiss's ``IndexIVFPQFastScan``); the best ``k * IVFPQ_K_FACTOR`` candidates
        are then re-scored on the float32 vectors (``IndexRefineFlat``), so returned similarities are exact, as for
        ``"ivf"``. A plain IVF scan reads every visited vector from memory for every query (memory-bound: at 1M x 128
        and nprobe ~22 % of the lists it was 2.3x slower than exact BLAS search); the codes are 16x smaller (D/2
        bytes), so the same lists are scanned several times faster. Memory: the float32 gallery plus D/2 bytes per
        vector. CPU only: faiss has no GPU fast-scan index. A gallery of fewer than 624 rows (16 codes x 39 training
        points) is searched exactly, with a warning.

Search knob (``target_recall``, default 0.95)
    When an IVF or HNSW index is built without an explicit ``nprobe`` / ``ef_search``, the knob is the smallest value
    of a short doubling sweep whose recall@min(k, 10) against exact search reaches ``target_recall``, measured on
    up to 2000 gallery rows held out of the index while it is tuned (then added): see
    :mod:`arcfold.retrieval.index_tuning`, which also saves and loads indexes with their knob. The choice is logged
    and, when ``report`` is a list, appended to it (:class:`arcfold.retrieval.index_tuning.IndexTuning` as a dict).

Backends and devices
    ``backend="auto"`` uses faiss when it can be imported, else torch. The torch backend is exact only; asking it
    for an approximate index is an error, while ``backend="auto"`` without faiss falls back to exact search with a
    logged warning. ``device="auto"`` puts exact and IVF faiss indexes on the GPU (``StandardGpuResources`` +
    ``index_cpu_to_gpu``) when :func:`faiss_gpu_available` (HNSW and IVF-PQ stay on the CPU: ``CPU_ONLY_KINDS``),
    and the torch backend on CUDA when torch sees a GPU; ``device="cuda"`` without them, or with a CPU-only kind,
    is an error. Faiss GPU selection is limited to ``k <= 2048`` (``k + 1`` with
    ``exclude_self``): a larger k runs on the CPU under ``device="auto"`` and is an error under ``device="cuda"``.

Ranking and ties
    Each row is sorted by descending similarity, then ascending gallery index. The torch backend follows
    :func:`arcfold.retrieval.exact_knn.knn` exactly, including which of several tied items make the top k. Faiss returns
    the right neighbours on data without ties; its rows are re-sorted by the same rule, but at a tie straddling the k-th
    position faiss may keep a higher index than the rule wants (exact ties need duplicate or integer-valued vectors).

Missing results (-1 ids)
    An approximate index returns id -1 when the visited lists / graph hold fewer than k items. Such rows are never
    returned as they are: each row with a -1 is recomputed by an exact brute-force search (``faiss.knn``) of that
    row alone, so the result always has k valid neighbours, and the number of such rows is logged as a warning.

``exclude_self``
    The queries are gallery-aligned (Q == N, query i *is* gallery item i). Each query gets k neighbours other than
    index i: k + 1 are searched and i is dropped; when i is not among them (duplicates of i tie with it and have lower
    indices, or an approximate index missed it) the last one is dropped. Duplicates of i are kept, as in
    :func:`arcfold.retrieval.exact_knn.knn`.

Memory
    Queries are searched in chunks of ``chunk_size`` rows (faiss default 16384: the (chunk, k) results plus faiss's
    own blocked scratch stay bounded; torch default: a ~256 MiB float32 (chunk, N) similarity block, as in
    :mod:`arcfold.metrics`). The index holds a float32 copy of the gallery (plus the graph for HNSW).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from arcfold.logs import quiet_loaders
from arcfold.retrieval.exact_knn import check_knn_request, knn
from arcfold.retrieval.index_tuning import (
    DEFAULT_EF_SEARCH,
    KNOBS,
    MAX_EF_SEARCH,
    MAX_TUNE_K,
    IndexTuning,
    add_and_tune,
    check_target_recall,
    held_out_rows,
    hnsw_params,
    set_knob,
)

log = logging.getLogger(__name__)
quiet_loaders()  # before faiss is first imported (below, where it is used): its loader's INFO lines are noise

__all__ = [
    "BACKENDS",
    "CPU_ONLY_KINDS",
    "DEVICES",
    "INDEX_KINDS",
    "IVFPQ_K_FACTOR",
    "IVF_KINDS",
    "build_index",
    "default_nlist",
    "default_nprobe",
    "faiss_available",
    "faiss_gpu_available",
    "search",
]

INDEX_KINDS: tuple[str, ...] = ("exact", "ivf", "hnsw", "ivfpq")
CPU_ONLY_KINDS: tuple[str, ...] = ("hnsw", "ivfpq")  # faiss has no GPU HNSW and no GPU fast-scan PQ
IVF_KINDS: tuple[str, ...] = ("ivf", "ivfpq")  # knob: nprobe
BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")

# Default query chunk for faiss; faiss blocks its own scratch memory internally, so only (chunk, k) results grow.
_FAISS_CHUNK = 16384
# Budget for one float32 (chunk, N) similarity block on the torch backend (same budget as arcfold.metrics).
_TORCH_CHUNK_BYTES = 256 * 2**20
# faiss's k-means warns when a centroid has fewer training points than this.
_MIN_POINTS_PER_LIST = 39
# faiss's k-means subsamples to this many points per centroid; we sample ourselves, with a seed.
_MAX_POINTS_PER_LIST = 256
# Largest k faiss GPU indexes can select (GPU_MAX_SELECTION_K).
_GPU_MAX_K = 2048
_TRAIN_SEED = 0
# ivfpq: candidates re-scored exactly per result (k * this many). Recall@10 at 1M x 128 (bench_search's vectors, nprobe
# 1024 / 1536 of 4096 lists): 0.949 / 0.973 at 16, 0.953 / 0.979 at 64, which took 1.3 / 1.1 x the time of 16; the
# knob is nprobe.
IVFPQ_K_FACTOR = 32
# ivfpq: its 4-bit codes are 16 k-means centroids per sub-vector, and faiss wants 39 training points per centroid;
# a smaller gallery is searched exactly (a warning says so), which at this size costs nothing.
_IVFPQ_MIN_ROWS = 16 * _MIN_POINTS_PER_LIST
_MAX_ROWS_IN_MESSAGE = 10


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    """Whether faiss was built with GPU support and sees at least one CUDA device."""
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def as_matrix(x: Any, name: str) -> np.ndarray:
    """Validate a (n, D) real, finite, non-empty matrix; return it as C-contiguous float32 (faiss needs that)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, D), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)  # (n,)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_MESSAGE])
        more = f", ... ({len(rows)} rows in all)" if len(rows) > _MAX_ROWS_IN_MESSAGE else ""
        raise ValueError(f"{name} contain NaN/inf at rows [{shown}{more}]")
    return arr


def _check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
    return value


def _resolve_backend(backend: str, index: str) -> tuple[str, str]:
    """Return (backend, index) after the auto rules of the module docstring."""
    _check_choice(backend, "backend", BACKENDS)
    _check_choice(index, "index", INDEX_KINDS)
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
        if backend == "torch" and index != "exact":
            log.warning("faiss is not installed: index=%r falls back to exact search with torch", index)
            index = "exact"
    elif backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' but faiss cannot be imported (pip install faiss-cpu or faiss-gpu)")
    elif backend == "torch" and index != "exact":
        raise ValueError(f"the torch backend is exact only; index={index!r} needs backend='faiss' (or 'auto')")
    return backend, index


def _resolve_faiss_gpu(device: str, index: str, k_search: int) -> bool:
    """Whether a faiss search of ``k_search`` neighbours with ``index`` runs on the GPU."""
    _check_choice(device, "device", DEVICES)
    if device == "cpu":
        return False
    if device == "cuda":
        if not faiss_gpu_available():
            raise ValueError("device='cuda' but faiss has no GPU support or sees no CUDA device (install faiss-gpu)")
        if index in CPU_ONLY_KINDS:
            raise ValueError(f"faiss has no GPU {index} index; use device='cpu' (or 'auto') with index={index!r}")
        if k_search > _GPU_MAX_K:
            raise ValueError(f"faiss GPU search is limited to k <= {_GPU_MAX_K}, got {k_search}; use device='cpu'")
        return True
    return faiss_gpu_available() and index not in CPU_ONLY_KINDS and k_search <= _GPU_MAX_K


def _resolve_torch_device(device: str) -> str:
    _check_choice(device, "device", DEVICES)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    return device


# --------------------------------------------------------------------------------------------------------------------
# faiss indexes
# --------------------------------------------------------------------------------------------------------------------


def default_nlist(n_gallery: int) -> int:
    """``4 * sqrt(N)`` inverted lists, lowered so each list has >= 39 training points, and at least 1.

    >>> default_nlist(20_000), default_nlist(100_000), default_nlist(50)
    (512, 1265, 1)
    """
    return max(1, min(int(round(4 * math.sqrt(n_gallery))), n_gallery // _MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """A quarter of the ``nlist`` inverted lists, at least 16 (and at most ``nlist``): recall@10 >= 0.95 by default.

    Measured on the near-isotropic clustered vectors of ``benchmarks/bench_search.py`` (noise 0.8) with
    :func:`default_nlist` lists: nlist/4 gave 0.965 at 10k (64 of 256), 0.962 at 100k (317 of 1265) and 0.960 at 1M
    (1000 of 4000); nlist/5 gave 0.953 and 0.949.

    >>> default_nprobe(1265), default_nprobe(256), default_nprobe(40), default_nprobe(8)
    (317, 64, 16, 8)
    """
    return min(nlist, max(16, math.ceil(nlist / 4)))


def build_index(
    gallery: np.ndarray | torch.Tensor,
    *,
    index: str = "exact",
    gpu: bool = False,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int | None = None,
    target_recall: float | None = 0.95,
    k: int = MAX_TUNE_K,
    report: list[dict[str, Any]] | None = None,
) -> Any:
    """A faiss inner-product index of kind ``index`` holding ``gallery`` (N, D) float32 (see the module docstring).

    ``gpu=True`` moves exact/IVF indexes to GPU 0 before training and adding (the caller checks
    :func:`faiss_gpu_available`). The returned index is ready to search with its knob (IVF ``nprobe``, HNSW
    ``efSearch``): ``nprobe`` / ``ef_search`` when given, else chosen for ``target_recall`` at recall@min(k, 10)
    (module docstring, "Search knob"), else the defaults; for IVF and HNSW, the record of which and why
    (:class:`arcfold.retrieval.index_tuning.IndexTuning` as a dict) is appended to ``report`` when it is a list.
    """
    import faiss

    g = as_matrix(gallery, "gallery")  # (N, D)
    n, d = g.shape
    _check_choice(index, "index", INDEX_KINDS)
    target = check_target_recall(target_recall)
    k = _check_positive_int(k, "k")
    k_tune = min(k, MAX_TUNE_K)
    explicit = None  # the knob given by the caller: no sweep
    if index != "exact":
        value, name = (nprobe, "nprobe") if index in IVF_KINDS else (ef_search, "ef_search")
        explicit = _check_positive_int(value, name, allow_none=True)
    held = held_out_rows(n, k_tune) if index != "exact" and explicit is None and target is not None else None
    if gpu and index in CPU_ONLY_KINDS:
        raise ValueError(f"faiss has no GPU {index} index; build it with gpu=False")
    n_fill = n if held is None else n - len(held)  # the rows an IVF index is trained on
    if index == "ivfpq" and n_fill < _IVFPQ_MIN_ROWS:
        log.warning("index='ivfpq' needs %d gallery rows to train its codes on, got %d: exact search instead",
                    _IVFPQ_MIN_ROWS, n_fill)  # fmt: skip
        index = "exact"
    if index == "exact":
        cpu_index = faiss.IndexFlatIP(d)
    elif index in IVF_KINDS:
        n_lists = default_nlist(n_fill) if nlist is None else _check_positive_int(nlist, "nlist")
        if n_lists > n:
            raise ValueError(f"nlist={n_lists} is more than the {n} gallery items to train on")
        if index == "ivf":
            cpu_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, n_lists, faiss.METRIC_INNER_PRODUCT)
        else:  # 4-bit PQ codes of 2 dimensions each (D itself when odd), re-scored on the float32 vectors
            spec = f"IVF{n_lists},PQ{d // 2 if d % 2 == 0 else d}x4fs,RFlat"
            cpu_index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
            cpu_index.k_factor = float(IVFPQ_K_FACTOR)
    else:
        cpu_index = faiss.IndexHNSWFlat(d, _check_positive_int(hnsw_m, "hnsw_m"), faiss.METRIC_INNER_PRODUCT)
    if index in CPU_ONLY_KINDS and held is not None:  # the held-out rows are added last under their own ids
        cpu_index = faiss.IndexIDMap(cpu_index)

    faiss_index = cpu_index
    if gpu:
        resources = faiss.StandardGpuResources()
        faiss_index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
        # Keep the GPU memory pool alive as long as the index (faiss's own wrappers use the same attribute).
        faiss_index.referenced_objects = [*getattr(faiss_index, "referenced_objects", []), resources]
    if index in IVF_KINDS:
        n_lists = faiss.extract_index_ivf(cpu_index).nlist
        pool = np.setdiff1d(np.arange(n), held) if held is not None else None  # never train on the held-out rows
        n_pool = n if pool is None else len(pool)
        n_train = min(n_pool, _MAX_POINTS_PER_LIST * n_lists)
        rows = None  # all of the pool
        if n_train < n_pool:
            rows = np.sort(np.random.default_rng(_TRAIN_SEED).choice(n_pool, size=n_train, replace=False))
        if pool is not None:
            rows = pool if rows is None else pool[rows]
        faiss_index.train(g if rows is None else g[rows])  # (n_train, D)
    if index == "exact":
        faiss_index.add(g)
        return faiss_index
    if held is not None:
        max_value = (min(n_lists, _GPU_MAX_K) if gpu else n_lists) if index in IVF_KINDS else MAX_EF_SEARCH
        min_value = math.ceil(2 * k * n_lists / n_fill) if index in IVF_KINDS else 1  # lists holding ~2k items
        tuning = add_and_tune(faiss_index, index, g, held, k=k_tune, target=target, max_value=max_value,
                              min_value=min_value)  # fmt: skip
    else:
        faiss_index.add(g)
        tuning = _fixed_knob(index, explicit, target, n, n_lists if index in IVF_KINDS else 0)
    set_knob(faiss_index, index, tuning.value)
    if report is not None:
        report.append(asdict(tuning))
    return faiss_index


def _fixed_knob(index: str, explicit: int | None, target: float | None, n: int, n_lists: int) -> IndexTuning:
    """The knob without a sweep: given, the default (no target), or exhaustive (a gallery too small to sample)."""
    if explicit is not None:
        value, source = explicit, "explicit"
    elif target is None:
        value, source = (default_nprobe(n_lists) if index in IVF_KINDS else DEFAULT_EF_SEARCH), "default"
    else:
        value, source = (n_lists if index in IVF_KINDS else max(n, DEFAULT_EF_SEARCH)), "small gallery"
    return IndexTuning(index, KNOBS[index], min(value, n_lists) if index in IVF_KINDS else value, source, target)


def _set_search_params(faiss_index: Any, index: str, k_search: int) -> None:
    if index == "hnsw":
        params = hnsw_params(faiss_index)
        params.efSearch = max(params.efSearch, k_search)  # HNSW cannot return more than efSearch items


def _sort_rows(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort every row by (-similarity, index); (c, k) each."""
    order = np.lexsort((idx, -sims), axis=1)  # (c, k); the last key is the primary one
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _fill_missing(
    sims: np.ndarray, idx: np.ndarray, queries: np.ndarray, gallery: np.ndarray, k_search: int
) -> tuple[np.ndarray, np.ndarray]:
    """Recompute exactly every row where an approximate index returned -1 ids (see the module docstring)."""
    bad = (idx < 0).any(axis=1)  # (c,)
    if bad.any():
        import faiss

        log.warning(
            "approximate index returned fewer than %d neighbours for %d queries; searching those exactly",
            k_search,
            int(bad.sum()),
        )
        exact_sims, exact_idx = faiss.knn(queries[bad], gallery, k_search, metric=faiss.METRIC_INNER_PRODUCT)
        sims[bad], idx[bad] = exact_sims, exact_idx
    return sims, idx


def _drop_self(sims: np.ndarray, idx: np.ndarray, self_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From (c, k + 1) rows drop each query's own index, or the last column where it is absent; (c, k) each."""
    c, k_plus = idx.shape
    is_self = idx == self_index[:, None]  # (c, k + 1)
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k_plus - 1)  # (c,)
    keep = np.ones_like(is_self)
    keep[np.arange(c), drop] = False
    return sims[keep].reshape(c, k_plus - 1), idx[keep].reshape(c, k_plus - 1)


# --------------------------------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------------------------------


def search(
    queries: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    k: int,
    *,
    index: str = "exact",
    exclude_self: bool = False,
    backend: str = "auto",
    device: str = "auto",
    chunk_size: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int | None = None,
    target_recall: float | None = 0.95,
    report: list[dict[str, Any]] | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery items by inner product for every query; (Q, k) float32 sims and (Q, k) int64 idx.

    ``queries`` (Q, D), ``gallery`` (N, D), numpy or torch; see the module docstring for index kinds, backends,
    devices, tie order, -1 handling and ``exclude_self`` (query i is gallery item i and is not its own neighbour).
    Requires ``1 <= k <= N`` (``N - 1`` with ``exclude_self``). ``progress`` shows a tqdm bar over query chunks.
    ``nprobe``, ``ef_search``, ``target_recall``, ``report``: an approximate index's knob (module doc, "Search knob").

    >>> g = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    >>> sims, idx = search(g, g, k=1, exclude_self=True)
    >>> idx.ravel().tolist(), sims.ravel().astype(float).round(3).tolist()
    ([1, 2, 1], [0.6, 0.8, 0.8])
    """
    q = as_matrix(queries, "queries")  # (Q, D)
    g = as_matrix(gallery, "gallery")  # (N, D)
    k = check_knn_request(q.shape, g.shape, k, exclude_self)
    n_queries, n = len(q), len(g)
    backend, index = _resolve_backend(backend, index)
    k_search = k + 1 if exclude_self else k

    if backend == "torch":
        dev = _resolve_torch_device(device)
        chunk = _check_positive_int(chunk_size, "chunk_size", allow_none=True) or max(1, _TORCH_CHUNK_BYTES // (4 * n))
        g_search: Any = torch.from_numpy(g).to(dev)  # moved once, reused by every chunk

        def search_chunk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return knn(x, g_search, k_search, chunk_size=chunk, device=dev)

    else:
        gpu = _resolve_faiss_gpu(device, index, k_search)
        chunk = _check_positive_int(chunk_size, "chunk_size", allow_none=True) or _FAISS_CHUNK
        knob = dict(nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search, target_recall=target_recall)
        faiss_index = build_index(g, index=index, gpu=gpu, k=k, report=report, **knob)
        _set_search_params(faiss_index, index, k_search)

        def search_chunk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            sims, idx = faiss_index.search(x, k_search)  # (c, k_search) each
            idx = idx.astype(np.int64, copy=False)
            if index != "exact":
                sims, idx = _fill_missing(sims, idx, x, g, k_search)
            return _sort_rows(sims, idx)

    sims_out = np.empty((n_queries, k), dtype=np.float32)  # (Q, k)
    idx_out = np.empty((n_queries, k), dtype=np.int64)  # (Q, k)
    starts = range(0, n_queries, chunk)
    if progress:
        starts = tqdm(starts, total=len(starts), desc=f"{index} search", unit="chunk")
    for start in starts:
        stop = min(start + chunk, n_queries)
        sims, idx = search_chunk(q[start:stop])  # (c, k_search) each
        if exclude_self:
            sims, idx = _drop_self(sims, idx, np.arange(start, stop))
        sims_out[start:stop], idx_out[start:stop] = sims, idx
    return sims_out, idx_out
