"""Train stage: one fold of one experiment, validated every epoch, best epoch kept.

Files (``<exp>`` = ``cfg.name``, ``K`` = fold):

* ``models/<exp>/fold<K>/``: work folder while training — ``last.pt`` (full training state, written
  every epoch: resume point), ``best.pt`` / ``best_oof.npz`` (best epoch so far), ``history.csv``
  (one row per epoch), ``train.log``.
* When the fold finishes: ``models/<exp>/fold<K>.pt`` (best embedding weights + config),
  ``oof/<exp>/fold<K>.npz`` (ids, images, labels, groups, L2-normalised embeddings of the held-out
  fold at the best epoch), ``oof/<exp>/fold<K>.json`` (scores), ``oof/<exp>/fold<K>.config.yaml``.
  The OOF ``.npz`` is written last and marks the fold as finished: a finished fold is never
  overwritten without ``train.force=true``.

Validation is leave-one-out retrieval inside the held-out fold (whose classes were never trained
on): Recall@1/2/4/5/8/10 and MAP@R; the best epoch is the one with the highest Recall@1.

CLI::

    python -m arcfold train --config configs/glyphs_arcface.yaml --fold 0 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from arcfold.config import ExperimentConfig, config_to_dict, config_to_yaml
from arcfold.data.dataset import ImageDataset
from arcfold.data.samplers import build_sampler
from arcfold.data.table import FOLD, GROUP, ID, IMAGE, LABEL, check_image_files, image_root, resolve_image_paths
from arcfold.data.transforms import build_eval_transform, build_train_transform
from arcfold.embed import extract_embeddings
from arcfold.folds import ensure_folds, file_sha256, load_folds
from arcfold.io import ArtifactExistsError, atomic_path, load_npz, save_json, save_npz, save_text, save_torch
from arcfold.metrics import DEFAULT_KS, retrieval_metrics
from arcfold.models.embedding import build_model, embedding_checkpoint
from arcfold.models.heads import build_head, margin_warmup_factor
from arcfold.models.losses import LOSSES
from arcfold.prepare import ensure_dataset

log = logging.getLogger(__name__)

__all__ = ["FoldPaths", "train_fold"]

TRAIN_STATE_FORMAT = "arcfold.train_state/1"
MAX_NONFINITE_IN_A_ROW = 10


class FoldPaths:
    """Where one fold's artifacts live (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, fold: int) -> None:
        self.cfg, self.fold = cfg, fold
        self.work = cfg.models_dir / f"fold{fold}"
        self.weights = cfg.models_dir / f"fold{fold}.pt"
        self.oof = cfg.oof_dir / f"fold{fold}.npz"
        self.scores = cfg.oof_dir / f"fold{fold}.json"
        self.config = cfg.oof_dir / f"fold{fold}.config.yaml"
        self.last = self.work / "last.pt"
        self.best = self.work / "best.pt"
        self.best_oof = self.work / "best_oof.npz"
        self.history = self.work / "history.csv"
        self.log_file = self.work / "train.log"


