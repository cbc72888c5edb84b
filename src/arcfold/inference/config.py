"""The inference config (:class:`InferenceConfig`): YAML with ``base:`` chains and ``key=value`` overrides,
unknown keys are errors, as for training. What each key does: :mod:`arcfold.inference.run`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from arcfold.artifacts import FULL_FIT
from arcfold.config import load_structured
from arcfold.errors import ConfigError
from arcfold.retrieval.search import INDEX_KINDS
from arcfold.retrieval.submission import FORMATS

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NEW_LABEL",
    "InferenceConfig",
    "SearchConfig",
    "SubmissionConfig",
    "TTAConfig",
    "TableConfig",
    "VoteConfig",
    "load_inference_config",
]


DEFAULT_NEW_LABEL = "new_individual"


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
    index: str = "exact"  # exact | ivf | hnsw | ivfpq (IVF lists of 4-bit PQ codes, re-scored exactly; CPU only)
    backend: str = "auto"  # auto (faiss if installed) | faiss | torch
    device: str = "auto"  # auto (faiss GPU when present) | cpu | cuda
    nlist: int | None = None  # ivf / ivfpq lists; default ~4 sqrt(N)
    # The search knob of ivf, ivfpq / hnsw: nprobe (lists visited per query) / ef_search (HNSW efSearch). null: the
    # smallest value whose recall@min(k, 10) against exact search reaches target_recall on up to 2000 gallery rows
    # held out of the index (a short doubling sweep, logged; retrieval/index_tuning.py); a value given here wins.
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_search: int | None = None
    target_recall: float | None = 0.95  # in (0, 1]; null: no sweep, the former fixed nprobe = nlist / 4, ef_search 128


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
    target = cfg.search.target_recall
    if target is not None and not 0 < target <= 1:
        problems.append(f"search.target_recall must be in (0, 1] or null (got {target})")
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
        sep = " " if len(problems) == 1 else "\n  "  # one problem: one line
        raise ConfigError("invalid inference config:" + sep + sep.join(problems))
