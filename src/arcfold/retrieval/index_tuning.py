"""The search knob of an approximate faiss index (IVF ``nprobe``, HNSW ``efSearch``), chosen for a target recall on
the gallery itself, and index files that keep it. :func:`arcfold.retrieval.search.build_index` calls it.

Choosing the knob (``target_recall``, inference's ``search.target_recall``, default 0.95)
    A seeded sample of ``min(2000, N // 10)`` gallery rows is **held out**: the index is first filled with the other
    rows, the sample is searched against it at each knob value and compared with the exact top-k among those same
    rows (faiss's brute force, in blocks), and only then are the sample rows added, under their own ids. A sample
    row searched in an index that already holds it would find itself and, for HNSW, start in its own neighbourhood
    of the graph: even with itself excluded from the results, that overstates HNSW's recall@10 (at efSearch=16: 0.976
    against 0.935 for new queries on 20k x 128 benchmark vectors, 0.990 against 0.885 on 10k x 32 ones), while the
    held-out estimate matched new queries to 0.006 (IVF: self-queries +0.01 to +0.03 at small nprobe).
    Recall is recall@k against exact search, ``k`` being the search's k capped at 10 (:data:`MAX_TUNE_K`): the first
    ranks are what Recall@K, MAP@5 and the label vote read; a deeper search keeps the same knob (HNSW raises
    efSearch to the k searched).

    The sweep doubles the knob up to the first value that reaches the target, then bisects between it and the value
    before until they are within an eighth of each other, and keeps the smallest value that reached it. IVF's
    nprobe runs from the number of lists that hold 2k items on average (k: the search's own, uncapped; so that a
    deep search, top 50 or 100, seldom visits fewer than k items and needs the exact fallback) up to ``nlist``,
    where IVF is exact; HNSW's efSearch runs 16, 32, ... 4096 (a search raises it to its k). Recall cannot fall
    as nprobe grows (a superset of lists is visited), and in practice does not as efSearch grows.
    A value **reaches the target** when the sample's mean recall minus two standard errors of that mean (the spread
    of the per-query recalls over ``sqrt(n_queries)``; about 0.005-0.01 at 0.95) is at least the target: the
    smallest value whose mean alone reached it would give new queries a recall just around the target, below it
    about half the time (measured: 0.947-0.954 for target 0.95 on 10k x 32 clustered vectors), while the margin puts
    them above it. When no value reaches the target, the largest one tried is used and a warning gives the recall
    it reached.
    faiss's own ``ParameterSpace.explore`` was not used: it ranks operating points by measured search time (not
    reproducible from run to run on a shared CPU) and explores the whole grid instead of stopping at the target.

What is recorded (:class:`IndexTuning`)
    Every approximate index built by ``build_index`` has one (its ``report`` list collects it): the knob and its
    value, its ``source`` (``target_recall``; ``explicit`` when ``nprobe`` / ``ef_search`` was given, which wins and
    skips the sweep; ``default`` with ``target_recall=None``: IVF ``nlist / 4``, HNSW 128; ``small gallery`` below 10
    rows, searched exhaustively), the mean recall reached and its lower bound (mean minus two standard errors), the
    values tried with both, and the seconds the sweep took. Inference logs one line per tuned index and returns the
    records in its summary (``search.indexes``).

Index files (:func:`save_index`, :func:`load_index`)
    ``PATH`` is faiss's own file (``faiss.write_index`` of the CPU index: it keeps ``nprobe`` / ``efSearch``) and
    ``PATH.json`` the record (``"format": "arcfold.index/1"``, ``ntotal``, ``d``, ``tuning``), both written atomically.
    A loaded index searches with the recorded value. An HNSW index tuned on a held-out sample is an ``IndexIDMap``
    around the ``IndexHNSWFlat`` (the sample rows are added last, under their gallery ids).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from arcfold.errors import CorruptFileError
from arcfold.io import atomic_path, load_json, save_json

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EF_SEARCH",
    "INDEX_FORMAT",
    "KNOBS",
    "MAX_EF_SEARCH",
    "MAX_TUNE_K",
    "IndexTuning",
    "add_and_tune",
    "check_target_recall",
    "held_out_rows",
    "hnsw_params",
    "load_index",
    "save_index",
    "set_knob",
]

INDEX_FORMAT = "arcfold.index/1"
DEFAULT_EF_SEARCH = 128  # HNSW efSearch with target_recall=None (the former fixed default)
MAX_TUNE_K = 10  # recall@k of the sweep is at k = min(search k, MAX_TUNE_K)
MAX_EF_SEARCH = 4096  # the last efSearch of the HNSW sweep
KNOBS = {"ivf": "nprobe", "hnsw": "efSearch", "ivfpq": "nprobe"}

_TUNE_QUERIES = 2000  # held-out gallery rows (a tenth of the gallery when that is fewer)
_TUNE_SEED = 1
_HNSW_EF_FIRST = 16  # the first efSearch of the HNSW sweep
_REFINE = 8  # bisect until the last value that missed is within 1/_REFINE of the first that reached
_TRUTH_BLOCK = 65536  # gallery rows per exact-search block (bounded copies of the gallery)


@dataclass
class IndexTuning:
    """How the search knob of an approximate index was set (module docstring); ``asdict`` gives its JSON."""

    index: str  # "ivf" | "hnsw" | "ivfpq"
    knob: str  # "nprobe" | "efSearch"
    value: int
    source: str  # "target_recall" | "explicit" | "default" | "small gallery"
    target_recall: float | None = None
    recall: float | None = None  # mean recall@k of ``value`` on the held-out rows
    recall_lower: float | None = None  # that mean minus two standard errors: what must reach target_recall
    reached: bool | None = None
    k: int | None = None
    n_queries: int = 0
    tried: list[list[float]] = field(default_factory=list)  # [value, recall, recall_lower] in the order tried
    seconds: float = 0.0


def check_target_recall(value: Any) -> float | None:
    """``value`` as a float in (0, 1], or None (no sweep); anything else is a ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 < value <= 1:
        raise ValueError(f"target_recall must be a number in (0, 1] or None, got {value!r}")
    return float(value)


