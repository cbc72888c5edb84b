"""One typed configuration for every stage.

Nested dataclasses are the schema; OmegaConf enforces it. A YAML file under ``configs/`` sets what
differs from the defaults and may extend another file with ``base: other.yaml`` (paths relative to
the file, chains allowed). ``key=value`` overrides from the command line are applied last.
Unknown keys and wrong types are errors that name the key and the file, never silently ignored.

The resolved config (defaults + files + overrides) is saved beside every artifact and inside every
checkpoint, so any model can be rebuilt from its checkpoint alone.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from arcfold.errors import ConfigError

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "FoldsConfig",
    "HeadConfig",
    "SamplerConfig",
    "ModelConfig",
    "OptimConfig",
    "PathsConfig",
    "SchedulerConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "load_structured",
]


@dataclass
class DataConfig:
    """Where the training data is and how images are read and augmented."""

    dataset: str = "glyphs"  # data lives in <input_dir>/<dataset>/
    input_dir: str = "input"
    csv: str = "train.csv"  # relative to the data set folder
    image_dir: str = ""  # image paths in the CSV are relative to <input_dir>/<dataset>/<image_dir>
    image_column: str = "image"
    label_column: str = "label"
    group_column: str | None = "group"  # super-class (SOP super_class_id, Happywhale species); null if none
    id_column: str | None = None  # null: the image column is the id
    image_size: int = 64
    augment: str = "light"  # preset name, see arcfold.data.transforms.AUGMENT_PRESETS
    hflip: float = 0.0  # horizontal-flip probability; 0 for characters (a flip changes them), ~0.5 for objects
    # run the preset's batch-level version when it has one (shift): one torch gather per batch on the training
    # device instead of albumentations per image, the same augmentation (arcfold.data.transforms.BatchShift)
    batch_augment: bool = True
    # decode + resize every image once into RAM as uint8: N x S x S x 3 bytes for N images at S = image_size (64 px:
    # 12 KB an image; 1.6M images at 224 px: 240 GB), in every process of a torchrun run. Turn it off when that does
    # not fit comfortably in RAM: images are then decoded each epoch (slower on few CPUs), to the same pixels
    cache_images: bool = True
    num_workers: int = 0  # DataLoader workers; 0 = in-process (best on 2 cores with the cache); never changes results
    check_images: str = "decode"  # before training: "decode" every image, only check it "exists", or "none"
    # true: images that cannot be decoded are left out of training and validation, and counted (fold JSON,
    # log); false (default): any such image is an error naming its row. Missing files are always an error.
    skip_bad_images: bool = False


@dataclass
class FoldsConfig:
    """StratifiedGroupKFold: no group appears in two folds."""

    n_splits: int = 5
    group_column: str | None = None  # null: data.group_column if set, else the class label
    stratify_column: str | None = None  # null: the class label
    min_class_size: int = 2  # drop classes with fewer images (2: every kept image can be a query)
    seed: int = 42
    path: str | None = None  # null: <paths.folds_dir>/<data.dataset>.csv
    # MLRC test split: this fraction of the groups (the folds' group column; ceil(fraction * n_groups) groups drawn
    # with folds.seed) is held out as fold -1, never trained nor validated on; `python -m arcfold test` scores it
    test_fraction: float = 0.0
    test_groups: list[str] = field(default_factory=list)  # or these group values held out (not with test_fraction)


@dataclass
class ModelConfig:
    """Embedding model: timm backbone -> pooling -> neck. Returns (B, embedding_size)."""

    backbone: str = "resnet18"  # any timm model name
    pretrained: bool = False  # timm's own loading (needs the hub cache or internet)
    pretrained_path: str | None = None  # local weights file (offline Kaggle); never touches the network
    pool: str = "gem"  # avg | gem
    gem_p: float = 3.0
    gem_trainable: bool = True
    neck: str = "linear_bn_prelu"  # gp | gp_bn | dp_gp | bn_gp | bn_dp_gp_bn | linear_bn | linear_bn_prelu
    embedding_size: int = 512
    drop_rate: float = 0.0  # dropout: before the linear layer (linear necks) or where the neck names it (dp)
    # timm's output_stride (8, 16 or 32; null: the backbone's own, 32 for ResNets): 16 keeps the last stage at twice
    # the resolution (dilated instead of strided, same weights: re-ID's "last stride 1"); ~1.6x a resnet18's FLOPs
    output_stride: int | None = None
    # timm's stochastic depth: each residual block's branch dropped with a probability rising linearly to this rate
    # over the depth (0 = off; typical 0.05-0.2)
    drop_path_rate: float = 0.0
    # multi-stage fine-tuning: a fresh fold starts from this arcfold checkpoint (backbone, pooling, neck; the head
    # too when it has the same head.name and classes), "{fold}" replaced by the fold trained, e.g.
    # models/omniglot_arcface/fold{fold}.pt. Only the same fold of the same fold file is accepted (another fold's
    # or a full-data model saw this fold's validation rows). Not with pretrained/pretrained_path; resume wins
    init_from: str | None = None


@dataclass
class HeadConfig:
    """The training-only objective on the embeddings: a margin head or a pair/proxy loss, picked by ``name``.

    Margin heads (class centres W, cosine logits, cross-entropy): softmax, norm_softmax, cosface,
    arcface, subcenter_arcface, adacos. Pair/proxy losses from pytorch-metric-learning: contrastive,
    triplet, ntxent, proxy_nca, proxy_anchor, margin, multi_similarity, soft_triple, fastap, snr.
    Margins are in radians for arcface/subcenter_arcface (0.5 rad = 28.6 degrees), in cosine units for
    cosface. See arcfold.models.heads and arcfold.models.losses.
    """

    name: str = "arcface"
    scale: float = 30.0  # s: logit scale; typical 16-64 (norm_softmax: 1/temperature)
    margin: float = 0.3  # m: radians for arcface (typical 0.2-0.5), cosine units for cosface (0.1-0.4)
    subcenters: int = 3  # subcenter_arcface: k sub-centres per class
    # several processes (torchrun): class centres sharded over the ranks, softmax across ranks (Partial FC;
    # arcface/cosface, no dynamic margins, class weights, focal loss); for 100k+ classes. One process: no effect
    sharded: bool = False
    # per-class margins from the class size n (margin heads): none | power (m = a n^-lambda + b) |
    # minmax (n^-1/4 min-max scaled to [margin_min, margin_max], GLR 2020 1st place)
    dynamic_margin: str = "none"
    margin_a: float = 0.5
    margin_lambda: float = 0.25
    margin_b: float = 0.05
    margin_min: float = 0.05
    margin_max: float = 0.5
    margin_warmup_epochs: float = 0.0  # ramp the margin linearly from 0 over this many epochs
    class_weights: str = "none"  # none | inv_log (weight 1/log(1+n), normalised to mean 1)
    loss: str = "ce"  # margin heads: ce | focal
    focal_gamma: float = 2.0
    # pair/proxy losses: extra keyword arguments of the pytorch-metric-learning loss, e.g. {margin: 0.1}
    params: dict[str, Any] = field(default_factory=dict)
    miner: str = "none"  # none | triplet_margin | multi_similarity | batch_hard | pair_margin
    miner_params: dict[str, Any] = field(default_factory=dict)
    direction_gamma: float = 0.0  # Mohan et al. 2020 direction term -gamma cos(p-a, n-a): triplet, proxy_nca, MS


@dataclass
class SamplerConfig:
    """How training batches are drawn."""

    m_per_class: int = 0  # >0: every batch holds batch_size/m classes with m images each; 0: plain shuffle


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # backbone, pooling and neck
    head_lr: float | None = None  # head/loss parameters (class centres, proxies, W); null: 10 x lr
    weight_decay: float = 1e-4  # not applied to biases and norm layers
    momentum: float = 0.9  # sgd only


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | constant
    warmup_epochs: float = 1.0  # linear warm-up, counted in (fractions of) epochs
    warmup_lr_factor: float = 0.01  # warm-up starts at this fraction of the lr
    min_lr_factor: float = 0.01  # cosine ends at this fraction of the lr


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    # gradient accumulation: an optimizer step every accum_steps batches, on their mean loss (the last window of an
    # epoch on its real length); one scheduler step per window, also when a non-finite loss skips the window
    accum_steps: int = 1
    amp: str = "auto"  # auto (fp16 on CUDA, off on CPU) | fp16 | bf16 | off
    grad_clip: float = 5.0  # max gradient norm; 0 disables
    # steps skipped in a row (non-finite loss, or GradScaler's inf/NaN gradients under fp16) before the run
    # stops; the last finished epoch's checkpoint is kept
    max_nonfinite_steps: int = 20
    seed: int = 42  # the fold index is added, so folds differ but each is reproducible
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = False
    limit_train_batches: int = 0  # >0: stop each epoch after this many batches (smoke tests)
    # which epoch's weights and OOF embeddings a fold keeps: last (the schedule decides; the OOF score is an honest
    # estimate) | best (highest validation Recall@1: the epoch is chosen on the fold it is scored on, so the OOF
    # score is optimistic; score and leaderboard flag it). Fold JSONs record the kept and the last epoch's scores
    keep: str = "last"
    # EMA of the weights (timm ModelEmaV3 over the embedding model and the head, BatchNorm statistics averaged too),
    # updated after every applied optimizer step; validation, the kept OOF embeddings and fold<K>.pt use the EMA
    # weights. 0 = off; typical 0.999-0.9998 (fewer steps: lower). Not with head.sharded
    ema_decay: float = 0.0
    # ModelEmaV3's use_warmup: the decay after n updates is min(ema_decay, 1 - n^(-2/3)) (0 at the first update,
    # 0.9 at 32, 0.99 at 1000), so a short run is not dominated by its random init; false: ema_decay from the start
    ema_warmup: bool = True
    # the full-data fit (`--fold full`: every fold's rows, never the test split, no validation, last epoch kept) trains
    # this many epochs; 0: the folds' count (train.epochs with keep=last; keep=best: the median kept epoch + 1 of the
    # finished folds). Its schedule spans its own epochs, each n_all / n_train_fold times a fold's images
    full_epochs: int = 0
    resume: bool = False  # continue an interrupted fold from its last checkpoint
    force: bool = False  # overwrite a finished fold's OOF and weights
    # tqdm bars (image check and caching, each epoch's batches, validation; the main process only). false for logs
    # that are files (nohup, a Kaggle commit, CI), where each refresh adds a line; never changes a result
    progress: bool = True
    # several processes (torchrun): batch_size is the GLOBAL batch of an optimizer step (before accumulation),
    # split evenly over the ranks. sync_bn: SyncBatchNorm, batch statistics over the global batch (CUDA only)
    sync_bn: bool = False
    dist_timeout_s: float = 1800.0  # a rank waiting longer than this for the others (dead or hung) fails


@dataclass
class PathsConfig:
    folds_dir: str = "folds"
    oof_dir: str = "oof"
    models_dir: str = "models"


@dataclass
class ExperimentConfig:
    name: str = ""  # experiment name: oof/<name>/, models/<name>/; empty: the config file's stem
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    # derived locations ---------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.data.input_dir) / self.data.dataset

    @property
    def folds_path(self) -> Path:
        return Path(self.folds.path) if self.folds.path else Path(self.paths.folds_dir) / f"{self.data.dataset}.csv"

    @property
    def oof_dir(self) -> Path:
        return Path(self.paths.oof_dir) / self.name

    @property
    def models_dir(self) -> Path:
        return Path(self.paths.models_dir) / self.name


# Allowed values of the string options that pick a behaviour; components picked by name from a
# registry (pool, neck, head, augment) are checked against their registries when built.
_CHOICES = {
    "data.check_images": ("decode", "exists", "none"),
    "optim.name": ("adamw", "adam", "sgd"),
    "scheduler.name": ("cosine", "constant"),
    "head.dynamic_margin": ("none", "power", "minmax"),
    "head.class_weights": ("none", "inv_log"),
    "head.loss": ("ce", "focal"),
    "train.amp": ("auto", "fp16", "bf16", "off"),
    "train.keep": ("last", "best"),
}


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node[k], full + "."))
    return keys


def _suggest(key: str, schema: DictConfig) -> str:
    close = difflib.get_close_matches(key, _all_keys(schema), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(base: DictConfig, update: Any, source: str, schema: DictConfig) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"{source}: unknown config key '{key}'{_suggest(key, schema)}") from None
    except ValidationError as e:
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"{source}: invalid value for '{e.full_key}': {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def _load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """[(file, mapping)] from the root base to ``path``; ``base:`` is relative to the file naming it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(mapping).__name__}")
    base = mapping.pop("base", None)
    chain: list[tuple[Path, dict]] = []
    if base:
        chain = _load_yaml_chain((path.parent / base), (*seen, path))
    return [*chain, (path, mapping)]