# --------------------------------------------------------------------------------------------
# small pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return device


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32. fp16 needs a GradScaler; bf16 (same exponent range as fp32) does not."""
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("train.amp=fp16 is not supported on CPU; use bf16 or off")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("arcfold").addHandler(handler)
    return handler


# --------------------------------------------------------------------------------------------
# the fold


def check_fold_state(paths: FoldPaths, resume: bool, force: bool) -> str:
    """'done' (finished, nothing to do), 'resume', or 'fresh'. Refuses to lose work silently."""
    if paths.oof.exists():
        if force:
            return "fresh"
        if resume:
            return "done"
        raise ArtifactExistsError(
            f"fold {paths.fold} of experiment '{paths.cfg.name}' is finished ({paths.oof}); "
            "pass train.force=true to train it again and overwrite it"
        )
    if paths.last.exists():
        if resume:
            return "resume"
        if not force:
            raise ArtifactExistsError(
                f"an unfinished run of fold {paths.fold} exists ({paths.last}); "
                "pass train.resume=true to continue it or train.force=true to start over"
            )
    return "fresh"


def train_fold(
    cfg: ExperimentConfig, fold: int, on_epoch_end: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train, validate and save one fold; return its scores (the content of ``fold<K>.json``).

    ``on_epoch_end(row)`` is called after each validated epoch with its ``history.csv`` row (epoch,
    losses, Recall@K, MAP@R), once the epoch's files are written and before its resume point is: an
    exception there (e.g. optuna's ``TrialPruned``) stops the fold and a resume replays that epoch.
    """
    paths = FoldPaths(cfg, fold)
    state = check_fold_state(paths, cfg.train.resume, cfg.train.force)
    if state == "done":
        log.info("fold %d of '%s' is already finished: %s (train.force=true retrains it)", fold, cfg.name, paths.oof)
        return json.loads(paths.scores.read_text())
    if state == "fresh" and paths.work.exists():
        shutil.rmtree(paths.work)
    handler = _attach_file_log(paths.log_file)
    try:
        return _train_fold(cfg, fold, paths, resume=state == "resume", on_epoch_end=on_epoch_end)
    finally:
        logging.getLogger("arcfold").removeHandler(handler)
        handler.close()


