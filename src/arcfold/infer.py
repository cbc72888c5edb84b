"""Inference stage: embed query and gallery images with fold/experiment ensembles, search, re-rank, write a submission.

Made for an internet-less Kaggle notebook: weights come only from ``models_dir`` (which may be read-only; nothing
is ever written there), nothing is downloaded, and ``inference.py`` at the repository root puts ``src/`` on
``sys.path`` so no install step is needed. faiss is optional (exact torch search otherwise).

What it does, in order (timings of each stage are logged at the end):

1. **Models.** ``experiment: NAME`` uses every ``<models_dir>/NAME/fold<K>.pt`` of the experiment's
   ``folds.n_splits`` folds (a missing fold is an error naming it, unless ``allow_missing_folds=true`` or
   ``folds=[...]`` picks some; ``full`` in the list is the full-data fit ``full.pt``: ``folds=[full]`` alone,
   ``folds=[0,1,2,full]`` beside the folds, one more member of the concatenation); ``blend: PATH`` uses a blend
   spec (``python -m arcfold blend``) and all of its member experiments. Checkpoints are loaded with
   ``torch.load(weights_only=True)``: no code runs from them.
2. **Embedding.** Every image is decoded once per pass and resized by :func:`arcfold.data.dataset.resize_image`
   (as in training) to each size the models need: ``image_size × scale`` for each ``tta.scales``; ``tta.hflip`` adds
   the mirrored view. A model's embedding of an image is the mean of its views' L2-normalised embeddings,
   normalised. An experiment's K fold models are combined like a blend of K equal members
   (:func:`arcfold.blend.blend_embeddings` with weights ``[1] * K``): each fold's embedding times ``1/sqrt(K)``,
   concatenated (K × D dims), so the similarity of two images is the mean of the folds' cosines. (Averaging the
   vectors instead would add up unrelated coordinates: every fold model has its own basis.) ``fold_pca=true``
   reduces each experiment's concatenation back to ``fold_pca_dim`` dims (default: one fold's D) with an
   uncentred PCA (scikit-learn's ``TruncatedSVD``) fitted on the gallery and applied to query and gallery alike,
   then L2-normalised: search memory and time of one model for a little accuracy (an uncentred projection keeps
   the cosine scale the vote threshold was chosen on; it is exact when the folds' embeddings span only D dims).
   A blend concatenates its experiments with ``sqrt(weight)``. With one fold model, no TTA and scale 1 the
   embeddings equal the OOF ones the train stage wrote for the same images.
3. **Search + re-ranking.** :func:`arcfold.postprocess.rerank_pipeline` with the steps of a rerank spec
   (``python -m arcfold rerank``; ``rerank: auto`` takes the spec of the submission's task, ``retrieval`` or
   ``recognition`` (for both recognition and top5): ``<oof_dir>/<experiment>/rerank-<task>.json``, then the same
   name under ``<models_dir>/<experiment>/``, or ``<blend>.rerank-<task>.json`` beside a blend spec; ``none``
   turns it off; a path names one) and the search settings of ``search`` (exact / IVF / HNSW, faiss GPU when
   present, chunked). ``recognition`` and ``top5`` need the recognition spec's vote (its ``new_label``
   threshold was chosen on OOF): without one, ``rerank: auto`` is an error naming the command that makes it
   (``python -m arcfold rerank --experiment NAME --task recognition``), and so is a spec of the retrieval task;
   ``rerank: none`` votes with the config's ``vote`` instead (a warning for top5 when ``vote.threshold`` is null:
   the new label is then never predicted).
4. **Submission.** ``submission.format`` (see :mod:`arcfold.submission`): ``retrieval`` writes the top
   ``submission.top_k`` gallery ids; ``recognition`` and ``top5`` vote over the neighbours' gallery labels
   (``gallery.label_column`` required) with the rerank spec's vote settings (else ``vote``), ``top5`` inserting
   ``submission.new_label`` below the threshold. ``top5`` always lists 5 distinct labels (fewer only if the
   gallery has fewer): the search returns ``max(vote.k, 50)`` neighbours and the slots the vote leaves empty are
   filled, after the vote's own labels and the new label, by the labels of the further neighbours in vote order
   (:func:`arcfold.postprocess.vote_labels` with ``fill``); rows still short are searched again 4× deeper. The
   file is validated before it is written (atomically) to ``<out_dir>/<name>.csv``; with ``save_embeddings=true``
   the embeddings go to ``<out_dir>/<name>.npz``.

Config: :class:`InferenceConfig` (YAML file with ``base:`` chains and ``key=value`` overrides, unknown keys are
errors, as for training). Example::

    python inference.py -c configs/inference/glyphs.yaml query.csv=q.csv gallery.csv=g.csv tta.hflip=true
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from arcfold.config import ConfigError, load_structured
from arcfold.data.dataset import read_image, resize_image
from arcfold.data.table import DataValidationError, _raise_problems, _where, read_csv
from arcfold.data.transforms import BatchNormalise as _Normalise  # shared with training's loader

log = logging.getLogger(__name__)

__all__ = [
    "InferenceConfig",
    "combine_experiments",
    "embed_experiments",
    "embed_images",
    "load_ensemble",
    "load_inference_config",
    "predict_labels",
    "reduce_fold_ensembles",
    "run_inference",
]

DEFAULT_NEW_LABEL = "new_individual"
TOP5_DEPTH = 50  # neighbours searched for a top5 submission (at least vote.k): enough to fill 5 labels


# --------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class TableConfig:
    """A CSV of images: one row per image."""

    csv: str = ""  # required
    id_column: str = "id"
    image_column: str = "image"
    label_column: str | None = None  # gallery labels (recognition, top5)
    image_root: str | None = None  # image paths are relative to this folder; default: the CSV's folder


@dataclass
class TTAConfig:
    hflip: bool = False  # add the mirrored view (not for characters or text: a flip changes their identity)
    scales: list[float] = field(default_factory=lambda: [1.0])  # resize to image_size * scale


@dataclass
class SearchConfig:
    index: str = "exact"  # exact | ivf | hnsw
    backend: str = "auto"  # auto (faiss if installed) | faiss | torch
    device: str = "auto"  # auto (faiss GPU when present) | cpu | cuda
    nlist: int | None = None  # ivf lists; default ~4 sqrt(N)
    nprobe: int | None = None  # ivf lists visited per query; default nlist / 4 (recall@10 >= 0.95, see search.py)
    hnsw_m: int = 32
    ef_search: int = 128


@dataclass
class VoteConfig:
    """Label vote for recognition/top5, used when the rerank spec has none."""

    k: int = 5
    mode: str = "max"  # max | sum of the neighbours' similarities per label
    threshold: float | None = None  # top5: new_label goes first below this score


@dataclass
class SubmissionConfig:
    format: str = "retrieval"  # retrieval | recognition | top5
    name: str | None = None  # file name; default: the experiment's or blend's name
    top_k: int = 100  # retrieval: gallery ids per query
    id_header: str | None = None  # default per format (id / id / image)
    prediction_header: str | None = None  # default per format (images / landmarks / predictions)
    new_label: str = DEFAULT_NEW_LABEL


@dataclass
class InferenceConfig:
    experiment: str | None = None  # one experiment: all its folds
    blend: str | None = None  # or a blend spec (oof/blends/NAME.json)
    models_dir: str = "models"  # <models_dir>/<experiment>/fold<K>.pt; may be read-only
    # default: all n_splits folds of each experiment; "full" is the full-data fit (full.pt): [full] or [0,1,2,full]
    folds: list[int | str] | None = None
    allow_missing_folds: bool = False  # use the folds that exist when some are missing
    # The K folds of an experiment are concatenated (K x D dims, similarity = mean of the folds' cosines).
    # fold_pca=true reduces that back to fold_pca_dim dims (null: one fold's D) by an uncentred PCA fitted on the
    # gallery: K times less search memory and time, for a little accuracy. No effect on one-fold experiments.
    fold_pca: bool = False
    fold_pca_dim: int | None = None
    query: TableConfig = field(default_factory=TableConfig)
    gallery: TableConfig = field(default_factory=TableConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank: str = "auto"  # auto | none | path to a rerank spec
    vote: VoteConfig = field(default_factory=VoteConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    oof_dir: str = "oof"  # where rerank: auto looks
    out_dir: str = "submissions"
    save_embeddings: bool = False
    batch_size: int = 128
    # DataLoader worker processes decoding images; 0: the main process decodes between batches; null (auto): 0 on the
    # CPU (the model keeps every core busy), min(4, cpus - 1) on CUDA (the CPU is free while the GPU computes)
    num_workers: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (fp16 on CUDA) | bf16 | off
    progress: bool = True


def load_inference_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> InferenceConfig:
    """Defaults <- YAML chain (``base:``) <- ``key=value`` overrides, validated, as for training configs."""
    obj: InferenceConfig = load_structured(InferenceConfig, path, overrides)
    if obj.amp in ("False", "false"):  # YAML reads a bare `off` as the boolean false
        obj.amp = "off"
    _validate(obj)
    return obj


def _validate(cfg: InferenceConfig) -> None:
    from arcfold.models.embedding import FULL_FIT
    from arcfold.search import INDEX_KINDS
    from arcfold.submission import FORMATS

    problems = []
    if (cfg.experiment is None) == (cfg.blend is None):
        problems.append("set exactly one of 'experiment' and 'blend'")
    for role in ("query", "gallery"):
        if not getattr(cfg, role).csv:
            problems.append(f"{role}.csv is required (a CSV with columns id and image)")
    if cfg.submission.format not in FORMATS:
        problems.append(f"submission.format must be one of {', '.join(FORMATS)} (got {cfg.submission.format!r})")
    if cfg.submission.format in ("recognition", "top5") and not cfg.gallery.label_column:
        problems.append(f"submission.format={cfg.submission.format} needs gallery labels: set gallery.label_column")
    if cfg.search.index not in INDEX_KINDS:
        problems.append(f"search.index must be one of {', '.join(INDEX_KINDS)} (got {cfg.search.index!r})")
    if cfg.search.backend not in ("auto", "faiss", "torch"):
        problems.append(f"search.backend must be auto, faiss or torch (got {cfg.search.backend!r})")
    if cfg.vote.mode not in ("max", "sum"):
        problems.append(f"vote.mode must be max or sum (got {cfg.vote.mode!r})")
    if cfg.amp not in ("auto", "fp16", "bf16", "off"):
        problems.append(f"amp must be auto, fp16, bf16 or off (got {cfg.amp!r})")
    if not cfg.tta.scales or any(s <= 0 for s in cfg.tta.scales):
        problems.append(f"tta.scales must be positive numbers (got {cfg.tta.scales})")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        problems.append(f"num_workers must be >= 0 or null for auto (got {cfg.num_workers})")
    bad_folds = [k for k in cfg.folds or [] if k != FULL_FIT and not (isinstance(k, int) and k >= 0)]
    if bad_folds or cfg.folds == []:
        problems.append(f"folds are fold numbers K >= 0 or full (the full-data fit), e.g. [0,1,full] (got {cfg.folds})")
    if cfg.fold_pca_dim is not None and cfg.fold_pca_dim < 1:
        problems.append(f"fold_pca_dim must be >= 1 or null (got {cfg.fold_pca_dim})")
    for name in ("batch_size", "vote.k", "submission.top_k"):
        value = OmegaConf.select(OmegaConf.structured(cfg), name)
        if value < 1:
            problems.append(f"{name} must be >= 1 (got {value})")
    if problems:
        raise ConfigError("invalid inference config:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------------------------
# inputs


@dataclass
class ImageTable:
    ids: list[str]
    paths: list[str]
    labels: list[str] | None


def read_image_table(table: TableConfig, role: str) -> ImageTable:
    """Read and check a query/gallery CSV: columns present, ids unique and non-empty, every image file present."""
    csv = Path(table.csv)
    df = read_csv(csv)
    wanted = [table.id_column, table.image_column] + ([table.label_column] if table.label_column else [])
    missing = [c for c in wanted if c not in df]
    if missing:
        raise DataValidationError(
            f"{csv} ({role}): missing column(s) {', '.join(map(repr, missing))}; the file has {list(df.columns)}"
        )
    if df.empty:
        raise DataValidationError(f"{csv} ({role}): no data rows")
    problems = []
    for col in wanted:
        problems += [
            f"{_where(i)}, column '{col}': empty value" for i in np.flatnonzero((df[col].str.strip() == "").to_numpy())
        ]
    ids = df[table.id_column]
    for i in np.flatnonzero(ids.duplicated().to_numpy()):
        problems.append(f"{_where(i)}, column '{table.id_column}': duplicate id {ids.iat[i]!r}")
    root = Path(table.image_root) if table.image_root else csv.parent
    paths = [str(root / p) for p in df[table.image_column]]
    problems += [
        f"{_where(i)}, column '{table.image_column}': image not found: {p}"
        for i, p in enumerate(paths)
        if not Path(p).is_file()
    ]
    _raise_problems(f"{csv} ({role})", problems)
    labels = df[table.label_column].tolist() if table.label_column else None
    return ImageTable(df[table.id_column].tolist(), paths, labels)


# --------------------------------------------------------------------------------------------------------------------
# models


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
    from arcfold.models.embedding import FULL_FIT, fold_name, load_embedding_model

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
    from arcfold.models.embedding import load_embedding_model

    models_dir = Path(cfg.models_dir)
    if cfg.blend is not None:
        from arcfold.blend import load_blend_spec

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


# --------------------------------------------------------------------------------------------------------------------
# embedding


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
    from arcfold.blend import blend_embeddings

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
    from arcfold.blend import blend_embeddings

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
    from sklearn.decomposition import TruncatedSVD

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


# --------------------------------------------------------------------------------------------------------------------
# rerank spec


def find_rerank_spec(cfg: InferenceConfig, ensemble: Ensemble) -> Path | None:
    """The rerank spec to apply: ``rerank`` as a path, or for ``auto`` the rerank stage's file for this task."""
    from arcfold.rerank import spec_path

    if cfg.rerank == "none":
        return None
    if cfg.rerank != "auto":
        path = Path(cfg.rerank)
        if not path.is_file():
            raise FileNotFoundError(f"rerank spec {path} not found (rerank=auto finds one, rerank=none turns it off)")
        return path
    task = "retrieval" if cfg.submission.format == "retrieval" else "recognition"
    if ensemble.blend_path is not None:
        candidates = [spec_path(cfg.oof_dir, task, blend=ensemble.blend_path)]
    else:
        candidates = [spec_path(d, task, experiment=ensemble.name) for d in (cfg.oof_dir, cfg.models_dir)]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and task == "recognition":
        source = f"--experiment {ensemble.name}" if ensemble.blend_path is None else f"--blend {ensemble.blend_path}"
        raise FileNotFoundError(
            f"submission.format={cfg.submission.format} needs a recognition rerank spec (its label vote and "
            f"new-label threshold, chosen on OOF) and rerank=auto found none (looked for "
            f"{', '.join(map(str, candidates))}): make it with `python -m arcfold rerank {source} --task "
            f"recognition` (on Kaggle, copy it beside the weights), or set rerank=none to vote with the config's "
            f"vote settings"
        )
    if found is None:
        log.info("no rerank spec (looked for %s): plain search", ", ".join(map(str, candidates)))
    return found