def load_structured(schema_cls: type, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Any:
    """An instance of the dataclass ``schema_cls``: its defaults <- YAML chain (``base:``) <- ``key=value``
    overrides. Unknown keys and wrong types raise :class:`ConfigError` naming the key and the file; the
    caller checks the values (:func:`load_config` for experiments, :mod:`arcfold.infer` for inference)."""
    schema = OmegaConf.structured(schema_cls)
    cfg = schema
    if path is not None:
        for file, mapping in _load_yaml_chain(Path(path)):
            cfg = _merge(cfg, mapping, str(file), schema)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command-line overrides: {e}") from None
    return OmegaConf.to_object(_merge(cfg, dotlist, "command-line override", schema))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Defaults <- YAML chain (``base:``) <- ``key=value`` overrides, validated.

    >>> cfg = load_config(None, ["train.epochs=3", "model.pool=avg"])
    >>> cfg.train.epochs, cfg.model.pool
    (3, 'avg')
    """
    obj: ExperimentConfig = load_structured(ExperimentConfig, path, overrides)
    if not obj.name:
        obj.name = Path(path).stem if path is not None else "default"
    # YAML reads a bare `off` as the boolean false, which the str field then holds as "False"
    if obj.train.amp in ("False", "false"):
        obj.train.amp = "off"
    validate_config(obj)
    return obj


def validate_config(cfg: ExperimentConfig) -> None:
    """Values the type system cannot catch; all problems reported at once.

    One flat list of checks, kept in one function so that every rule of the config reads in one place.
    """
    problems = []
    flat = config_to_dict(cfg)
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = flat[section][name]
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}")
    positive = {
        "data.image_size": cfg.data.image_size,
        "folds.n_splits": cfg.folds.n_splits - 1,  # at least 2 splits
        "model.embedding_size": cfg.model.embedding_size,
        "head.scale": cfg.head.scale,
        "optim.lr": cfg.optim.lr,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size - 1,  # batch norm needs 2+ samples
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "train.accum_steps": cfg.train.accum_steps,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            problems.append(f"{key} is too small (got {flat[key.split('.')[0]][key.split('.')[1]]})")
    if cfg.optim.head_lr is not None and cfg.optim.head_lr <= 0:
        problems.append(f"optim.head_lr must be positive (got {cfg.optim.head_lr})")
    for key, value in {
        "head.margin": cfg.head.margin,
        "head.margin_warmup_epochs": cfg.head.margin_warmup_epochs,
        "head.focal_gamma": cfg.head.focal_gamma,
        "head.direction_gamma": cfg.head.direction_gamma,
        "sampler.m_per_class": cfg.sampler.m_per_class,
        "optim.weight_decay": cfg.optim.weight_decay,
        "train.grad_clip": cfg.train.grad_clip,
        "train.limit_train_batches": cfg.train.limit_train_batches,
        "train.full_epochs": cfg.train.full_epochs,
        "data.num_workers": cfg.data.num_workers,
        "folds.min_class_size": cfg.folds.min_class_size,
        "scheduler.warmup_epochs": cfg.scheduler.warmup_epochs,
        "model.drop_rate": cfg.model.drop_rate,
    }.items():
        if value < 0:
            problems.append(f"{key} must not be negative (got {value})")
    if not 0.0 <= cfg.folds.test_fraction < 1.0:
        problems.append(f"folds.test_fraction is a fraction of the groups in [0, 1) (got {cfg.folds.test_fraction})")
    if cfg.folds.test_fraction > 0 and cfg.folds.test_groups:
        problems.append("folds.test_fraction and folds.test_groups both set: hold out the test split one way only")
    if not 0.0 <= cfg.data.hflip <= 1.0:
        problems.append(f"data.hflip is a probability in [0, 1] (got {cfg.data.hflip})")
    if not 0.0 <= cfg.model.drop_path_rate < 1.0:
        problems.append(f"model.drop_path_rate is in [0, 1) (got {cfg.model.drop_path_rate})")
    if cfg.model.output_stride not in (None, 8, 16, 32):
        problems.append(f"model.output_stride is 8, 16, 32 or null (got {cfg.model.output_stride})")
    if cfg.head.subcenters < 1:
        problems.append(f"head.subcenters must be at least 1 (got {cfg.head.subcenters})")
    m = cfg.sampler.m_per_class
    if m > 0 and (cfg.train.batch_size % m or cfg.train.batch_size // m < 2):
        problems.append(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of sampler.m_per_class={m} "
            "holding at least 2 classes"
        )
    if cfg.head.sharded:
        unsupported = [
            f"head.{key}={value}"
            for key, value, default in [
                ("dynamic_margin", cfg.head.dynamic_margin, "none"),
                ("class_weights", cfg.head.class_weights, "none"),
                ("loss", cfg.head.loss, "ce"),
            ]
            if value != default
        ]
        if cfg.head.name not in ("arcface", "cosface"):
            unsupported.insert(0, f"head.name={cfg.head.name}")
        if unsupported:
            problems.append(
                "head.sharded=true supports head.name=arcface or cosface with a fixed margin, cross-entropy and no "
                f"class weights; not {', '.join(unsupported)}"
            )
    if cfg.train.dist_timeout_s <= 0:
        problems.append(f"train.dist_timeout_s must be positive (got {cfg.train.dist_timeout_s})")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        problems.append(f"train.ema_decay must be in [0, 1) (0 = off; typical 0.999-0.9998), got {cfg.train.ema_decay}")
    if cfg.train.ema_decay > 0 and cfg.head.sharded:
        problems.append("train.ema_decay is not supported with head.sharded=true (each process holds only its rows)")
    if cfg.model.init_from and (cfg.model.pretrained_path or cfg.model.pretrained):
        other = "model.pretrained_path" if cfg.model.pretrained_path else "model.pretrained=true"
        problems.append(f"model.init_from and {other} both set: the starting weights come from one of them")
    if cfg.head.name == "cosface" and not cfg.head.margin < 2.0:  # cos(theta) - m: cosine units, not radians
        problems.append(
            f"head.margin of cosface is in cosine units and must be < 2 (got {cfg.head.margin}; typical 0.1-0.4)"
        )
    elif cfg.head.name != "cosface" and cfg.head.margin >= math.pi:
        problems.append(f"head.margin is in radians and must be < pi (got {cfg.head.margin}); 0.5 rad = 28.6 degrees")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain dict (str/int/float/bool/None only): safe to store in checkpoints and JSON."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_from_dict(mapping: dict[str, Any], source: str = "checkpoint") -> ExperimentConfig:
    """Rebuild a config stored by :func:`config_to_dict` (same schema checks as files)."""
    schema = OmegaConf.structured(ExperimentConfig)
    obj: ExperimentConfig = OmegaConf.to_object(_merge(schema, mapping, source, schema))  # type: ignore[assignment]
    return obj


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