def _train_fold(
    cfg: ExperimentConfig,
    fold: int,
    paths: FoldPaths,
    resume: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    started = time.time()
    ensure_dataset(cfg)
    folds_path = ensure_folds(cfg)
    folds_df = load_folds(folds_path)
    n_splits = int(folds_df[FOLD].max()) + 1
    if not 0 <= fold < n_splits:
        raise ValueError(f"fold {fold} does not exist: {folds_path} has folds 0..{n_splits - 1}")
    root = image_root(cfg.data)
    # The folds stage decoded every image already (data.check_images); here, per fold, only check the
    # files are still there: decoding 1.6M landmark images again for every fold would cost minutes.
    check = "exists" if cfg.data.check_images == "decode" else cfg.data.check_images
    check_image_files(folds_df, root, mode=check, source=folds_path, progress=cfg.train.progress)

    train_df = folds_df[folds_df[FOLD] != fold].reset_index(drop=True)
    val_df = folds_df[folds_df[FOLD] == fold].reset_index(drop=True)
    classes = np.sort(train_df[LABEL].unique())
    train_labels = np.searchsorted(classes, train_df[LABEL].to_numpy())  # contiguous ids 0..C-1
    log.info(
        "experiment '%s' fold %d: train %d images / %d classes, validation %d images / %d classes",
        cfg.name,
        fold,
        len(train_df),
        len(classes),
        len(val_df),
        val_df[LABEL].nunique(),
    )

    device = resolve_device(cfg.train.device)
    amp_dtype = amp_dtype_for(cfg.train.amp, device)
    base_seed = cfg.train.seed + fold
    seed_everything(base_seed)

    size = cfg.data.image_size
    train_tf = build_train_transform(cfg.data.augment, size, cfg.data.hflip, seed=base_seed)
    cache = cfg.data.cache_images
    train_ds = ImageDataset(
        resolve_image_paths(train_df, root),
        train_labels,
        train_tf,
        cache=cache,
        cache_size=size if cache else None,
        progress=cfg.train.progress,
    )
    val_ds = ImageDataset(
        resolve_image_paths(val_df, root),
        None,
        build_eval_transform(size),
        cache=cache,
        cache_size=size if cache else None,
        progress=cfg.train.progress,
    )
    if len(train_ds) < cfg.train.batch_size:
        raise ValueError(f"fold {fold}: {len(train_ds)} training images, fewer than train.batch_size")

    model = build_model(cfg.model).to(device)
    class_counts = np.bincount(train_labels, minlength=len(classes))  # dynamic margins, class weights
    head = build_head(cfg.head, cfg.model.embedding_size, len(classes), class_counts=class_counts).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, head)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # m-per-class batches (pair/proxy losses need positives in every batch); reseeded per epoch below
    m = cfg.sampler.m_per_class
    sampler = build_sampler(train_labels, m, cfg.train.batch_size, seed=base_seed) if m else None
    if sampler is None and cfg.head.name in LOSSES:
        log.warning(
            "head.name=%s compares images within a batch, but batches are plain shuffles with few positive "
            "pairs: set sampler.m_per_class (e.g. 4)",
            cfg.head.name,
        )
    n_batches = len(train_ds) // cfg.train.batch_size  # drop_last: batch norm needs full batches
    if cfg.train.limit_train_batches:
        n_batches = min(n_batches, cfg.train.limit_train_batches)
    updates_per_epoch = math.ceil(n_batches / cfg.train.accum_steps)
    total_updates = updates_per_epoch * cfg.train.epochs
    warmup = round(cfg.scheduler.warmup_epochs * updates_per_epoch)
    s = cfg.scheduler
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_updates, warmup, s.warmup_lr_factor, s.min_lr_factor, s.name),
    )

    start_epoch, best, history = 0, {"epoch": -1, "metrics": {"recall@1": -1.0}}, []
    if resume:
        ckpt = torch.load(paths.last, map_location="cpu", weights_only=True)
        if ckpt.get("format") != TRAIN_STATE_FORMAT:
            raise ValueError(f"{paths.last} is not an arcfold training state")
        model.load_state_dict(ckpt["model"])
        head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"]
        log.info("resuming fold %d from epoch %d (best so far: epoch %d)", fold, start_epoch, best["epoch"])

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_seed = base_seed * 1000 + epoch  # each epoch reproducible on its own, so resume replays it exactly
        seed_everything(epoch_seed)
        train_tf.set_random_seed(epoch_seed)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.train.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed),
            worker_init_fn=lambda worker_id, s=epoch_seed: train_tf.set_random_seed(s + 1 + worker_id),
            persistent_workers=False,
        )
        train_stats = _train_one_epoch(
            cfg, model, head, loader, n_batches, optimizer, scheduler, scaler, params, device, amp_dtype, epoch
        )

        t0 = time.time()
        embeddings = extract_embeddings(
            model,
            val_ds,
            batch_size=cfg.train.eval_batch_size,
            device=device,
            amp_dtype=amp_dtype,
            num_workers=cfg.data.num_workers,
            channels_last=cfg.train.channels_last,
            progress=cfg.train.progress,
            desc=f"fold {fold} epoch {epoch} validation",
        )
        metrics = retrieval_metrics(embeddings, val_df[LABEL].to_numpy(), ks=DEFAULT_KS, device=device)
        val_seconds = time.time() - t0
        improved = metrics["recall@1"] > best["metrics"]["recall@1"]
        row = {
            "epoch": epoch,
            **train_stats,
            "val_seconds": round(val_seconds, 2),
            **{k: v for k, v in metrics.items() if k.startswith(("recall@", "map@"))},
            "best": improved,
        }
        history.append(row)
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
            save_npz(paths.best_oof, embeddings=embeddings)
            save_torch(paths.best, embedding_checkpoint(model, cfg, fold=fold, epoch=epoch, metrics=metrics))
        save_history(paths.history, history)
        if on_epoch_end is not None:
            on_epoch_end(row)
        # the resume point, written last: an epoch counts as done only once everything above is on disk
        save_torch(
            paths.last,
            {
                "format": TRAIN_STATE_FORMAT,
                "config": config_to_dict(cfg),
                "epoch": epoch,
                "model": model.state_dict(),
                "head": head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "best": best,
                "history": history,
            },
        )

    return _finalize(cfg, fold, paths, val_df, best, history, folds_path, time.time() - started)


