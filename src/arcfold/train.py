"""Train stage: one fold of one experiment, validated every epoch; the last (or the best) epoch kept.

Files (``<exp>`` = ``cfg.name``, ``K`` = fold):

* ``models/<exp>/fold<K>/``: work folder while training — ``last.pt`` (full training state, written
  every epoch: resume point), ``best_e<E>.pt`` / ``best_oof_e<E>.npz`` (the kept epoch E's weights and
  validation embeddings; the name predates ``train.keep``), ``history.csv`` (one row per epoch), ``train.log``.
* When the fold finishes: ``models/<exp>/fold<K>.pt`` (the kept epoch's embedding weights + config),
  ``oof/<exp>/fold<K>.npz`` (ids, images, labels, groups, L2-normalised embeddings of the held-out
  fold at the kept epoch), ``oof/<exp>/fold<K>.json`` (scores), ``oof/<exp>/fold<K>.config.yaml``.
  The OOF ``.npz`` is written last and marks the fold as finished: a finished fold is never
  overwritten without ``train.force=true``.

Validation is leave-one-out retrieval inside the held-out fold (whose classes were never trained
on): Recall@1/2/4/5/8/10 and MAP@R. Which epoch the fold keeps is ``train.keep``:

* ``last`` (default): the last epoch; the schedule decides, so the OOF score is an honest estimate. Only the
  last epoch's files are written.
* ``best``: the epoch with the highest validation Recall@1 (the first of ties), its files written at each
  improvement. The epoch is then chosen on the fold it is scored on: the OOF score is optimistic, and score and
  leaderboard flag it ("epoch chosen on the validation fold").

Full-data fit (``--fold full``, :data:`~arcfold.models.embedding.FULL_FIT`): the same loop on every row of every fold
(never the test split, fold -1), seeded with ``train.seed + n_splits``, with no validation set: no OOF, no per-epoch
validation, the last epoch kept. Work folder ``models/<exp>/full/``; outputs ``models/<exp>/full.pt`` (the format of
``fold<K>.pt``, ``"fold": "full"``), ``full.config.yaml`` and ``full.json`` (written last: marks it finished; epochs
and the rule that chose them, images, classes, time, commit, fold file). Epochs: :func:`full_fit_epochs`, fixed
when the run starts (``last.pt`` keeps them for a resume); the schedule spans them.

``fold<K>.json`` holds the kept epoch's scores at the top level (``recall@1``, ..., ``map@r``, ``n_queries``)
with ``keep`` and ``kept_epoch``, the last epoch's as ``last_epoch`` and ``last`` (``{metric: value}``), and
``best_epoch``, the kept epoch's old name (kept for readers of older files, whose folds always kept the best).

EMA and multi-stage fine-tuning: with ``train.ema_decay > 0`` an EMA of the model and head is kept
(:mod:`arcfold.ema`); validation, the kept OOF embeddings and ``fold<K>.pt`` are the EMA weights', and the fold JSON
records ``ema_decay`` / ``ema_warmup`` (``history.csv``: the decay of each epoch's last update). ``model.init_from``
starts a fresh fold from a finished fold's checkpoint (:mod:`arcfold.init_from`; the fold JSON records
``init_from``: path, fold, epoch, whether the head was loaded). For it, ``fold<K>.pt`` also holds the head's state
dict and class list (``head``, ``classes``; not for a sharded head) and the fold file's ``folds_sha256``.

Crashes and resume
------------------
An epoch counts as done once its ``last.pt`` is written, after its kept-epoch files and ``history.csv``.
A run killed at any point (SIGKILL, power loss) resumes with ``train.resume=true`` from the last
*finished* epoch: a kill mid-epoch or during validation loses that epoch's progress, which is then
trained again. Every epoch reseeds Python, NumPy, torch, the augmentations and the sampler from
``(seed, fold, epoch)``, and ``last.pt`` holds model, head, optimizer, scheduler, GradScaler, EMA, best and
kept epoch and history, so on a deterministic device a resumed run ends bit-identical to one never
interrupted (tests/test_reliability_resume.py). Resuming with another config is refused (the keys that
differ are listed), except for keys that do not change the result (``train.progress``, paths, ...).

Safety: one process per fold (``models/<exp>/.fold<K>.lock``; a second one is refused at once);
non-finite losses, and steps GradScaler skips for inf/NaN gradients, are skipped and counted, and
``train.max_nonfinite_steps`` of them in a row stop the run with the last good checkpoint kept.

Several processes (DistributedDataParallel)
-------------------------------------------
Under ``torchrun`` (``NPROC_PER_NODE=2 bash train_fold.sh 0``; docs/distributed.md) every process trains the fold
on its slice of each global batch (``train.batch_size`` is the global batch; :class:`ShardedBatchSampler`). DDP
wraps one module holding the embedding model *and* the head or loss (:class:`DistributedTrainStep`), so the head's
gradients are all-reduced like the backbone's and its weights stay identical on every rank; a sharded head
(``head.sharded``, Partial FC) stays outside DDP, each rank holding its own rows. Pair/proxy losses see the global
batch through pytorch-metric-learning's ``DistributedLossWrapper``. Accumulation steps run under ``no_sync()``.
Validation embeddings are computed on row shards and gathered back in the fold-file order. Only rank 0 takes the
fold lock, prepares the data and folds, and writes files and logs; every rank reads the same ``last.pt`` to
resume. The non-finite checks are all-reduced, so every rank skips the same steps.

CLI::

    python -m arcfold train --config configs/glyphs_arcface.yaml --fold 0 [key=value ...]
    python -m arcfold train --config configs/glyphs_arcface.yaml --fold 0..4,full    # the folds, then the full fit
    torchrun --standalone --nproc_per_node 2 -m arcfold train --config ... --fold 0 [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from arcfold.config import ConfigError, ExperimentConfig, config_to_dict, config_to_yaml
from arcfold.data.dataset import ImageDataset
from arcfold.data.samplers import ShardedBatchSampler, build_sampler, global_batches
from arcfold.data.table import (
    FOLD,
    GROUP,
    ID,
    IMAGE,
    LABEL,
    DataValidationError,
    check_image_files,
    image_root,
    resolve_image_paths,
)
from arcfold.data.transforms import BatchNormalise, build_eval_transform, build_train_transform, collate_uint8
from arcfold.distributed import (
    DistContext,
    dist_context,
    gather_rows,
    on_rank0,
    process_group,
    reduce_mean,
    shard_range,
)
from arcfold.ema import WeightEma, build_ema
from arcfold.embed import extract_embeddings
from arcfold.folds import TEST_FOLD, ensure_folds, file_sha256, verify_fold_file
from arcfold.init_from import init_weights_from, load_init_checkpoint
from arcfold.io import (
    ArtifactExistsError,
    CorruptFileError,
    atomic_path,
    fault_point,
    file_lock,
    load_json,
    load_npz,
    load_torch,
    remove_stale_temp_files,
    save_json,
    save_npz,
    save_text,
    save_torch,
)
from arcfold.metrics import DEFAULT_KS, retrieval_metrics
from arcfold.models.embedding import FULL_FIT, build_model, embedding_checkpoint, fold_name
from arcfold.models.heads import build_head, margin_warmup_factor
from arcfold.models.losses import LOSSES
from arcfold.prepare import ensure_dataset

log = logging.getLogger(__name__)

__all__ = [
    "DistributedTrainStep",
    "FoldPaths",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "full_fit_epochs",
    "parse_folds",
    "train_fold",
]

TRAIN_STATE_FORMAT = "arcfold.train_state/1"
# config keys that may differ between a run and its resumption: they do not change what is computed (each is
# tried by tests/test_reliability_resume_keys.py; train.device only as long as the kind of device stays the same)
RESUME_MAY_DIFFER = (
    "train.resume",
    "train.force",
    "train.progress",
    "train.device",
    "train.max_nonfinite_steps",
    "train.dist_timeout_s",
    "data.input_dir",
    "data.num_workers",
    "data.check_images",
    "data.cache_images",
    "paths.folds_dir",
    "paths.oof_dir",
    "paths.models_dir",
)


class NonFiniteLossError(FloatingPointError):
    """Too many training steps in a row were skipped for a non-finite loss or non-finite gradients."""


class NonFiniteGuard:
    """Counts skipped steps: non-finite losses, and optimizer steps skipped for inf/NaN gradients (by GradScaler
    under fp16, by a check of the gradient norm otherwise).

    ``in_a_row`` carries over epoch boundaries (it is part of the resume state); ``limit`` in a row raise
    :class:`NonFiniteLossError`.
    """

    def __init__(self, limit: int, in_a_row: int = 0) -> None:
        self.limit, self.in_a_row = limit, in_a_row

    def skipped(self, where: str, what: str) -> None:
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} training steps in a row skipped (train.max_nonfinite_steps={self.limit}), "
                f"the last at {where}: {what}. Lower optim.lr, check head.scale/head.margin and the data, "
                "or use train.amp=bf16/off"
            )

    def ok(self) -> None:
        self.in_a_row = 0


class FoldPaths:
    """Where one fold's artifacts live (see the module docstring); ``fold="full"``: the full-data fit's."""

    def __init__(self, cfg: ExperimentConfig, fold: int | str) -> None:
        self.cfg, self.fold = cfg, fold
        self.full = fold == FULL_FIT
        self.name = fold_name(fold)  # fold<K> | full
        self.what = "the full fit" if self.full else f"fold {fold}"
        self.work = cfg.models_dir / self.name
        self.weights = cfg.models_dir / f"{self.name}.pt"
        self.oof = cfg.oof_dir / f"{self.name}.npz"  # folds only: the full fit has no OOF
        # the full fit's JSON and config sit beside its weights (oof/<exp>/ holds only what has OOF embeddings)
        self.scores = (cfg.models_dir if self.full else cfg.oof_dir) / f"{self.name}.json"
        self.config = (cfg.models_dir if self.full else cfg.oof_dir) / f"{self.name}.config.yaml"
        self.done = self.scores if self.full else self.oof  # written last: marks the run finished
        self.last = self.work / "last.pt"
        self.history = self.work / "history.csv"
        self.log_file = self.work / "train.log"
        self.lock = cfg.models_dir / f".{self.name}.lock"

    # The kept epoch's files carry its number: a run killed after writing them but before its resume
    # point (last.pt) leaves files that last.pt does not name, and they are never mistaken for the kept ones.
    def best(self, epoch: int) -> Path:
        return self.work / f"best_e{epoch}.pt"

    def best_oof(self, epoch: int) -> Path:
        return self.work / f"best_oof_e{epoch}.npz"

    def remove_best_except(self, epoch: int) -> None:
        keep = {self.best(epoch).name, self.best_oof(epoch).name}
        for p in [*self.work.glob("best_e*.pt"), *self.work.glob("best_oof_e*.npz")]:
            if p.name not in keep:
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# small pieces


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without it is a :class:`ConfigError` naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available; use {key}=cpu or auto")
    return device


def training_device(name: str, ctx: DistContext) -> torch.device:
    """:func:`resolve_device`; under torchrun CUDA means ``cuda:LOCAL_RANK`` (one GPU per process), made current."""
    device = resolve_device(name)
    if ctx.enabled and device.type == "cuda":
        if name not in ("auto", "cuda"):
            raise ConfigError(
                f"train.device={name}: under torchrun every process uses the GPU of its LOCAL_RANK; "
                "use train.device=cuda or auto (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
            )
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return device


def amp_dtype_for(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """None means full fp32. fp16 needs a GradScaler; bf16 (same exponent range as fp32) does not."""
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if amp == "fp16" and device.type == "cpu":
        raise ConfigError(f"{key}=fp16 is not supported on CPU; use bf16 or off")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, warmup_factor: float, min_factor: float, name: str) -> float:
    """Multiplier of every group's base lr at optimizer step ``step``: linear warm-up, then cosine or constant.

    Written here rather than with timm's CosineLRScheduler because timm's ``lr_min`` and
    ``warmup_lr_init`` are absolute values shared by all groups, while the head trains at a higher lr
    than the backbone: a multiplier keeps every group's schedule proportional to its own lr.
    """
    if warmup > 0 and step < warmup:
        return warmup_factor + (1.0 - warmup_factor) * step / warmup
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(cfg: ExperimentConfig, model: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    o = cfg.optim
    head_lr = o.head_lr if o.head_lr is not None else 10 * o.lr
    # timm puts biases, norm layers and scalars (GeM p, PReLU slope) in a no-weight-decay group
    groups = [{**g, "lr": o.lr} for g in param_groups_weight_decay(model, o.weight_decay)]
    groups += [{**g, "lr": head_lr} for g in param_groups_weight_decay(head, o.weight_decay)]
    groups = [g for g in groups if len(g["params"])]
    kwargs: dict[str, Any] = {"momentum": o.momentum} if o.name == "sgd" else {}
    # foreach: one multi-tensor kernel per update instead of a Python loop over ~100 tensors. PyTorch
    # only defaults to it on CUDA; on CPU it made a resnet18 step at 64 px ~4% faster (benchmarks/).
    return create_optimizer_v2(groups, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, foreach=True, **kwargs)


def git_commit() -> str:
    """The code's commit (``git describe --always --dirty``), or "-" outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "-"


