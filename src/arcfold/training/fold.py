"""Training one fold (or the full-data fit) in this process or under torchrun: :func:`train_fold`.

The files it writes, which epoch it keeps, the full fit, EMA and ``model.init_from``, crashes and resume, and the
multi-process run are described in the package's docstring (:mod:`arcfold.training`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from arcfold.config import ExperimentConfig, config_to_dict
from arcfold.data.dataset import ImageDataset
from arcfold.data.folds import TEST_FOLD, ensure_folds, file_sha256, verify_fold_file
from arcfold.data.samplers import ShardedBatchSampler, build_sampler, global_batches
from arcfold.data.table import FOLD, LABEL, check_image_files, image_root, resolve_image_paths
from arcfold.data.transforms import build_batch_augment, build_eval_transform, build_train_transform
from arcfold.datasets.prepare import ensure_dataset
from arcfold.distributed import DistContext, dist_context, gather_rows, on_rank0, process_group, shard_range
from arcfold.errors import ArtifactExistsError, ConfigError, DataValidationError, NonFiniteLossError
from arcfold.inference.embed import extract_embeddings
from arcfold.io import fault_point, file_lock, load_json, remove_stale_temp_files, save_npz, save_torch
from arcfold.logs import run_log
from arcfold.models.embedding import build_model, embedding_checkpoint
from arcfold.models.heads import build_head
from arcfold.models.losses import LOSSES
from arcfold.retrieval.metrics import DEFAULT_KS, retrieval_metrics
from arcfold.runtime import amp_dtype_for, resolve_device, seed_everything
from arcfold.training.ddp import (
    build_ddp,
    build_sharded_head,
    check_distributed_config,
    sharded_optimizer_state,
    to_cpu,
    training_device,
)
from arcfold.training.ema import build_ema
from arcfold.training.finalize import finalize_fold, finalize_full, full_fit_epochs, save_history
from arcfold.training.init_from import init_weights_from, load_init_checkpoint
from arcfold.training.loop import build_train_collate, train_one_epoch
from arcfold.training.paths import FoldPaths, check_fold_index, check_fold_state, remove_work_files
from arcfold.training.schedule import build_optimizer, build_scheduler
from arcfold.training.state import TRAIN_STATE_FORMAT, check_same_experiment, load_resume_point
from arcfold.training.step import NonFiniteGuard, OptimizerStep

log = logging.getLogger(__name__)

__all__ = ["train_fold"]


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
    check_fold_index(cfg, fold)  # before the lock, the log and the data: a typo leaves nothing behind
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
            # a variant (overrides that change the result) never writes into, or skips as done, another's folders
            check_same_experiment(cfg, paths.config, cfg.train.force)
            state = check_fold_state(paths, cfg.train.resume, cfg.train.force)
            if state == "done":
                what, done = paths.what, paths.done
                log.info("%s of '%s' is finished (%s): skipped (train.force=true retrains it)", what, cfg.name, done)
                remove_work_files(paths)  # left by a kill between writing the OOF file and cleaning up
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
        # train.log (rank 0), which records the error that stops the run too: the CLI prints it in one line
        with run_log(paths.log_file) if ctx.is_main else contextlib.nullcontext():
            run = _FoldRun(cfg, fold, paths, ctx, device, progress=cfg.train.progress and ctx.is_main)
            try:
                return run.run(state == "resume", on_epoch_end)
            except KeyboardInterrupt:  # Ctrl-C: one line naming the epoch the run continues from, not a traceback
                raise paths.interrupted(run.last_finished) from None
            except NonFiniteLossError as e:
                kept = (
                    f"the last good checkpoint is kept: {paths.last} (resume with train.resume=true)"
                    if paths.last.exists()
                    else "no epoch had finished, so there is no checkpoint to keep"
                )
                raise NonFiniteLossError(f"{paths.what} stopped: {e}; {kept}") from None


@dataclass
class _Rows:
    """The fold's rows: the fold file, what trains, what validates, and the classes the head learns."""

    folds_path: Path
    folds_df: pd.DataFrame  # every non-test row
    n_splits: int
    folds_sha256: str
    train_df: pd.DataFrame
    val_df: pd.DataFrame  # empty for the full fit
    classes: np.ndarray  # sorted labels of train_df: the head's rows
    train_labels: np.ndarray  # (N_train,) contiguous ids 0..C-1
    skipped_images: dict[str, int]