def _train_one_epoch(
    cfg, model, head, loader, n_batches, optimizer, scheduler, scaler, params, device, amp_dtype, epoch
) -> dict[str, float]:
    model.train()
    head.train()
    accum, clip = cfg.train.accum_steps, cfg.train.grad_clip
    loss_sum, n_seen, nonfinite_in_a_row, n_skipped = 0.0, 0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(total=n_batches, desc=f"epoch {epoch}", disable=not cfg.train.progress, leave=False)
    t0 = time.time()
    warmup_epochs = cfg.head.margin_warmup_epochs  # every head has margin_factor (pair losses ignore it)
    for i, (images, labels) in enumerate(loader):
        if i >= n_batches:
            break
        if warmup_epochs > 0:  # ramp the margin from 0 (hard margins can stall the first epochs)
            head.margin_factor = margin_warmup_factor(epoch + i / n_batches, warmup_epochs)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = head(model(images), labels)
        if not torch.isfinite(loss):
            # an fp16 overflow or a diverging run: skip this batch rather than poison the weights
            n_skipped += 1
            nonfinite_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise FloatingPointError(
                    f"{nonfinite_in_a_row} non-finite losses in a row at epoch {epoch}, batch {i}: "
                    "lower optim.lr, check the data, or use train.amp=bf16/off; the last checkpoint is kept"
                )
            continue
        nonfinite_in_a_row = 0
        scaler.scale(loss / accum).backward()
        need_update = (i + 1) == n_batches or (i + 1) % accum == 0
        if need_update:
            if clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        loss_sum += loss.item() * len(images)
        n_seen += len(images)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    seconds = time.time() - t0
    if n_skipped:
        log.warning("epoch %d: skipped %d batches with a non-finite loss", epoch, n_skipped)
    return {
        "train_loss": loss_sum / max(1, n_seen),
        "lr": optimizer.param_groups[0]["lr"],
        "train_images_per_s": n_seen / max(seconds, 1e-9),
        "train_seconds": round(seconds, 2),
        "skipped_batches": n_skipped,
    }


def _finalize(cfg, fold, paths: FoldPaths, val_df, best, history, folds_path, seconds) -> dict[str, Any]:
    if best["epoch"] < 0:
        raise RuntimeError("no epoch was validated")
    embeddings = load_npz(paths.best_oof)["embeddings"]
    scores = {
        "experiment": cfg.name,
        "fold": fold,
        "best_epoch": best["epoch"],
        "epochs": cfg.train.epochs,
        **best["metrics"],
        "train_images_per_s": float(np.mean([h["train_images_per_s"] for h in history])),
        "seconds": round(seconds, 1),
        "folds_path": str(folds_path),
        "folds_sha256": file_sha256(folds_path),
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # weights first, OOF last: the OOF file is what marks the fold finished
    with atomic_path(paths.weights) as tmp:
        shutil.copyfile(paths.best, tmp)
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
    for p in (paths.last, paths.best, paths.best_oof):  # history.csv and train.log stay
        p.unlink(missing_ok=True)
    log.info(
        "fold %d finished: best epoch %d, R@1 %.4f, MAP@R %.4f -> %s, %s",
        fold,
        best["epoch"],
        scores["recall@1"],
        scores["map@r"],
        paths.oof,
        paths.weights,
    )
    return scores


def parse_folds(spec: str) -> list[int]:
    """'0' -> [0]; '0..4' -> [0, 1, 2, 3, 4]; '0,2' -> [0, 2]."""
    folds: list[int] = []
    for part in spec.split(","):
        if ".." in part:
            lo, hi = part.split("..")
            folds += list(range(int(lo), int(hi) + 1))
        elif part.strip():
            folds.append(int(part))
    if not folds or min(folds) < 0:
        raise ValueError(f"bad fold spec {spec!r}: use K, A..B or A,B,C")
    return folds


def main(argv: list[str] | None = None) -> None:
    from arcfold.cli import add_config_args, config_from_args, setup_logging

    parser = argparse.ArgumentParser(prog="arcfold train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", "-f", required=True, help="fold index, A..B or A,B,C")
    add_config_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    for fold in parse_folds(args.fold):
        train_fold(cfg, fold)


if __name__ == "__main__":
    main()
