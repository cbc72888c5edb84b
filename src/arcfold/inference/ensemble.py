"""Embedding images with an ensemble: the fold models of one or more experiments (or a blend), each image decoded
once per pass and resized to every size the models need, test-time augmentation, the fold concatenation and its
optional PCA. See step 2 of :mod:`arcfold.inference.run`.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import TruncatedSVD
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from arcfold.artifacts import FULL_FIT, fold_name
from arcfold.data.dataset import read_image, resize_image
from arcfold.data.transforms import BatchNormalise as _Normalise  # shared with training's loader
from arcfold.errors import DataValidationError
from arcfold.inference.config import (
    InferenceConfig,
    TTAConfig,
)
from arcfold.models.embedding import load_embedding_model
from arcfold.retrieval.ensemble import blend_embeddings, load_blend_spec

log = logging.getLogger(__name__)

__all__ = [
    "Ensemble",
    "FoldModel",
    "combine_experiments",
    "embed_experiments",
    "embed_images",
    "load_ensemble",
    "reduce_fold_ensembles",
    "resolve_num_workers",
]


@dataclass
class FoldModel:
    experiment: str
    fold: int | str  # K, or "full" (the full-data fit)
    model: torch.nn.Module
    image_size: int


@dataclass
class Ensemble:
    """The models to run and how to combine them: experiments (each its folds concatenated) blended with weights."""

    name: str
    experiments: list[str]
    weights: list[float]
    models: list[FoldModel]
    blend_path: Path | None = None


def _experiment_checkpoints(
    models_dir: Path, experiment: str, folds: list[int | str] | None, allow_missing: bool
) -> list[tuple[int | str, Path]]:

    exp_dir = models_dir / experiment
    numbers = sorted(int(p.stem[4:]) for p in exp_dir.glob("fold*.pt") if p.stem[4:].isdigit())
    found: dict[int | str, Path] = {k: exp_dir / f"fold{k}.pt" for k in numbers}
    if folds is not None and FULL_FIT in folds and (exp_dir / "full.pt").is_file():
        found[FULL_FIT] = exp_dir / "full.pt"  # the full-data fit: only when asked for
    if not found:
        raise FileNotFoundError(f"no fold<K>.pt checkpoint in {exp_dir} (experiment '{experiment}')")
    # the checkpoints carry the experiment's config: it says how many folds there are
    _, cfg, _ = load_embedding_model(next(iter(found.values())), "cpu")
    wanted = list(folds) if folds is not None else list(range(cfg.folds.n_splits))
    missing = [k for k in wanted if k not in found]
    if missing:
        names = ", ".join(f"{fold_name(k)}.pt" for k in missing)
        if folds is not None or not allow_missing:
            raise FileNotFoundError(
                f"{exp_dir} is missing {names} (experiment '{experiment}' has {cfg.folds.n_splits} folds, "
                f"found {', '.join(f'{fold_name(k)}.pt' for k in found)}); train them"
                f"{' (the full fit: bash train_fold.sh full CONFIG)' if FULL_FIT in missing else ''}, or pick folds "
                f"with folds=[{','.join(map(str, found))}], or set allow_missing_folds=true"
            )
        log.warning("%s: %s missing, using the %d folds present (allow_missing_folds=true)", exp_dir, names, len(found))
        wanted = [k for k in wanted if k in found]
    return [(k, found[k]) for k in wanted]


def load_ensemble(cfg: InferenceConfig, device: torch.device) -> Ensemble:

    models_dir = Path(cfg.models_dir)
    if cfg.blend is not None:
        blend_path = Path(cfg.blend)
        spec = load_blend_spec(blend_path)
        members = [(e, float(w)) for e, w in zip(spec["experiments"], spec["weights"], strict=True) if float(w) > 0]
        experiments, weights, name = [e for e, _ in members], [w for _, w in members], spec["name"]
        if len(members) < len(spec["experiments"]):
            log.info("blend %s: members of weight 0 are not loaded", name)
    else:
        blend_path, experiments, weights, name = None, [cfg.experiment], [1.0], cfg.experiment
    models = []
    for exp in experiments:
        for fold, path in _experiment_checkpoints(models_dir, exp, cfg.folds, cfg.allow_missing_folds):
            model, model_cfg, _ = load_embedding_model(path, device)
            models.append(FoldModel(exp, fold, model, model_cfg.data.image_size))
            log.info("loaded %s (%s, %d px)", path, model_cfg.model.backbone, model_cfg.data.image_size)
    return Ensemble(name, experiments, weights, models, blend_path)


class _MultiSizeDataset(Dataset):
    """Decodes each image once and returns it resized to every size needed: ``{size: (3, size, size) uint8 array}``.

    Normalisation is left to :class:`_Normalise`, once per batch (in the loader on the CPU, on the GPU under CUDA):
    uint8 moves a quarter of the bytes (to the GPU, between DataLoader workers), and per-image float work goes.
    """

    def __init__(self, paths: Sequence[str], sizes: Sequence[int]) -> None:
        self.paths = list(paths)
        self.sizes = sorted(set(sizes))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[int, np.ndarray]:
        try:
            image = read_image(self.paths[index])  # (H, W, 3) uint8 RGB
        except OSError:  # it exists (checked when the table was read) but OpenCV cannot decode it
            path = self.paths[index]
            raise DataValidationError(
                f"row {index} (line {index + 2}): cannot decode image {path} (corrupt or not an image)"
            ) from None
        # (3, s, s) uint8 per size, resized as training resizes
        return {size: np.ascontiguousarray(resize_image(image, size).transpose(2, 0, 1)) for size in self.sizes}


def _collate_views(items: list[dict[int, np.ndarray]], normalise: _Normalise | None = None) -> dict[int, torch.Tensor]:
    """Stack the views of each size: ``{size: (B, 3, s, s)}`` uint8, or float32 through ``normalise`` when given.

    Stacked in numpy: a producer thread then never enters torch's thread pool.
    """
    batch = {size: torch.from_numpy(np.stack([item[size] for item in items])) for size in items[0]}
    return batch if normalise is None else {size: normalise(x) for size, x in batch.items()}


def _prefetch(iterable, depth: int = 2):
    """Yield ``iterable``'s items, produced by a background thread up to ``depth`` items ahead.

    ``embed_images(prefetch=True)`` with ``num_workers=0``: overlaps decoding (OpenCV releases the GIL) with the
    model's forward pass in the main thread, when a core is free for it. An exception in the producer is raised
    here, in the consumer; a consumer that stops early (or raises) stops the producer at its next item.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put((True, item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((False, exc))
            return
        put((True, done))

    thread = threading.Thread(target=produce, name="arcfold-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def resolve_num_workers(num_workers: int | None, device: torch.device) -> int:
    """``num_workers``, or for ``None`` (auto): 0 on the CPU, ``min(4, cpus - 1)`` on CUDA.

    On the CPU the model's forward pass already uses every core: worker processes (or a prefetch thread) compete
    with it, and decoding between batches measured best (``BENCHMARKS.md``, extraction). On CUDA the CPU is idle
    while the GPU computes, so decoding in parallel processes pays (not measured here: no GPU).
    """
    if num_workers is not None:
        return num_workers
    return 0 if device.type != "cuda" else max(0, min(4, (os.cpu_count() or 1) - 1))


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embed_images(ensemble: Ensemble, paths: Sequence[str], **kwargs: Any) -> np.ndarray:
    """The ensemble's embedding of every image: (N, D) float32, unit norm (see the module doc for the combination).

    Each experiment's folds concatenated (:func:`embed_experiments`), the experiments blended with their weights.
    Keyword arguments as for :func:`embed_experiments`.
    """
    return combine_experiments(ensemble, embed_experiments(ensemble, paths, **kwargs))


def combine_experiments(ensemble: Ensemble, members: list[np.ndarray]) -> np.ndarray:
    """Blend the experiments' embeddings (one (N, D_i) array each) with the ensemble's weights; (N, sum D_i)."""

    return members[0] if len(members) == 1 else blend_embeddings(members, ensemble.weights)


@torch.inference_mode()
def embed_experiments(
    ensemble: Ensemble,
    paths: Sequence[str],
    *,
    tta: TTAConfig,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    prefetch: bool = False,
    progress: bool = True,
    desc: str = "embedding",
) -> list[np.ndarray]:
    """Each experiment's embedding of every image: its K fold models' embeddings, each L2-normalised and scaled by
    ``1/sqrt(K)``, concatenated: ``blend_embeddings(per_fold, [1] * K)``, (N, K × D) float32, unit norm. The inner
    product of two rows is the mean of the folds' cosine similarities (the folds' spaces are never mixed).

    ``num_workers > 0`` decodes in DataLoader worker processes (on CUDA: the CPU is free while the GPU computes).
    ``num_workers=0`` decodes in the main thread between batches, or with ``prefetch=True`` in a background thread
    that decodes the next batches while the model runs: only worth it with a spare core, since the thread competes
    with torch's threads (and for the GIL): on the 2-core benchmark VM it cost 3-4 points of throughput (0.94x vs
    0.97-0.99x the bare loop, ``BENCHMARKS.md``), so it is off by default. On CUDA batches travel as uint8 (pinned) and
    are normalised on the GPU; on the CPU the loader normalises them in numpy. Either way the values equal the eval
    transform's bit for bit.
    """

    device = torch.device(device)

    def view_size(m: FoldModel, scale: float) -> int:
        return max(8, int(round(m.image_size * scale)))

    sizes = [view_size(m, s) for m in ensemble.models for s in tta.scales]
    normalise = _Normalise(device)
    on_cpu = device.type == "cpu"  # normalise in the loader (numpy), else on the device after a uint8 transfer
    loader = DataLoader(
        _MultiSizeDataset(paths, sizes),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=functools.partial(_collate_views, normalise=normalise if on_cpu else None),
        pin_memory=device.type == "cuda",
    )
    batches = _prefetch(loader) if prefetch and num_workers == 0 else loader
    per_model: list[list[np.ndarray]] = [[] for _ in ensemble.models]
    for batch in tqdm(batches, desc=desc, unit="batch", total=len(loader), disable=not progress, leave=False):
        batch = {s: x.to(device, non_blocking=True) for s, x in batch.items()}  # {s: (B, 3, s, s)}
        if not on_cpu:
            batch = {s: normalise(x) for s, x in batch.items()}
        for i, m in enumerate(ensemble.models):
            total = None
            for scale in tta.scales:
                x = batch[view_size(m, scale)]  # (B, 3, s, s)
                for flip in (False, True) if tta.hflip else (False,):
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        e = m.model.embed(x.flip(-1) if flip else x).float()  # (B, D), unit norm
                    total = e if total is None else total + e
            per_model[i].append(torch.nn.functional.normalize(total, dim=1).cpu().numpy())
    members = []
    for exp in ensemble.experiments:
        folds = [np.concatenate(per_model[i]) for i, m in enumerate(ensemble.models) if m.experiment == exp]
        members.append(folds[0] if len(folds) == 1 else blend_embeddings(folds, [1.0] * len(folds)))  # (N, K D)
    return members


def reduce_fold_ensembles(
    ensemble: Ensemble, query: list[np.ndarray], gallery: list[np.ndarray], dim: int | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``fold_pca``: each experiment of several folds projected to ``dim`` dims (default: one fold's D).

    The projection is an uncentred PCA (scikit-learn's ``TruncatedSVD``: the top right singular vectors of the
    gallery embeddings) fitted on ``gallery[i]`` (N, K × D) and applied to ``query[i]`` and ``gallery[i]``, then
    L2-normalised: (Q, dim) and (N, dim). Uncentred, the projection keeps inner products on the gallery's span
    (exactly, when it has at most ``dim`` dimensions) instead of measuring them from the gallery's mean, so
    similarities stay on the scale the rerank spec's vote threshold was chosen on. Experiments of one fold are
    returned as they are. ``dim`` is capped at the number of gallery images and dimensions (with a warning).
    """

    q_out, g_out = [], []
    for exp, q, g in zip(ensemble.experiments, query, gallery, strict=True):
        n_folds = sum(m.experiment == exp for m in ensemble.models)
        if n_folds == 1:
            q_out.append(q)
            g_out.append(g)
            continue
        wanted = dim if dim is not None else g.shape[1] // n_folds
        # TruncatedSVD needs fewer components than the matrix has rows and columns
        n_components = min(wanted, g.shape[0] - 1, g.shape[1] - 1)
        if n_components < wanted:
            log.warning("fold_pca: %s to %d dims, not %d (%d gallery images)", exp, n_components, wanted, len(g))
        svd = TruncatedSVD(n_components, algorithm="randomized", n_iter=7, random_state=0).fit(g.astype(np.float64))
        q_out.append(_l2(svd.transform(q.astype(np.float64))).astype(np.float32))  # (Q, dim)
        g_out.append(_l2(svd.transform(g.astype(np.float64))).astype(np.float32))  # (N, dim)
        kept = float((svd.singular_values_**2).sum()) / len(g)  # rows have norm 1: the share of their energy kept
        log.info("fold_pca: %s %d -> %d dims, keeping %.3f of the gallery's squared norm", exp, g.shape[1],
                 n_components, kept)  # fmt: skip
    return q_out, g_out