def check_rerank_spec(cfg: InferenceConfig, spec: dict[str, Any] | None, path: Path | None) -> None:
    """Refuse a spec without a vote for a recognition/top5 submission; warn when top5 can never predict new."""
    fmt = cfg.submission.format
    if fmt == "retrieval":
        return
    if spec is not None and not spec.get("vote"):
        raise ConfigError(
            f"rerank spec {path} is for the {spec.get('task')} task and has no label vote, which "
            f"submission.format={fmt} needs: use the recognition spec (`python -m arcfold rerank ... --task "
            f"recognition` writes rerank-recognition.json), or rerank=none to vote with the config's vote settings"
        )
    if spec is None and fmt == "top5" and cfg.vote.threshold is None:
        log.warning(
            "rerank=none and vote.threshold=null: %s is never predicted; set vote.threshold, or make a recognition "
            "rerank spec (python -m arcfold rerank --experiment NAME --task recognition) and use rerank=auto",
            cfg.submission.new_label,
        )


# --------------------------------------------------------------------------------------------------------------------
# labels


def _new_label_for(fmt: str, vote: dict[str, Any], new_label: str) -> tuple[str | None, float | None]:
    threshold = vote.get("threshold") if fmt == "top5" else None  # recognition: GAP ranks by confidence
    return (new_label if threshold is not None else None), threshold