def hnsw_params(faiss_index: Any) -> Any:
    """The ``faiss.HNSW`` of an ``IndexHNSWFlat``, bare or inside an ``IndexIDMap``."""
    import faiss

    if isinstance(faiss_index, faiss.IndexIDMap):
        return faiss.downcast_index(faiss_index.index).hnsw
    return faiss_index.hnsw


def set_knob(faiss_index: Any, index: str, value: int) -> None:
    """IVF ``nprobe`` (CPU or GPU index; for ``ivfpq`` the IVF inside the refine and id-map wrappers) or HNSW
    ``efSearch``."""
    import faiss

    if index == "ivf":
        faiss_index.nprobe = int(value)
    elif index == "ivfpq":
        faiss.extract_index_ivf(faiss_index).nprobe = int(value)
    else:
        hnsw_params(faiss_index).efSearch = int(value)


def held_out_rows(n_gallery: int, k: int) -> np.ndarray | None:
    """Sorted seeded sample of ``min(2000, N // 10)`` rows to tune on; None when the gallery is too small (< 10)."""
    n_held = min(_TUNE_QUERIES, n_gallery // 10)
    if n_held < 1 or n_gallery - n_held < k:
        return None
    return np.sort(np.random.default_rng(_TUNE_SEED).choice(n_gallery, size=n_held, replace=False))


def _exact_top_k(queries: np.ndarray, gallery: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Ids (from ``rows``) of each query's exact top-k inner products among ``gallery[rows]``; (Q, k) int64."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(rows), _TRUTH_BLOCK):
        block = rows[start : start + _TRUTH_BLOCK]  # (b,)
        sims, idx = faiss.knn(queries, gallery[block], min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, block[idx])
    heap.finalize()
    return heap.I


def _recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean over queries of |found ∩ truth| / k, and that mean minus two standard errors; (Q, k) each (-1 never hits).

    >>> _recall(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [3, 4]]))  # per query 1 and 1/2: 0.75 - 2 * 0.25
    (0.75, 0.25)
    """
    per_query = (truth[:, :, None] == found[:, None, :]).any(axis=2).mean(axis=1)  # (Q,)
    mean = float(per_query.mean())
    return mean, mean - 2 * float(per_query.std(ddof=1) if len(per_query) > 1 else 0.0) / math.sqrt(len(per_query))


def _add_rows(faiss_index: Any, gallery: np.ndarray, rows: np.ndarray) -> None:
    for start in range(0, len(rows), _TRUTH_BLOCK):
        block = rows[start : start + _TRUTH_BLOCK]
        faiss_index.add_with_ids(gallery[block], block.astype(np.int64))


def _sweep_values(first: int, max_value: int) -> list[int]:
    """The doubling grid from ``first``, ending at ``max_value``.

    >>> _sweep_values(1, 230), _sweep_values(3, 16), _sweep_values(16, 4096)[:3], _sweep_values(9, 8)
    ([1, 2, 4, 8, 16, 32, 64, 128, 230], [3, 6, 12, 16], [16, 32, 64], [8])
    """
    value, values = first, []
    while value < max_value:
        values.append(value)
        value *= 2
    return [*values, max_value]


def add_and_tune(
    faiss_index: Any,
    index: str,
    gallery: np.ndarray,
    held: np.ndarray,
    *,
    k: int,
    target: float,
    max_value: int,
    min_value: int = 1,
) -> IndexTuning:
    """Fill an empty (trained) index with ``gallery`` (N, D), choosing its knob on the ``held`` rows (module doc).

    ``max_value`` is the last value of the sweep (IVF: nlist, or the GPU's limit; HNSW: :data:`MAX_EF_SEARCH`),
    ``min_value`` the first for IVF (HNSW: 16). The index gets every row under its own id; the knob is left at the
    chosen value.
    """
    rest = np.setdiff1d(np.arange(len(gallery)), held)  # (N - S,) sorted
    _add_rows(faiss_index, gallery, rest)
    started = time.perf_counter()  # the sweep's own time: exact top-k of the held-out rows, then their searches
    queries = gallery[held]  # (S, D)
    truth = _exact_top_k(queries, gallery, rest, k)  # (S, k)
    tried: dict[int, tuple[float, float]] = {}  # value -> (mean recall, lower bound)

    def reaches(value: int) -> bool:
        if value not in tried:
            set_knob(faiss_index, index, value)
            _, found = faiss_index.search(queries, k)  # (S, k)
            tried[value] = _recall(found, truth)
        return tried[value][1] >= target

    values = _sweep_values(min(min_value, max_value) if index == "ivf" else _HNSW_EF_FIRST, max_value)
    hi = next((v for v in values if reaches(v)), None)
    if hi is not None:
        lo = max((v for v in tried if v < hi), default=0)  # the value before, which missed (0: none)
        while lo and hi - lo > max(1, hi // _REFINE):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    value = hi if hi is not None else values[-1]
    _add_rows(faiss_index, gallery, held)
    tuning = IndexTuning(
        index=index,
        knob=KNOBS[index],
        value=value,
        source="target_recall",
        target_recall=target,
        recall=round(tried[value][0], 4),
        recall_lower=round(tried[value][1], 4),
        reached=hi is not None,
        k=k,
        n_queries=len(held),
        tried=[[v, round(mean, 4), round(lower, 4)] for v, (mean, lower) in tried.items()],
        seconds=round(time.perf_counter() - started, 2),
    )
    _log_tuning(tuning)
    return tuning


def _log_tuning(t: IndexTuning) -> None:
    tried = ", ".join(f"{v:g}: {r:.3f}" for v, r, _ in t.tried)
    if t.reached:
        log.info(
            "%s index: %s=%d reaches target_recall %g: recall@%d %.3f (lower bound %.3f) on %d held-out gallery "
            "rows (tried %s; %.1f s)",
            t.index, t.knob, t.value, t.target_recall, t.k, t.recall, t.recall_lower, t.n_queries, tried, t.seconds,
        )  # fmt: skip
    else:
        log.warning(
            "%s index: target_recall %g not reached: %s=%d, the largest tried, gives recall@%d %.3f (lower bound "
            "%.3f) on %d held-out gallery rows (tried %s); search.index=exact is exact and may be as fast",
            t.index, t.target_recall, t.knob, t.value, t.k, t.recall, t.recall_lower, t.n_queries, tried,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# index files


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_index(faiss_index: Any, path: str | Path, tuning: IndexTuning | dict[str, Any] | None = None) -> None:
    """Write ``faiss_index`` (a GPU one as its CPU copy) to ``path`` and its knob record ``tuning`` to ``path.json``."""
    import faiss

    path = Path(path)
    cpu_index = faiss.index_gpu_to_cpu(faiss_index) if hasattr(faiss, "GpuIndex") and isinstance(
        faiss_index, faiss.GpuIndex
    ) else faiss_index  # fmt: skip
    with atomic_path(path) as tmp:
        faiss.write_index(cpu_index, str(tmp))
    save_json(
        _sidecar(path),
        {
            "format": INDEX_FORMAT,
            "ntotal": int(faiss_index.ntotal),
            "d": int(faiss_index.d),
            "tuning": asdict(tuning) if isinstance(tuning, IndexTuning) else tuning,
        },
    )


def load_index(path: str | Path) -> tuple[Any, IndexTuning | None]:
    """Read an index written by :func:`save_index` (CPU) and its knob record; it searches with the recorded value."""
    import faiss

    path = Path(path)
    meta_path = _sidecar(path)
    for p in (path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"index file {p} not found (save_index writes {path.name} and {meta_path.name})")
    meta = load_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise CorruptFileError(f'{meta_path}: not an arcfold index record (no "format": "{INDEX_FORMAT}")')
    try:
        faiss_index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise CorruptFileError(f"cannot read {path}: truncated, corrupt or not a faiss index ({e})") from e
    if (faiss_index.ntotal, faiss_index.d) != (meta.get("ntotal"), meta.get("d")):
        raise CorruptFileError(
            f"{path} holds {faiss_index.ntotal} vectors of D={faiss_index.d} but {meta_path} records "
            f"{meta.get('ntotal')} of D={meta.get('d')}: the two files do not belong together"
        )
    try:
        tuning = IndexTuning(**meta["tuning"]) if meta.get("tuning") else None
    except TypeError as e:
        raise CorruptFileError(f'{meta_path}: its "tuning" record is not one save_index writes ({e})') from e
    if tuning is not None:
        set_knob(faiss_index, tuning.index, tuning.value)
    return faiss_index, tuning