def save_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def _attach_file_log(path: Path) -> logging.Handler:
    """Send arcfold's log records to ``path`` (appended: a resumed run continues the log of the killed one).

    The file gets INFO records even when nobody configured logging (``train_fold`` called from a notebook):
    the ``arcfold`` logger is lowered to INFO while the handler is attached, and restored by
    :func:`_detach_file_log`; with no other handler configured, the console still shows warnings only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("arcfold")
    handler.previous_level = logger.level  # type: ignore[attr-defined]
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def _detach_file_log(handler: logging.Handler) -> None:
    logger = logging.getLogger("arcfold")
    logger.removeHandler(handler)
    logger.setLevel(handler.previous_level)  # type: ignore[attr-defined]
    handler.close()


class DistributedTrainStep(nn.Module):
    """What DistributedDataParallel wraps: the embedding model and (unless it is sharded) the head or loss.

    ``forward(images, labels)`` returns the loss, or the embeddings when ``head`` is None (a sharded head is
    applied outside DDP: its weights differ per rank by design). Keeping the head inside is what makes DDP
    all-reduce the head's gradients: a head outside DDP would drift apart on every rank.

    ``embedding_grad_factor`` multiplies the gradient reaching the embeddings. Pair/proxy losses compute the
    global-batch loss L on every rank (``DistributedLossWrapper``), whose gradient reaches only the rank's own
    embeddings; with a factor of world_size, DDP's average over the ranks gives the backbone the gradient of L,
    while the proxies (identical gradient on every rank) keep theirs.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None, embedding_grad_factor: float = 1.0) -> None:
        super().__init__()
        self.model, self.head, self.embedding_grad_factor = model, head, embedding_grad_factor

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.model(images)  # (B, D)
        if self.embedding_grad_factor != 1.0 and embeddings.requires_grad:
            factor = self.embedding_grad_factor
            embeddings.register_hook(lambda grad: grad * factor)
        return embeddings if self.head is None else self.head(embeddings, labels)