def top5_width(gallery_labels: Sequence, vote: dict[str, Any], new_label: str) -> int:
    """How many labels every top5 row lists: 5, or fewer when the gallery's labels (and the new label) are fewer."""
    new, _ = _new_label_for("top5", vote, new_label)
    return min(5, len(set(gallery_labels) | ({new} if new is not None else set())))


def predict_labels(
    query: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: Sequence,
    steps: list[dict[str, Any]],
    vote: dict[str, Any],
    *,
    fmt: str,
    new_label: str,
    **search_kwargs: Any,
) -> tuple[list[list], list[float]]:
    """Labels of each query for a ``recognition`` or ``top5`` submission, and the first one's confidence.

    Search (with ``steps``), then :func:`arcfold.postprocess.vote_labels` over the first ``vote["k"]`` neighbours.
    ``top5`` inserts ``new_label`` at ``vote["threshold"]`` (when not null) and fills every row to
    :func:`top5_width` labels from ``max(k, TOP5_DEPTH)`` neighbours (module doc); the rows still short (a class
    with more images than that around the query) take the rest from a plain search of those rows alone, 4× deeper
    each time, up to the whole gallery, so the guarantee holds whatever the class sizes.
    """
    from arcfold.postprocess import fill_labels, rerank_pipeline, vote_labels
    from arcfold.search import search

    labels = np.asarray(gallery_labels, dtype=object)  # (N,)
    new, threshold = _new_label_for(fmt, vote, new_label)
    top5 = fmt == "top5"
    depth = min(max(vote["k"], TOP5_DEPTH) if top5 else vote["k"], len(labels))
    sims, idx = rerank_pipeline(query, gallery, steps, depth, **search_kwargs)  # (Q, depth)
    voted, scores = vote_labels(
        idx, sims, labels, k=min(vote["k"], depth), mode=vote["mode"], new_label=new, threshold=threshold, top=5,
        fill=top5,
    )  # fmt: skip
    width = top5_width(labels.tolist(), vote, new_label) if top5 else 0
    while depth < len(labels):
        short = np.flatnonzero((~np.isnan(scores)).sum(axis=1) < width)  # (S,)
        if not len(short):
            break
        depth = min(4 * depth, len(labels))
        log.info("top5: %d queries have fewer than %d labels among their neighbours: a plain search %d deep",
                 len(short), width, depth)  # fmt: skip
        deep_sims, deep_idx = search(query[short], gallery, depth, **search_kwargs)  # (S, depth)
        voted[short], scores[short] = fill_labels(voted[short], scores[short], deep_idx, deep_sims, labels,
                                                  mode=vote["mode"])  # fmt: skip
    predictions = [[lab for lab in row if lab not in (None, "")] for row in voted]
    confidences = [float(row[0]) for row in scores]  # NaN: no label
    return predictions, confidences