class _FoldRun:
    """One run of a fold (or of the full fit) in this process: built, resumed, trained epoch by epoch, finalised.

    Its steps, in the order the random streams see them (a resume is bit-identical only in this order): the resume
    point and the data are checked, everything is seeded from ``(train.seed, fold)``, the data sets, model, head,
    optimizer, GradScaler, EMA, sampler and schedule are built, the resume point (if any) is restored, then each
    epoch is reseeded from ``(seed, fold, epoch)``, trained, validated and saved.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        fold: int | str,
        paths: FoldPaths,
        ctx: DistContext | None = None,
        device: torch.device | None = None,
        progress: bool = False,
    ) -> None:
        self.cfg, self.fold, self.paths = cfg, fold, paths
        self.ctx = ctx or DistContext()
        self.device, self.progress = device, progress
        self.sharded = cfg.head.sharded and self.ctx.enabled
        self.last_finished: int | None = None  # the epoch of the resume point on disk (None: no epoch finished)

    # ---------------------------------------------------------------------------------------------------------------
    # the run

    def run(self, resume: bool, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        cfg, paths, ctx = self.cfg, self.paths, self.ctx
        self.started, ckpt = time.time(), None
        if resume:  # read (and check) the resume point first: a refusal should not wait for the data
            ckpt = load_resume_point(paths.last, cfg)
            self.last_finished = ckpt["epoch"]
            self.started -= ckpt.get("seconds", 0.0)  # the earlier processes' time: the fold's seconds cover them too
        self.n_epochs, self.full_epochs = cfg.train.epochs, None
        if paths.full:  # the epoch count is fixed when the full fit starts: a resume continues with it
            self.full_epochs = ckpt["full_epochs"] if ckpt is not None else full_fit_epochs(cfg)
            self.n_epochs = self.full_epochs["epochs"]
            log.info("full fit of '%s': %d epochs (%s)", cfg.name, self.n_epochs, self.full_epochs["epochs_rule"])
        self.rows = self._read_rows(ckpt)
        self._build()
        self.start_epoch, self.best, self.history = 0, {"epoch": -1, "metrics": {"recall@1": -1.0}}, []
        self.kept: dict[str, Any] = {"epoch": -1, "metrics": {}}  # the epoch the fold keeps so far (train.keep)
        if ckpt is not None:  # every rank reads the same resume point
            self._restore(ckpt)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.collate, self.device_normalise = build_train_collate(self.device, self.batch_augment is not None)
        self.ddp = build_ddp(cfg, self.model, self.head, ctx, self.device) if ctx.enabled else None
        self.step = OptimizerStep.from_config(
            cfg, self.optimizer, self.scheduler, self.scaler, self.params, self.guard,
            sharded_params=list(self.head.parameters()) if self.sharded else None, ema=self.ema,
        )  # fmt: skip
        for epoch in range(self.start_epoch, self.n_epochs):
            self._epoch(epoch, on_epoch_end)
        return self._finish(time.time() - self.started)

    def _read_rows(self, ckpt: dict[str, Any] | None) -> _Rows:
        """The fold file (made by rank 0 if missing) split into training and validation rows; ``model.init_from``
        is read here, before the images are checked."""
        cfg, fold, paths, ctx = self.cfg, self.fold, self.paths, self.ctx
        # rank 0 makes the data set and the fold file (once, under their locks); the others wait, then read them
        folds_path = on_rank0(ctx, lambda: (ensure_dataset(cfg), ensure_folds(cfg))[1])
        folds_df = verify_fold_file(folds_path)  # the CSV the folds stage wrote (hash, folds, groups), else an error
        folds_df = folds_df[folds_df[FOLD] != TEST_FOLD].reset_index(drop=True)  # the test split: never trained on
        n_splits = int(folds_df[FOLD].max()) + 1
        if not paths.full and not 0 <= fold < n_splits:
            raise ConfigError(f"fold {fold} does not exist: {folds_path} has folds 0..{n_splits - 1}")
        folds_sha256 = file_sha256(folds_path)
        self.init = None  # model.init_from on a fresh fold (a resumed one continues from last.pt): before the data
        if ckpt is None and cfg.model.init_from:
            self.init = load_init_checkpoint(cfg, fold, folds_sha256)
        # The folds stage decoded every image already (data.check_images); here, per fold, only check the
        # files are still there: decoding 1.6M landmark images again for every fold would cost minutes.
        # With data.skip_bad_images the decode is needed to know which images to leave out.
        check = "exists" if cfg.data.check_images == "decode" else cfg.data.check_images
        if cfg.data.skip_bad_images and check != "none":
            check = "decode"
        bad = check_image_files(
            folds_df, image_root(cfg.data), mode=check, source=folds_path, progress=self.progress,
            skip_bad=cfg.data.skip_bad_images,
        )  # fmt: skip
        is_bad = np.zeros(len(folds_df), dtype=bool)
        is_bad[bad] = True
        in_val = (folds_df[FOLD] == fold).to_numpy()  # the full fit: no row (it trains on every fold)
        skipped_images = {"train": int((is_bad & ~in_val).sum()), "validation": int((is_bad & in_val).sum())}
        if is_bad.any():
            log.warning(
                "%s: leaving out %d training and %d validation images that cannot be decoded (data.skip_bad_images)",
                paths.what, skipped_images["train"], skipped_images["validation"],
            )  # fmt: skip
        train_df = folds_df[~in_val & ~is_bad].reset_index(drop=True)
        val_df = folds_df[in_val & ~is_bad].reset_index(drop=True)
        if not paths.full and not (val_df[LABEL].map(val_df[LABEL].value_counts()) >= 2).any():
            raise DataValidationError(
                f"{folds_path}: fold {fold} has no query: its {len(val_df)} images are all in one-image classes, so "
                "validation has nothing to retrieve. Remake the folds with folds.min_class_size >= 2 (--force)"
            )
        classes = np.sort(train_df[LABEL].unique())
        log.info(
            "experiment '%s' %s: train %d images / %d classes, validation %d images / %d classes",
            cfg.name, paths.what, len(train_df), len(classes), len(val_df), val_df[LABEL].nunique(),
        )  # fmt: skip
        return _Rows(
            folds_path, folds_df, n_splits, folds_sha256, train_df, val_df, classes,
            np.searchsorted(classes, train_df[LABEL].to_numpy()), skipped_images,
        )  # fmt: skip

    def _build(self) -> None:
        """Seed, then build the data sets, model, head, optimizer, GradScaler, EMA, sampler and schedule."""
        cfg, paths, ctx, rows = self.cfg, self.paths, self.ctx, self.rows
        self.device = device = self.device or resolve_device(cfg.train.device)
        self.amp_dtype = amp_dtype_for(cfg.train.amp, device)
        self.base_seed = cfg.train.seed + (rows.n_splits if paths.full else self.fold)  # full fit: a seed no fold uses
        seed_everything(self.base_seed)
        self._build_datasets()
        check_distributed_config(cfg, ctx, device)
        self.model = build_model(cfg.model).to(device)
        n_classes = len(rows.classes)
        class_counts = np.bincount(rows.train_labels, minlength=n_classes)  # dynamic margins, class weights
        if self.sharded:
            self.head = build_sharded_head(cfg, n_classes, ctx).to(device)
        else:
            self.head = build_head(cfg.head, cfg.model.embedding_size, n_classes, class_counts=class_counts).to(device)
        self.class_names = [str(c) for c in rows.classes]  # the head's rows in order: in fold<K>.pt for init_from
        self.init_info = None  # what model.init_from loaded, for the fold JSON
        if self.init is not None:  # (path, checkpoint), dropped once copied
            self.init_info = init_weights_from(
                *self.init, cfg, self.model, self.head, self.class_names, sharded=self.sharded
            )
            self.init = None
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.train.sync_bn and ctx.enabled:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # same state-dict keys as BatchNorm
        self.optimizer = build_optimizer(cfg, self.model, self.head)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = build_ema(self.model, self.head, cfg.train.ema_decay, cfg.train.ema_warmup)  # None: no EMA
        # m-per-class batches (pair/proxy losses need positives in every batch); reseeded per epoch
        m = cfg.sampler.m_per_class
        self.sampler = build_sampler(rows.train_labels, m, cfg.train.batch_size, seed=self.base_seed) if m else None
        if self.sampler is None and cfg.head.name in LOSSES and ctx.is_main:
            log.warning(
                "head.name=%s compares images within a batch, but batches are plain shuffles with few positive "
                "pairs: set sampler.m_per_class (e.g. 4)",
                cfg.head.name,
            )
        self.n_batches = len(self.train_ds) // cfg.train.batch_size  # drop_last: batch norm needs full batches
        if cfg.train.limit_train_batches:
            self.n_batches = min(self.n_batches, cfg.train.limit_train_batches)
        updates_per_epoch = math.ceil(self.n_batches / cfg.train.accum_steps)
        self.scheduler = build_scheduler(cfg, self.optimizer, updates_per_epoch, self.n_epochs)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)

    def _build_datasets(self) -> None:
        cfg, rows, size = self.cfg, self.rows, self.cfg.data.image_size
        root = image_root(cfg.data)
        # per-image augmentation, uint8 out; None when the batch-level version (data.batch_augment) does it all
        self.batch_augment = aug = build_batch_augment(cfg.data.augment, size, cfg.data.batch_augment)
        train_tf = build_train_transform(cfg.data.augment, size, cfg.data.hflip, self.base_seed, False, bool(aug))
        # resized when read, cached or not: read_image, the resize of OOF and inference too
        self.train_ds = ImageDataset(
            resolve_image_paths(rows.train_df, root), rows.train_labels, train_tf, cache=cfg.data.cache_images,
            size=size, progress=self.progress,
        )  # fmt: skip
        self.val_ds = ImageDataset(
            resolve_image_paths(rows.val_df, root), None, build_eval_transform(size), cache=cfg.data.cache_images,
            size=size, progress=self.progress,
        )  # fmt: skip
        if len(self.train_ds) < cfg.train.batch_size:
            raise ValueError(f"{self.paths.what}: {len(self.train_ds)} training images, fewer than train.batch_size")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from ``last.pt``: weights, optimizer, schedule, scaler, EMA, epochs done, history, guard."""
        cfg, paths, device = self.cfg, self.paths, self.device
        # train.device may be spelled otherwise (RESUME_MAY_DIFFER), but another kind of device computes otherwise
        if ckpt.get("device_type", device.type) != device.type:
            raise ArtifactExistsError(
                f"{paths.last} was trained on {ckpt['device_type']}, this run is on {device.type} (train.device="
                f"{cfg.train.device}), which would change the result; resume on {ckpt['device_type']}, or start "
                "over with train.force=true"
            )
        self.model.load_state_dict(ckpt["model"])
        if self.sharded:
            self.head.load_full_state_dict(ckpt["head"])
            self.optimizer.load_state_dict(sharded_optimizer_state(ckpt, self.ctx, paths.last))
        else:
            self.head.load_state_dict(ckpt["head"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.init_info = ckpt.get("init_from")
        self.start_epoch, self.best, self.kept = ckpt["epoch"] + 1, ckpt["best"], ckpt["kept"]
        self.history = ckpt["history"]
        self.guard.in_a_row = int(ckpt.get("nonfinite_in_a_row", 0))
        if self.kept["epoch"] >= 0 and self.ctx.is_main:
            paths.remove_best_except(self.kept["epoch"])  # files of an epoch the kill cut short (it is retrained)
        log.info("resuming %s from epoch %d (best so far: epoch %d)", paths.what, self.start_epoch, self.best["epoch"])

    # ---------------------------------------------------------------------------------------------------------------
    # one epoch

    def _epoch(self, epoch: int, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
        """Train, validate, log and save one epoch; its resume point is written last."""
        cfg, ctx = self.cfg, self.ctx
        epoch_seed = self.base_seed * 1000 + epoch  # each epoch reproducible on its own, so resume replays it exactly
        seed_everything(epoch_seed)
        # augmentation seeded per sample from (epoch_seed, index): the same pixels whatever data.num_workers; the
        # ranks take disjoint indices, so they augment different images, each as the single-process run does
        self.train_ds.set_augment_seed(epoch_seed)
        if self.batch_augment is not None:  # its draws too: one global batch at a time, the same on every rank
            self.batch_augment.start_epoch(epoch_seed)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            cfg, self.model, self.head, self._loader(epoch_seed), self.n_batches, self.step, self.device,
            self.amp_dtype, epoch, ddp=self.ddp, ctx=ctx, normalise=self.device_normalise, augment=self.batch_augment,
        )  # fmt: skip
        ema = self.ema
        eval_model, eval_head = (ema.model, ema.head) if ema is not None else (self.model, self.head)

        t0 = time.time()
        embeddings, metrics = self._validate(eval_model, epoch)
        improved = bool(metrics) and metrics["recall@1"] > self.best["metrics"]["recall@1"]
        row = {
            "epoch": epoch,
            **train_stats,
            "val_seconds": round(time.time() - t0, 2),
            **{k: v for k, v in metrics.items() if k.startswith(("recall@", "map@"))},
            "best": improved,
        }
        self.history.append(row)
        self._log_epoch(epoch, train_stats, metrics, improved)
        keep_best = cfg.train.keep == "best" and not self.paths.full  # the full fit has no validation: keeps its last
        if improved:
            self.best = {"epoch": epoch, "metrics": metrics}
        if improved or not keep_best:
            self.kept = {"epoch": epoch, "metrics": metrics}
        # the kept epoch's files: at each improvement with keep=best, only for the last epoch with keep=last
        if (improved if keep_best else epoch == self.n_epochs - 1) and ctx.is_main:
            self._save_kept(epoch, eval_model, eval_head, embeddings, metrics)
        if ctx.is_main:
            save_history(self.paths.history, self.history)
        if on_epoch_end is not None:
            on_epoch_end(row)
        self._save_resume_point(epoch)
        if ctx.enabled:
            torch.distributed.barrier()  # the epoch is done for every rank once its resume point is written
            self.last_finished = epoch  # (rank 0 set it as soon as it wrote last.pt)

    def _loader(self, epoch_seed: int) -> DataLoader:
        cfg, ctx, sampler = self.cfg, self.ctx, self.sampler
        batching: dict[str, Any] = {"batch_size": cfg.train.batch_size, "shuffle": sampler is None, "sampler": sampler}
        if ctx.enabled:  # this rank's slice of each global batch of a single-process run
            batches = global_batches(len(self.train_ds), cfg.train.batch_size, epoch_seed, sampler)[: self.n_batches]
            batching = {"batch_sampler": ShardedBatchSampler(batches, ctx.rank, ctx.world_size)}
        return DataLoader(
            self.train_ds,
            **batching,
            drop_last=not ctx.enabled,  # (a batch_sampler makes whole batches itself)
            num_workers=cfg.data.num_workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed),
            persistent_workers=False,
        )

    def _validate(self, eval_model: nn.Module, epoch: int) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The validation fold's embeddings (every rank embeds its rows, then all gather) and their scores; the full
        fit has no validation set: nothing to embed or score."""
        if self.paths.full:
            return None, {}
        cfg, ctx, val_ds = self.cfg, self.ctx, self.val_ds
        lo, hi = shard_range(len(val_ds), ctx.rank, ctx.world_size)
        embeddings = extract_embeddings(
            eval_model,
            val_ds if not ctx.enabled else Subset(val_ds, range(lo, hi)),
            batch_size=cfg.train.eval_batch_size,
            device=self.device,
            amp_dtype=self.amp_dtype,
            num_workers=cfg.data.num_workers,
            channels_last=cfg.train.channels_last,
            progress=self.progress,
            desc=f"fold {self.fold} epoch {epoch} validation",
        )
        embeddings = gather_rows(embeddings, ctx, self.device)  # (N_val, D) in fold-file order, on every rank
        fault_point("validation")
        labels = self.rows.val_df[LABEL].to_numpy()
        return embeddings, retrieval_metrics(embeddings, labels, ks=DEFAULT_KS, device=self.device)

    def _log_epoch(self, epoch: int, train_stats: dict[str, Any], metrics: dict[str, Any], improved: bool) -> None:
        loss, speed = train_stats["train_loss"], train_stats["train_images_per_s"]
        if self.paths.full:
            log.info("full fit epoch %d (of 0..%d): loss %.4f, %.1f img/s", epoch, self.n_epochs - 1, loss, speed)
            return
        log.info(
            "fold %d epoch %d: loss %.4f, %.1f img/s | R@1 %.4f R@5 %.4f R@10 %.4f MAP@R %.4f%s",
            self.fold, epoch, loss, speed, metrics["recall@1"], metrics["recall@5"], metrics["recall@10"],
            metrics["map@r"], "  (best)" if improved else "",
        )  # fmt: skip

    def _save_kept(self, epoch: int, eval_model: nn.Module, eval_head: nn.Module, embeddings, metrics) -> None:
        """The kept epoch's validation embeddings and weights (``best_oof_e<E>.npz``, ``best_e<E>.pt``)."""
        paths = self.paths
        if not paths.full:
            save_npz(paths.best_oof(epoch), embeddings=embeddings)
        # the head (not a sharded one: each rank holds its rows) and its classes, for model.init_from
        head_extra = {} if self.sharded else {"classes": self.class_names, "head": to_cpu(eval_head.state_dict())}
        save_torch(
            paths.best(epoch),
            embedding_checkpoint(
                eval_model, self.cfg, fold=self.fold, epoch=epoch, metrics=metrics,
                folds_sha256=self.rows.folds_sha256, **head_extra,
            ),
        )  # fmt: skip

    def _save_resume_point(self, epoch: int) -> None:
        """``last.pt``, written last: an epoch counts as done only once everything else is on disk."""
        ctx = self.ctx
        # collectives first (every rank takes part): the sharded head's full weight, each rank's optimizer state
        head_state = self.head.full_state_dict() if self.sharded else self.head.state_dict()
        optimizer_ranks = None
        if self.sharded:  # the optimizer holds this rank's rows of the head: keep every rank's state
            optimizer_ranks = [None] * ctx.world_size if ctx.is_main else None
            torch.distributed.gather_object(to_cpu(self.optimizer.state_dict()), optimizer_ranks, dst=0)
        if not ctx.is_main:
            return
        ema, init_info = self.ema, self.init_info
        save_torch(
            self.paths.last,
            {
                "format": TRAIN_STATE_FORMAT,
                "device_type": self.device.type,  # resumed on the same kind of device only
                "config": config_to_dict(self.cfg),
                "epoch": epoch,
                "model": self.model.state_dict(),
                "head": head_state,
                "optimizer": self.optimizer.state_dict(),
                **({"optimizer_ranks": optimizer_ranks} if optimizer_ranks is not None else {}),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "best": self.best,
                "kept": self.kept,
                "history": self.history,
                "nonfinite_in_a_row": self.guard.in_a_row,
                "seconds": time.time() - self.started,  # elapsed so far, over every process of the run
                **({"ema": ema.state_dict()} if ema is not None else {}),
                **({"init_from": init_info} if init_info is not None else {}),
                **({"full_epochs": self.full_epochs} if self.paths.full else {}),
            },
        )
        self.last_finished = epoch  # at once: Ctrl-C from here on says this epoch
        self.paths.remove_best_except(self.kept["epoch"])  # the previously kept epoch's files, now superseded

    # ---------------------------------------------------------------------------------------------------------------
    # the end

    def _finish(self, seconds: float) -> dict[str, Any]:
        cfg, rows, paths = self.cfg, self.rows, self.paths
        extra: dict[str, Any] = {"skipped_images": rows.skipped_images} if cfg.data.skip_bad_images else {}
        if self.ema is not None:
            extra.update(ema_decay=cfg.train.ema_decay, ema_warmup=cfg.train.ema_warmup)
        if self.init_info is not None:
            extra["init_from"] = self.init_info
        kept, history, folds_path = self.kept, self.history, rows.folds_path
        if paths.full:
            fold_sizes = rows.folds_df[FOLD].value_counts()  # the non-test rows of each fold
            extra |= {
                **self.full_epochs,  # type: ignore[dict-item]
                "n_images": len(rows.train_df),
                "n_classes": len(rows.classes),
                "images_per_epoch": self.n_batches * cfg.train.batch_size,
                "fold_train_images_mean": float(np.mean(len(rows.folds_df) - fold_sizes.to_numpy())),
            }
            return on_rank0(self.ctx, lambda: finalize_full(cfg, paths, kept, history, folds_path, seconds, extra))
        return on_rank0(
            self.ctx,
            lambda: finalize_fold(cfg, self.fold, paths, rows.val_df, kept, history, folds_path, seconds, extra),
        )