class _GlobalPairLoss(nn.Module):
    """A :class:`arcfold.models.losses.PairLossHead` on the global batch: PML's ``DistributedLossWrapper`` and
    ``DistributedMinerWrapper`` all-gather the embeddings and labels of every rank. Returns L, the loss of the
    global batch (the wrapper returns world_size * L), the same on every rank. The head object itself is kept
    unchanged, so its state dict (saved in ``last.pt``) has the same keys as in one process."""

    def __init__(self, head: nn.Module, world_size: int) -> None:
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

        super().__init__()
        self.world_size = world_size
        self.margin_factor = 1.0  # interface parity; pair losses ignore it
        self.loss = DistributedLossWrapper(head.loss)
        self.miner = DistributedMinerWrapper(head.miner) if head.miner is not None else None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()  # (B, D)
            indices_tuple = self.miner(embeddings, labels) if self.miner is not None else None
            return self.loss(embeddings, labels, indices_tuple) / self.world_size


def build_sharded_head(cfg: ExperimentConfig, n_classes: int, ctx: DistContext) -> nn.Module:
    """The class-sharded margin head (``head.sharded``): this rank's rows of the class centres.

    The rows are those of the unsharded head a single process would build at this point (made on the CPU and
    dropped again: C x D fp32 of host memory for a moment, 2 GiB at 1M x 512), so that the run starts from the
    single-process weights and draws the same random numbers afterwards.
    """
    from arcfold.models.partial_fc import SHARDED_KINDS, ShardedMarginHead

    if cfg.head.name not in SHARDED_KINDS:
        raise ConfigError(f"head.sharded=true supports head.name={' or '.join(SHARDED_KINDS)}, not {cfg.head.name}")
    full = build_head(cfg.head, cfg.model.embedding_size, n_classes).state_dict()  # (C, D), the 1-process init
    with torch.random.fork_rng(devices=[]):  # the shard's own random init must not shift the random stream
        head = ShardedMarginHead(
            cfg.head.name,
            cfg.model.embedding_size,
            n_classes,
            scale=cfg.head.scale,
            margin=cfg.head.margin,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
    with torch.no_grad():
        head.load_full_state_dict(full)
    return head


def _to_cpu(obj: Any) -> Any:
    """Tensors of a nested dict/list moved to the CPU (to gather optimizer states across ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# the fold


def check_fold_state(paths: FoldPaths, resume: bool, force: bool) -> str:
    """'done' (finished, nothing to do), 'resume', or 'fresh'. Refuses to lose work silently."""
    if paths.done.exists():
        if force:
            return "fresh"
        if resume:
            return "done"
        raise ArtifactExistsError(
            f"{paths.what} of experiment '{paths.cfg.name}' is finished ({paths.done}); "
            "pass train.force=true to train it again and overwrite it"
        )
    if paths.last.exists():
        if resume:
            return "resume"
        if not force:
            raise ArtifactExistsError(
                f"an unfinished run of {paths.what} exists ({paths.last}); "
                "pass train.resume=true to continue it or train.force=true to start over"
            )
    return "fresh"


def train_fold(
    cfg: ExperimentConfig, fold: int | str, on_epoch_end: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train, validate and save one fold; return its scores (the content of ``fold<K>.json``).

    ``fold="full"`` (:data:`FULL_FIT`): the full-data fit (see :func:`full_fit_epochs`), no validation; returns
    the content of ``models/<exp>/full.json``.

    ``on_epoch_end(row)`` is called after each validated epoch with its ``history.csv`` row (epoch,
    losses, Recall@K, MAP@R), once the epoch's files are written and before its resume point is: an
    exception there (e.g. optuna's ``TrialPruned``) stops the fold and a resume replays that epoch.
    """
    paths = FoldPaths(cfg, fold)
    ctx = dist_context()  # several processes under torchrun; one otherwise
    device = training_device(cfg.train.device, ctx) if ctx.enabled else None
    with contextlib.ExitStack() as stack:
        if ctx.enabled:
            stack.enter_context(process_group(ctx, device, cfg.train.dist_timeout_s))
            if not ctx.is_main:  # rank 0 logs for the job; the others only warn
                arcfold_log = logging.getLogger("arcfold")
                stack.callback(arcfold_log.setLevel, arcfold_log.level)
                arcfold_log.setLevel(logging.WARNING)

        def claim() -> tuple[str, dict[str, Any] | None]:  # rank 0 only: the lock, the state, the cleanup
            # one process per fold: a second train of the same fold (two terminals, a re-queued job) is refused
            stack.enter_context(file_lock(paths.lock, blocking=False, what=f"{paths.what} of experiment '{cfg.name}'"))
            state = check_fold_state(paths, cfg.train.resume, cfg.train.force)
            if state == "done":
                what, done = paths.what, paths.done
                log.info("%s of '%s' is already finished: %s (train.force=true retrains it)", what, cfg.name, done)
                _remove_work_files(paths)  # left by a kill between writing the OOF file and cleaning up
                return state, load_json(paths.scores, hint="Retrain the fold with train.force=true.")
            if state == "fresh" and paths.work.exists():
                shutil.rmtree(paths.work)
            # temporary files of writes a kill interrupted (nothing else writes this fold's files: we hold its lock)
            stem = f"{paths.name}."
            for folder, prefix in ((paths.work, ""), (cfg.oof_dir, stem), (cfg.models_dir, stem)):
                remove_stale_temp_files(folder, prefix)
            return state, None

        state, scores = on_rank0(ctx, claim)
        if state == "done":
            return scores  # type: ignore[return-value]
        handler = _attach_file_log(paths.log_file) if ctx.is_main else None
        try:
            return _train_fold(cfg, fold, paths, state == "resume", on_epoch_end, ctx, device)
        except NonFiniteLossError as e:
            kept = (
                f"the last good checkpoint is kept: {paths.last} (resume with train.resume=true)"
                if paths.last.exists()
                else "no epoch had finished, so there is no checkpoint to keep"
            )
            log.error("%s stopped: %s; %s", paths.what, e, kept)
            raise NonFiniteLossError(f"{e}; {kept}") from None
        finally:
            if handler is not None:
                _detach_file_log(handler)


def _train_fold(
    cfg: ExperimentConfig,
    fold: int | str,
    paths: FoldPaths,
    resume: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    ctx: DistContext | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    ctx = ctx or DistContext()
    progress = cfg.train.progress and ctx.is_main
    started = time.time()
    ckpt = None
    if resume:  # read (and check) the resume point first: a refusal should not wait for the data
        ckpt = load_torch(paths.last, hint="Start the fold over with train.force=true.")
        if not isinstance(ckpt, dict) or ckpt.get("format") != TRAIN_STATE_FORMAT:
            raise CorruptFileError(
                f"{paths.last} is not an arcfold training state; start the fold over with train.force=true"
            )
        check_resume_config(ckpt["config"], cfg, paths.last)
    n_epochs, full_epochs = cfg.train.epochs, None
    if paths.full:  # the epoch count is fixed when the full fit starts: a resume continues with it
        full_epochs = ckpt["full_epochs"] if ckpt is not None else full_fit_epochs(cfg)
        n_epochs = full_epochs["epochs"]
        log.info("full fit of '%s': %d epochs (%s)", cfg.name, n_epochs, full_epochs["epochs_rule"])
    # rank 0 makes the data set and the fold file (once, under their locks); the others wait, then read them
    folds_path = on_rank0(ctx, lambda: (ensure_dataset(cfg), ensure_folds(cfg))[1])
    folds_df = verify_fold_file(folds_path)  # the CSV the folds stage wrote (hash, folds, groups), else an error
    folds_df = folds_df[folds_df[FOLD] != TEST_FOLD].reset_index(drop=True)  # the test split: never trained on
    n_splits = int(folds_df[FOLD].max()) + 1
    if not paths.full and not 0 <= fold < n_splits:
        raise ValueError(f"fold {fold} does not exist: {folds_path} has folds 0..{n_splits - 1}")
    folds_sha256 = file_sha256(folds_path)
    init = None  # model.init_from on a fresh fold (a resumed one continues from last.pt): checked before the data
    if ckpt is None and cfg.model.init_from:
        init = load_init_checkpoint(cfg, fold, folds_sha256)
    root = image_root(cfg.data)
    # The folds stage decoded every image already (data.check_images); here, per fold, only check the
    # files are still there: decoding 1.6M landmark images again for every fold would cost minutes.
    # With data.skip_bad_images the decode is needed to know which images to leave out.
    check = "exists" if cfg.data.check_images == "decode" else cfg.data.check_images
    if cfg.data.skip_bad_images and check != "none":
        check = "decode"
    bad = check_image_files(
        folds_df, root, mode=check, source=folds_path, progress=progress, skip_bad=cfg.data.skip_bad_images
    )
    is_bad = np.zeros(len(folds_df), dtype=bool)
    is_bad[bad] = True
    in_val = (folds_df[FOLD] == fold).to_numpy()  # the full fit: no row (it trains on every fold)
    skipped_images = {"train": int((is_bad & ~in_val).sum()), "validation": int((is_bad & in_val).sum())}
    if is_bad.any():
        log.warning(
            "%s: leaving out %d training and %d validation images that cannot be decoded (data.skip_bad_images)",
            paths.what,
            skipped_images["train"],
            skipped_images["validation"],
        )
    train_df = folds_df[~in_val & ~is_bad].reset_index(drop=True)
    val_df = folds_df[in_val & ~is_bad].reset_index(drop=True)
    if not paths.full and not (val_df[LABEL].map(val_df[LABEL].value_counts()) >= 2).any():
        raise DataValidationError(
            f"{folds_path}: fold {fold} has no query: its {len(val_df)} images are all in one-image classes, so "
            "validation has nothing to retrieve. Remake the folds with folds.min_class_size >= 2 (--force)"
        )
    classes = np.sort(train_df[LABEL].unique())
    train_labels = np.searchsorted(classes, train_df[LABEL].to_numpy())  # contiguous ids 0..C-1
    log.info(
        "experiment '%s' %s: train %d images / %d classes, validation %d images / %d classes",
        cfg.name,
        paths.what,
        len(train_df),
        len(classes),
        len(val_df),
        val_df[LABEL].nunique(),
    )

    device = device or resolve_device(cfg.train.device)
    amp_dtype = amp_dtype_for(cfg.train.amp, device)
    base_seed = cfg.train.seed + (n_splits if paths.full else fold)  # the full fit: a seed no fold uses
    seed_everything(base_seed)

    size = cfg.data.image_size
    # uint8 out of the augmentation; the loader (CPU) or the device (CUDA) normalises whole batches
    train_tf = build_train_transform(cfg.data.augment, size, cfg.data.hflip, seed=base_seed, normalise=False)
    cache = cfg.data.cache_images
    train_ds = ImageDataset(
        resolve_image_paths(train_df, root),
        train_labels,
        train_tf,
        cache=cache,
        size=size,  # resized when read, cached or not: read_image, the resize of OOF and inference too
        progress=progress,
    )
    val_ds = ImageDataset(
        resolve_image_paths(val_df, root),
        None,
        build_eval_transform(size),
        cache=cache,
        size=size,
        progress=progress,
    )
    if len(train_ds) < cfg.train.batch_size:
        raise ValueError(f"{paths.what}: {len(train_ds)} training images, fewer than train.batch_size")
    _check_distributed_config(cfg, ctx, device)

    model = build_model(cfg.model).to(device)
    class_counts = np.bincount(train_labels, minlength=len(classes))  # dynamic margins, class weights
    if cfg.head.sharded and ctx.enabled:
        head = build_sharded_head(cfg, len(classes), ctx).to(device)
    else:
        head = build_head(cfg.head, cfg.model.embedding_size, len(classes), class_counts=class_counts).to(device)
    class_names = [str(c) for c in classes]  # the head's rows in order: stored in fold<K>.pt for model.init_from
    init_info = None  # what model.init_from loaded, for the fold JSON
    if init is not None:  # (path, checkpoint), dropped once copied
        init_info = init_weights_from(*init, cfg, model, head, class_names, sharded=cfg.head.sharded and ctx.enabled)
        init = None
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn and ctx.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict keys as BatchNorm
    optimizer = build_optimizer(cfg, model, head)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = build_ema(model, head, cfg.train.ema_decay, cfg.train.ema_warmup)  # None when train.ema_decay=0

    # m-per-class batches (pair/proxy losses need positives in every batch); reseeded per epoch below
    m = cfg.sampler.m_per_class
    sampler = build_sampler(train_labels, m, cfg.train.batch_size, seed=base_seed) if m else None
    if sampler is None and cfg.head.name in LOSSES and ctx.is_main:
        log.warning(
            "head.name=%s compares images within a batch, but batches are plain shuffles with few positive "
            "pairs: set sampler.m_per_class (e.g. 4)",
            cfg.head.name,
        )
    n_batches = len(train_ds) // cfg.train.batch_size  # drop_last: batch norm needs full batches
    if cfg.train.limit_train_batches:
        n_batches = min(n_batches, cfg.train.limit_train_batches)
    updates_per_epoch = math.ceil(n_batches / cfg.train.accum_steps)
    total_updates = updates_per_epoch * n_epochs
    warmup = round(cfg.scheduler.warmup_epochs * updates_per_epoch)
    s = cfg.scheduler
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_updates, warmup, s.warmup_lr_factor, s.min_lr_factor, s.name),
    )

    start_epoch, best, history = 0, {"epoch": -1, "metrics": {"recall@1": -1.0}}, []
    kept: dict[str, Any] = {"epoch": -1, "metrics": {}}  # the epoch the fold keeps so far (train.keep)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    sharded = cfg.head.sharded and ctx.enabled
    if ckpt is not None:  # every rank reads the same resume point
        # train.device may be spelled otherwise (RESUME_MAY_DIFFER), but another kind of device computes otherwise
        if ckpt.get("device_type", device.type) != device.type:
            raise ArtifactExistsError(
                f"{paths.last} was trained on {ckpt['device_type']}, this run is on {device.type} (train.device="
                f"{cfg.train.device}), which would change the result; resume on {ckpt['device_type']}, or start "
                "over with train.force=true"
            )
        model.load_state_dict(ckpt["model"])
        if sharded:
            head.load_full_state_dict(ckpt["head"])
            optimizer.load_state_dict(_sharded_optimizer_state(ckpt, ctx, paths.last))
        else:
            head.load_state_dict(ckpt["head"])
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        init_info = ckpt.get("init_from")
        start_epoch, best, kept, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["kept"], ckpt["history"]
        guard.in_a_row = int(ckpt.get("nonfinite_in_a_row", 0))
        if kept["epoch"] >= 0 and ctx.is_main:
            paths.remove_best_except(kept["epoch"])  # files of an epoch the kill cut short (it is retrained)
        log.info("resuming %s from epoch %d (best so far: epoch %d)", paths.what, start_epoch, best["epoch"])

    params = [p for group in optimizer.param_groups for p in group["params"]]
    collate, device_normalise = build_train_collate(device)
    ddp = build_ddp(cfg, model, head, ctx, device) if ctx.enabled else None
    keep_best = cfg.train.keep == "best" and not paths.full  # the full fit has no validation: it keeps its last
    for epoch in range(start_epoch, n_epochs):
        epoch_seed = base_seed * 1000 + epoch  # each epoch reproducible on its own, so resume replays it exactly
        seed_everything(epoch_seed)
        # augmentation seeded per sample from (epoch_seed, index): the same pixels whatever data.num_workers; the
        # ranks take disjoint indices, so they augment different images, each as the single-process run does
        train_ds.set_augment_seed(epoch_seed)
        if sampler is not None:
            sampler.set_epoch(epoch)
        batching: dict[str, Any] = {"batch_size": cfg.train.batch_size, "shuffle": sampler is None, "sampler": sampler}
        if ctx.enabled:  # this rank's slice of each global batch of a single-process run
            batches = global_batches(len(train_ds), cfg.train.batch_size, epoch_seed, sampler)[:n_batches]
            batching = {"batch_sampler": ShardedBatchSampler(batches, ctx.rank, ctx.world_size)}
        loader = DataLoader(
            train_ds,
            **batching,
            drop_last=not ctx.enabled,  # (a batch_sampler makes whole batches itself)
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed),
            persistent_workers=False,
        )
        train_stats = _train_one_epoch(
            cfg, model, head, loader, n_batches, optimizer, scheduler, scaler, params, device, amp_dtype, epoch, guard,
            ddp=ddp, ctx=ctx, sharded_params=list(head.parameters()) if sharded else None, normalise=device_normalise,
            ema=ema,
        )  # fmt: skip
        eval_model, eval_head = (ema.model, ema.head) if ema is not None else (model, head)  # validated and saved

        t0 = time.time()
        metrics: dict[str, Any] = {}  # the full fit has no validation set: nothing to embed or score
        if not paths.full:
            lo, hi = shard_range(len(val_ds), ctx.rank, ctx.world_size)  # each rank embeds its rows, then all gather
            embeddings = extract_embeddings(
                eval_model,
                val_ds if not ctx.enabled else Subset(val_ds, range(lo, hi)),
                batch_size=cfg.train.eval_batch_size,
                device=device,
                amp_dtype=amp_dtype,
                num_workers=cfg.data.num_workers,
                channels_last=cfg.train.channels_last,
                progress=progress,
                desc=f"fold {fold} epoch {epoch} validation",
            )
            embeddings = gather_rows(embeddings, ctx, device)  # (N_val, D) in fold-file order, on every rank
            fault_point("validation")
            metrics = retrieval_metrics(embeddings, val_df[LABEL].to_numpy(), ks=DEFAULT_KS, device=device)
        val_seconds = time.time() - t0
        improved = bool(metrics) and metrics["recall@1"] > best["metrics"]["recall@1"]
        row = {
            "epoch": epoch,
            **train_stats,
            "val_seconds": round(val_seconds, 2),
            **{k: v for k, v in metrics.items() if k.startswith(("recall@", "map@"))},
            "best": improved,
        }
        history.append(row)
        if paths.full:
            log.info(
                "full fit epoch %d (of 0..%d): loss %.4f, %.1f img/s",
                epoch,
                n_epochs - 1,
                train_stats["train_loss"],
                train_stats["train_images_per_s"],
            )
        else:
            log.info(
                "fold %d epoch %d: loss %.4f, %.1f img/s | R@1 %.4f R@5 %.4f R@10 %.4f MAP@R %.4f%s",
                fold,
                epoch,
                train_stats["train_loss"],
                train_stats["train_images_per_s"],
                metrics["recall@1"],
                metrics["recall@5"],
                metrics["recall@10"],
                metrics["map@r"],
                "  (best)" if improved else "",
            )
        if improved:
            best = {"epoch": epoch, "metrics": metrics}
        if improved or not keep_best:
            kept = {"epoch": epoch, "metrics": metrics}
        # the kept epoch's files: at each improvement with keep=best, only for the last epoch with keep=last
        if (improved if keep_best else epoch == n_epochs - 1) and ctx.is_main:
            if not paths.full:
                save_npz(paths.best_oof(epoch), embeddings=embeddings)
            # the head (not a sharded one: each rank holds its rows) and its classes, for model.init_from
            head_extra = {} if sharded else {"classes": class_names, "head": _to_cpu(eval_head.state_dict())}
            save_torch(
                paths.best(epoch),
                embedding_checkpoint(
                    eval_model, cfg, fold=fold, epoch=epoch, metrics=metrics, folds_sha256=folds_sha256, **head_extra
                ),
            )
        if ctx.is_main:
            save_history(paths.history, history)
        if on_epoch_end is not None:
            on_epoch_end(row)
        # collectives first (every rank takes part): the sharded head's full weight, each rank's optimizer state
        head_state = head.full_state_dict() if sharded else head.state_dict()
        optimizer_ranks = None
        if sharded:  # the optimizer holds this rank's rows of the head: keep every rank's state
            optimizer_ranks = [None] * ctx.world_size if ctx.is_main else None
            torch.distributed.gather_object(_to_cpu(optimizer.state_dict()), optimizer_ranks, dst=0)
        if ctx.is_main:
            # the resume point, written last: an epoch counts as done only once everything above is on disk
            save_torch(
                paths.last,
                {
                    "format": TRAIN_STATE_FORMAT,
                    "device_type": device.type,  # resumed on the same kind of device only
                    "config": config_to_dict(cfg),
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "head": head_state,
                    "optimizer": optimizer.state_dict(),
                    **({"optimizer_ranks": optimizer_ranks} if optimizer_ranks is not None else {}),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best": best,
                    "kept": kept,
                    "history": history,
                    "nonfinite_in_a_row": guard.in_a_row,
                    **({"ema": ema.state_dict()} if ema is not None else {}),
                    **({"init_from": init_info} if init_info is not None else {}),
                    **({"full_epochs": full_epochs} if paths.full else {}),
                },
            )
            paths.remove_best_except(kept["epoch"])  # the previously kept epoch's files, now superseded
        if ctx.enabled:
            torch.distributed.barrier()  # the epoch is done for every rank once its resume point is written

    extra: dict[str, Any] = {"skipped_images": skipped_images} if cfg.data.skip_bad_images else {}
    if ema is not None:
        extra.update(ema_decay=cfg.train.ema_decay, ema_warmup=cfg.train.ema_warmup)
    if init_info is not None:
        extra["init_from"] = init_info
    seconds = time.time() - started
    if paths.full:
        fold_sizes = folds_df[FOLD].value_counts()  # the non-test rows of each fold
        extra |= {
            **full_epochs,  # type: ignore[dict-item]
            "n_images": len(train_df),
            "n_classes": len(classes),
            "images_per_epoch": n_batches * cfg.train.batch_size,
            "fold_train_images_mean": float(np.mean(len(folds_df) - fold_sizes.to_numpy())),
        }
        return on_rank0(ctx, lambda: _finalize_full(cfg, paths, kept, history, folds_path, seconds, extra))
    return on_rank0(ctx, lambda: _finalize(cfg, fold, paths, val_df, kept, history, folds_path, seconds, extra))