# --------------------------------------------------------------------------------------------------------------------
# the run


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def run_inference(cfg: InferenceConfig) -> dict[str, Any]:
    """Run the whole inference; returns a summary (paths, counts, timings, the post-processing used)."""
    from arcfold.postprocess import rerank_pipeline
    from arcfold.rerank import load_rerank_spec
    from arcfold.submission import submission_frame, validate_submission, write_submission

    timer = _Timer()
    from arcfold.train import amp_dtype_for, resolve_device

    device = resolve_device(cfg.device, key="device")
    amp_dtype = amp_dtype_for(cfg.amp, device, key="amp")
    with timer("load"):
        query = read_image_table(cfg.query, "query")
        gallery = read_image_table(cfg.gallery, "gallery")
        ensemble = load_ensemble(cfg, device)
        rerank_path = find_rerank_spec(cfg, ensemble)
        rerank = load_rerank_spec(rerank_path) if rerank_path else None
        check_rerank_spec(cfg, rerank, rerank_path)
    steps = rerank["steps"] if rerank else []
    log.info(
        "%s: %d model(s) of %d experiment(s); %d queries, %d gallery images; TTA hflip=%s scales=%s; rerank %s",
        ensemble.name,
        len(ensemble.models),
        len(ensemble.experiments),
        len(query.ids),
        len(gallery.ids),
        cfg.tta.hflip,
        list(cfg.tta.scales),
        f"{rerank['enabled']} ({rerank_path})" if rerank else "off",
    )
    embed = dict(
        tta=cfg.tta,
        batch_size=cfg.batch_size,
        device=device,
        amp_dtype=amp_dtype,
        num_workers=resolve_num_workers(cfg.num_workers, device),
        progress=cfg.progress,
    )
    with timer("embed query"):
        q_members = embed_experiments(ensemble, query.paths, desc="query", **embed)
    with timer("embed gallery"):
        g_members = embed_experiments(ensemble, gallery.paths, desc="gallery", **embed)
    if cfg.fold_pca:
        with timer("fold pca"):
            q_members, g_members = reduce_fold_ensembles(ensemble, q_members, g_members, cfg.fold_pca_dim)
    q, g = combine_experiments(ensemble, q_members), combine_experiments(ensemble, g_members)

    fmt = cfg.submission.format
    vote = dict(rerank["vote"]) if rerank and rerank.get("vote") else None
    if vote is None:
        vote = {"k": cfg.vote.k, "mode": cfg.vote.mode, "threshold": cfg.vote.threshold}
    search_kwargs = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(cfg.search)).items()}
    with timer("search + rerank"):
        if fmt == "retrieval":
            _, idx = rerank_pipeline(q, g, steps, min(cfg.submission.top_k, len(gallery.ids)), **search_kwargs)
            gallery_ids = np.asarray(gallery.ids, dtype=object)
            predictions, confidences = [list(gallery_ids[row]) for row in idx], None
        else:
            predictions, confidences = predict_labels(
                q, g, gallery.labels, steps, vote, fmt=fmt, new_label=cfg.submission.new_label, **search_kwargs
            )
    with timer("submission"):
        frame = submission_frame(
            fmt,
            query.ids,
            predictions,
            confidences,
            id_header=cfg.submission.id_header,
            prediction_header=cfg.submission.prediction_header,
        )
        validate_submission(
            frame,
            fmt,
            query.ids,
            gallery_ids=gallery.ids,
            labels=gallery.labels,
            new_label=cfg.submission.new_label,
            id_header=cfg.submission.id_header,
            prediction_header=cfg.submission.prediction_header,
            min_predictions=top5_width(gallery.labels, vote, cfg.submission.new_label) if fmt == "top5" else None,
        )
        name = cfg.submission.name or ensemble.name
        out = write_submission(Path(cfg.out_dir) / f"{name}.csv", frame)
        if cfg.save_embeddings:
            from arcfold.io import save_npz

            save_npz(
                Path(cfg.out_dir) / f"{name}.npz",
                query_ids=np.asarray(query.ids, dtype=str),
                query=q,
                gallery_ids=np.asarray(gallery.ids, dtype=str),
                gallery=g,
            )
    total = sum(timer.seconds.values())
    log.info(
        "wrote %s (%d rows): %s; total %.1f s",
        out,
        len(frame),
        ", ".join(f"{k} {v:.1f} s" for k, v in timer.seconds.items()),
        total,
    )
    return {
        "submission": str(out),
        "rows": len(frame),
        "format": fmt,
        "models": [f"{m.experiment}/fold{m.fold}" for m in ensemble.models],
        "rerank": {
            "spec": str(rerank_path) if rerank_path else None,
            "steps": steps,
            "vote": vote if fmt != "retrieval" else None,
        },
        "seconds": {**{k: round(v, 2) for k, v in timer.seconds.items()}, "total": round(total, 2)},
    }


def main(argv: list[str] | None = None) -> None:
    from arcfold.cli import setup_logging

    parser = argparse.ArgumentParser(prog="inference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default=None, help="inference YAML (may 'base:' another)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. query.csv=test.csv tta.hflip=true")
    args = parser.parse_args(argv)
    setup_logging()
    import arcfold

    log.info("arcfold from %s", Path(arcfold.__file__).parent)
    cfg = load_inference_config(args.config, args.overrides)
    run_inference(cfg)