def build_ddp(
    cfg: ExperimentConfig, model: nn.Module, head: nn.Module, ctx: DistContext, device: torch.device
) -> DistributedDataParallel:
    """DDP around a :class:`DistributedTrainStep` of ``model`` and ``head`` (the head left out when it is sharded;
    a pair/proxy loss on the global batch). Parameters the embedding never uses are frozen first."""
    in_ddp_head, grad_factor = (None if cfg.head.sharded else head), 1.0
    if cfg.head.name in LOSSES:  # pair/proxy losses: on the global batch, see DistributedTrainStep
        in_ddp_head, grad_factor = _GlobalPairLoss(head, ctx.world_size), float(ctx.world_size)
    _freeze_unused_parameters(model, cfg.data.image_size, device)
    return DistributedDataParallel(
        DistributedTrainStep(model, in_ddp_head, grad_factor), device_ids=[device] if device.type == "cuda" else None
    )


def _freeze_unused_parameters(model: nn.Module, image_size: int, device: torch.device) -> None:
    """Stop training the parameters the embedding never depends on (a timm model's classifier-side norm that
    ``forward_features`` skips): DDP waits for a gradient of every trainable parameter. They get no gradient
    in one process either, so nothing changes; found by one backward pass on two blank images in eval mode
    (no batch-norm statistics are updated)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, 3, image_size, image_size, device=device))  # (2, D)
        grads = torch.autograd.grad(out.sum(), [p for _, p in named], allow_unused=True)
    finally:
        model.train(was_training)
    unused = [n for (n, p), g in zip(named, grads, strict=True) if g is None]
    for (_, p), g in zip(named, grads, strict=True):
        if g is None:
            p.requires_grad_(False)
    if unused:
        log.info("parameters the embedding does not use, not trained: %s", ", ".join(unused))


def _check_distributed_config(cfg: ExperimentConfig, ctx: DistContext, device: torch.device) -> None:
    """What the config cannot check alone: the batch split over the ranks, SyncBatchNorm's device."""
    if not ctx.enabled:
        if cfg.train.sync_bn or cfg.head.sharded:
            log.info("train.sync_bn and head.sharded have no effect in a single process")
        return
    w, batch, m = ctx.world_size, cfg.train.batch_size, cfg.sampler.m_per_class
    if batch % w:
        raise ConfigError(f"train.batch_size={batch} is the global batch and must split evenly over the {w} processes")
    if m and (batch // w) % m:
        raise ConfigError(
            f"train.batch_size={batch} over {w} processes is {batch // w} per process, not a multiple of "
            f"sampler.m_per_class={m}: each class's {m} images must stay on one process"
        )
    if cfg.train.sync_bn and device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only")


def _sharded_optimizer_state(ckpt: dict[str, Any], ctx: DistContext, source: Path) -> dict[str, Any]:
    """This rank's optimizer state from a resume point of a sharded head (one state per rank)."""
    states = ckpt.get("optimizer_ranks")
    if states is None or len(states) != ctx.world_size:
        found = "no per-rank state" if states is None else f"{len(states)} processes"
        raise ArtifactExistsError(
            f"{source} was not written by a head.sharded=true run of {ctx.world_size} processes ({found}); resume "
            "with the same number of processes, or start over with train.force=true"
        )
    return states[ctx.rank]


def build_train_collate(device: torch.device) -> tuple[Callable, BatchNormalise | None]:
    """The training loader's ``collate_fn`` for uint8 images (``build_train_transform(..., normalise=False)``) and
    the normalisation left to the device (``None`` on the CPU).

    CPU: the loader stacks and normalises each batch in one numpy pass (float32 out, as ``Normalize ->
    ToTensorV2`` per image gave, bit for bit). CUDA: the loader hands over uint8 (a quarter of the bytes over
    PCIe) and :func:`_train_one_epoch` normalises on the device after the transfer.
    """
    normalise = BatchNormalise(device)
    if device.type == "cpu":
        return functools.partial(collate_uint8, normalise=normalise), None
    return collate_uint8, normalise


def clip_grad_norm_if_needed_(
    params: list[nn.Parameter], clip: float, norm: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, clip)`` bit for bit, without its multiply when it is a no-op.

    The stock function always multiplies every gradient by ``min(1, clip / (norm + 1e-6))``; when that factor is 1
    (the norm is under the threshold, most steps of a normal run) the pass changes nothing and is skipped here.
    The same factor decides, so the gradients are those of ``clip_grad_norm_`` exactly. Returns the total norm
    (``norm`` when given: the sharded head's all-reduced one). The comparison reads the factor on the host: one
    sync under CUDA, where the caller's ``isfinite(norm)`` check syncs anyway.
    """
    if norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if clip > 0 and bool(clip / (norm + 1e-6) < 1.0):  # a NaN norm compares False: nothing to scale
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def _train_one_epoch(
    cfg,
    model,
    head,
    loader,
    n_batches,
    optimizer,
    scheduler,
    scaler,
    params,
    device,
    amp_dtype,
    epoch,
    guard=None,
    *,
    ddp: DistributedDataParallel | None = None,
    ctx: DistContext | None = None,
    sharded_params: list[nn.Parameter] | None = None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ema: WeightEma | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; skips (and counts) non-finite steps, stops after ``guard.limit`` in a row.

    One optimizer step per window of ``train.accum_steps`` batches, on the gradient of the window's mean loss (the
    last window of the epoch may be shorter: its batches are divided by its real length, not by ``accum_steps``).
    The scheduler advances once per window, whether its step was applied or skipped. A window in which a batch
    has a non-finite loss applies no update at all: the gradients of its other batches are dropped too.

    Several processes: ``ddp`` wraps a :class:`DistributedTrainStep` of ``model`` (and ``head``, unless it is
    sharded: then ``sharded_params`` are its parameters, different on every rank). The losses and images
    counted are those of the global batch. ``normalise``: applied to each image batch once it is on ``device``
    (the uint8 batches of :func:`build_train_collate` under CUDA). ``ema``: updated after every applied optimizer
    step (not after a skipped one).
    """
    ctx = ctx or DistContext()
    model.train()
    head.train()
    guard = guard if guard is not None else NonFiniteGuard(cfg.train.max_nonfinite_steps)
    accum, clip = cfg.train.accum_steps, cfg.train.grad_clip
    loss_sum, n_seen, n_skipped, n_steps_skipped = 0.0, 0, 0, 0
    window_bad = False  # a non-finite loss in the current accumulation window: it applies no update
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(total=n_batches, desc=f"epoch {epoch}", disable=not (cfg.train.progress and ctx.is_main), leave=False)
    t0 = time.time()
    warmup_epochs = cfg.head.margin_warmup_epochs  # every head has margin_factor (pair losses ignore it)
    for i, (images, labels) in enumerate(loader):
        if i >= n_batches:
            break
        fault_point("train_batch")
        if warmup_epochs > 0:  # ramp the margin from 0 (hard margins can stall the first epochs)
            head.margin_factor = margin_warmup_factor(epoch + i / n_batches, warmup_epochs)
        images = images.to(device, non_blocking=True)  # (B, 3, H, W) float32, or uint8 when ``normalise`` is given
        labels = labels.to(device, non_blocking=True)
        if normalise is not None:
            images = normalise(images)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        need_update = (i + 1) == n_batches or (i + 1) % accum == 0
        window = min(accum, n_batches - i // accum * accum)  # its real length: the last window may be shorter
        # DDP all-reduces the gradients only on the last micro-batch of an accumulation window
        sync = ddp.no_sync() if ddp is not None and not need_update else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                if ddp is None:
                    loss = head(model(images), labels)
                elif sharded_params is None:
                    loss = ddp(images, labels)  # the head runs inside DDP
                else:
                    loss = head(ddp(images, labels), labels)  # the sharded head, outside DDP
            # the global batch's loss: the same on every rank, so every rank takes the same skip decision
            global_loss = reduce_mean(loss, ctx) if ctx.enabled else loss
            finite = bool(torch.isfinite(global_loss))
            if not finite:
                # an fp16 overflow or a diverging run: rather than poison the weights, the whole window applies
                # no update (the gradients of its other batches are dropped, as GradScaler drops a window whose
                # gradients overflow); the scheduler still advances at the window's end
                n_skipped += 1
                window_bad = True
                guard.skipped(f"epoch {epoch}, batch {i}", f"loss is {global_loss.item()}")
            else:  # the window's mean loss: each batch divided by the window's real length
                scaler.scale(loss / window).backward()
        if need_update:
            if window_bad:  # already counted at its non-finite batch
                step_ok, why = None, ""
            elif sharded_params is not None:  # the norm spans every rank's rows of the head
                if scaler.is_enabled():
                    scaler.unscale_(optimizer)
                norm = _sharded_grad_norm(params, sharded_params)
                step_ok = bool(torch.isfinite(norm))  # the same on every rank (all-reduced)
                if step_ok:
                    clip_grad_norm_if_needed_(params, clip, norm)
                    if scaler.is_enabled():
                        scaler.step(optimizer)  # no rank has an inf/NaN gradient here: none skips
                        scaler.update()
                    else:
                        optimizer.step()
                elif scaler.is_enabled():  # back off on every rank, also where the local rows were finite
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                why = f"gradient norm is {norm.item()}"
            elif scaler.is_enabled():  # fp16: GradScaler skips the step itself when a gradient is inf/NaN
                if clip > 0:
                    scaler.unscale_(optimizer)
                    clip_grad_norm_if_needed_(params, clip)
                scale_before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                step_ok = scaler.get_scale() >= scale_before  # the scale shrinks only after a skipped step
                why = f"GradScaler found inf/NaN gradients at scale {scale_before:g}"
            else:  # fp32/bf16: a finite loss can still give inf/NaN gradients; never apply them
                norm = clip_grad_norm_if_needed_(params, clip)  # the total norm; clipped only above ``clip``
                step_ok = bool(torch.isfinite(norm))
                if step_ok:
                    optimizer.step()
                why = f"gradient norm is {norm.item()}"
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # once per window, applied or skipped: the schedule never drifts
            window_bad = False
            if step_ok:
                guard.ok()
                if ema is not None:
                    ema.update()
            elif step_ok is not None:
                n_steps_skipped += 1
                guard.skipped(f"epoch {epoch}, batch {i}", why)
        elif finite:
            guard.ok()
        if not finite:
            bar.update()
            continue
        loss_sum += global_loss.item() * len(images) * ctx.world_size
        n_seen += len(images) * ctx.world_size
        bar.update()
        bar.set_postfix(loss=f"{global_loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    seconds = time.time() - t0
    if n_skipped or n_steps_skipped:
        log.warning(
            "epoch %d: skipped %d batches with a non-finite loss and %d optimizer steps with inf/NaN gradients",
            epoch,
            n_skipped,
            n_steps_skipped,
        )
    return {
        "train_loss": loss_sum / max(1, n_seen),
        "lr": optimizer.param_groups[0]["lr"],
        "train_images_per_s": n_seen / max(seconds, 1e-9),
        "train_seconds": round(seconds, 2),
        "skipped_batches": n_skipped,
        "skipped_steps": n_steps_skipped,
        **({"ema_decay": ema.last_decay} if ema is not None else {}),  # the decay of the epoch's last update
    }


def _sharded_grad_norm(params: list[nn.Parameter], sharded: list[nn.Parameter]) -> torch.Tensor:
    """The total gradient norm of the model, the replicated parameters counted once and every rank's rows of the
    sharded head once (its squared norm all-reduced): the norm one process would see."""
    shard_ids = {id(p) for p in sharded}
    replicated = [p.grad for p in params if p.grad is not None and id(p) not in shard_ids]
    shard_grads = [p.grad for p in sharded if p.grad is not None]
    device = (replicated or shard_grads)[0].device
    squared = (
        torch.nn.utils.get_total_norm(shard_grads).to(device) ** 2 if shard_grads else torch.zeros((), device=device)
    )
    torch.distributed.all_reduce(squared)
    return torch.sqrt(torch.nn.utils.get_total_norm(replicated).to(device) ** 2 + squared)


def check_resume_config(stored: dict[str, Any], cfg: ExperimentConfig, source: Path) -> None:
    """Refuse to resume with a config that changes the result: the continued run would mix two experiments."""

    def flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in mapping.items():
            if isinstance(value, dict) and key not in ("params", "miner_params"):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    before, now = flat(stored), flat(config_to_dict(cfg))
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in RESUME_MAY_DIFFER)
    if differ:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ArtifactExistsError(
            f"{source} was trained with another config ({detail}); resume with the same settings, or start "
            "over with train.force=true (or train a new experiment: name=...)"
        )


def _remove_work_files(paths: FoldPaths) -> None:
    """Delete the resume point and the best-epoch files once the fold's outputs are written (history and log stay)."""
    for p in [paths.last, *paths.work.glob("best_e*.pt"), *paths.work.glob("best_oof_e*.npz")]:
        p.unlink(missing_ok=True)


def _run_record(history: list[dict], seconds: float, folds_path: Path) -> dict[str, Any]:
    """The fields every finished run records (fold JSON, full.json): speed, time, data, code, skipped steps."""
    return {
        "train_images_per_s": float(np.mean([h["train_images_per_s"] for h in history])),
        "seconds": round(seconds, 1),
        "folds_path": str(folds_path),
        "folds_sha256": file_sha256(folds_path),
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "skipped_batches": int(sum(h.get("skipped_batches", 0) for h in history)),
        "skipped_steps": int(sum(h.get("skipped_steps", 0) for h in history)),
    }


def _finalize(
    cfg, fold, paths: FoldPaths, val_df, kept, history, folds_path, seconds, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    if kept["epoch"] < 0:
        raise RuntimeError("no epoch was validated")
    embeddings = load_npz(paths.best_oof(kept["epoch"]), hint="Start the fold over with train.force=true.")[
        "embeddings"
    ]
    last = history[-1]
    scores = {
        "experiment": cfg.name,
        "fold": fold,
        "keep": cfg.train.keep,
        "kept_epoch": kept["epoch"],
        "best_epoch": kept["epoch"],  # the kept epoch's name before train.keep existed (then always the best)
        "last_epoch": int(last["epoch"]),
        "epochs": cfg.train.epochs,
        **kept["metrics"],  # the kept epoch's scores: what the OOF file holds
        "last": {k: v for k, v in last.items() if k.startswith(("recall@", "map@"))},
        **_run_record(history, seconds, folds_path),
        **(extra or {}),
    }
    # weights first, OOF last: the OOF file is what marks the fold finished
    with atomic_path(paths.weights) as tmp:
        shutil.copyfile(paths.best(kept["epoch"]), tmp)
    save_text(paths.config, config_to_yaml(cfg))
    save_json(paths.scores, scores)
    save_npz(
        paths.oof,
        ids=val_df[ID].to_numpy(dtype=str),
        images=val_df[IMAGE].to_numpy(dtype=str),
        labels=val_df[LABEL].to_numpy(dtype=str),
        groups=val_df[GROUP].to_numpy(dtype=str),
        embeddings=embeddings.astype(np.float32),
    )
    _remove_work_files(paths)
    log.info(
        "fold %d finished: kept epoch %d (train.keep=%s), R@1 %.4f, MAP@R %.4f -> %s, %s",
        fold,
        kept["epoch"],
        cfg.train.keep,
        scores["recall@1"],
        scores["map@r"],
        paths.oof,
        paths.weights,
    )
    return scores


def full_fit_epochs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The full fit's epoch count and the rule that gave it: ``{"epochs", "epochs_rule"[, "fold_kept_epochs"]}``.

    ``train.full_epochs > 0``: that many. Else the count the folds chose: ``train.epochs`` with ``train.keep=last``;
    with ``keep=best`` the median, rounded half up, of ``kept_epoch + 1`` over the experiment's finished fold JSONs
    (``oof/<exp>/fold<K>.json``; ``best_epoch`` in files older than ``train.keep``), and a
    :class:`FileNotFoundError` when no fold has finished.
    """
    from arcfold.score import finished_folds

    if cfg.train.full_epochs > 0:
        return {"epochs": cfg.train.full_epochs, "epochs_rule": "train.full_epochs"}
    if cfg.train.keep == "last":
        return {"epochs": cfg.train.epochs, "epochs_rule": "train.epochs (train.keep=last)"}
    folds = finished_folds(cfg.oof_dir) if cfg.oof_dir.is_dir() else []
    if not folds:
        raise FileNotFoundError(
            f"the full fit of '{cfg.name}' trains for the median kept epoch of its finished folds (train.keep=best, "
            f"train.full_epochs=0), but {cfg.oof_dir} has no finished fold: train the folds first, or set "
            "train.full_epochs"
        )
    kept = {}
    for k in folds:
        scores = load_json(cfg.oof_dir / f"fold{k}.json", hint=f"Retrain fold {k} with train.force=true.")
        kept[str(k)] = int(scores["kept_epoch"] if "kept_epoch" in scores else scores["best_epoch"])
    median = float(np.median([e + 1 for e in kept.values()]))
    return {
        "epochs": int(math.floor(median + 0.5)),
        "epochs_rule": f"median of kept_epoch + 1 over folds {','.join(kept)} (train.keep=best), rounded half up",
        "fold_kept_epochs": kept,
    }


def _finalize_full(cfg, paths: FoldPaths, kept, history, folds_path, seconds, extra: dict[str, Any]) -> dict[str, Any]:
    """The full fit's outputs: ``full.pt`` (the last epoch's weights), ``full.config.yaml``, ``full.json`` last."""
    info = {
        "experiment": cfg.name,
        "fold": FULL_FIT,
        "keep": "last",
        "kept_epoch": kept["epoch"],
        "last_epoch": int(history[-1]["epoch"]),
        **extra,  # epochs, epochs_rule, n_images, n_classes, ...
        "train_loss": float(history[-1]["train_loss"]),
        **_run_record(history, seconds, folds_path),
    }
    with atomic_path(paths.weights) as tmp:
        shutil.copyfile(paths.best(kept["epoch"]), tmp)
    save_text(paths.config, config_to_yaml(cfg))
    save_json(paths.scores, info)  # last: marks the full fit finished
    _remove_work_files(paths)
    log.info(
        "full fit finished: %d epochs (%s), %d images / %d classes, %.2fx a fold's training images per epoch -> %s",
        info["epochs"],
        info["epochs_rule"],
        info["n_images"],
        info["n_classes"],
        info["n_images"] / max(info["fold_train_images_mean"], 1.0),
        paths.weights,
    )
    return info


def parse_folds(spec: str) -> list[int | str]:
    """'0' -> [0]; '0..4' -> [0, 1, 2, 3, 4]; '0,2' -> [0, 2]; 'full' (the full-data fit) alone or in a list, always
    last (with train.keep=best its epoch count is read from the finished folds).

    >>> parse_folds("full,0..2")
    [0, 1, 2, 'full']
    """
    folds: list[int] = []
    full = False
    try:
        for part in spec.split(","):
            part = part.strip()
            if part == FULL_FIT:
                full = True
            elif ".." in part:
                lo, hi = part.split("..")
                folds += list(range(int(lo), int(hi) + 1))
            elif part:
                folds.append(int(part))
    except ValueError:
        folds = []
    if (not folds and not full) or (folds and min(folds) < 0):
        raise ValueError(f"bad fold spec {spec!r}: use K, A..B, A,B,C or full (alone or in a list: 0..4,full)")
    return [*folds, *([FULL_FIT] if full else [])]


def main(argv: list[str] | None = None) -> None:
    from arcfold.cli import add_config_args, config_from_args, setup_logging

    parser = argparse.ArgumentParser(prog="arcfold train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", "-f", required=True, help="fold index, A..B or A,B,C; full: the full-data fit")
    add_config_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        folds = parse_folds(args.fold)
    except ValueError as e:
        parser.error(str(e))
    cfg = config_from_args(args)
    for fold in folds:
        try:
            train_fold(cfg, fold)
        except NonFiniteLossError:  # logged by train_fold, with the checkpoint it keeps: exit 2, no traceback
            raise SystemExit(2) from None
        except CorruptFileError as e:  # a clear line naming the file and exit 2, not a traceback
            log.error("%s", e)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()
