"""The epoch loop: forward passes over a loader, the optimizer step left to :class:`OptimizerStep`."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from arcfold.config import ExperimentConfig
from arcfold.data.transforms import BatchNormalise, BatchShift, collate_uint8
from arcfold.distributed import DistContext, reduce_mean
from arcfold.io import fault_point
from arcfold.models.margins import margin_warmup_factor
from arcfold.training.step import OptimizerStep

log = logging.getLogger(__name__)

__all__ = ["build_train_collate", "train_one_epoch"]


def build_train_collate(device: torch.device, batch_augment: bool = False) -> tuple[Callable, BatchNormalise | None]:
    """The training loader's ``collate_fn`` for uint8 images (``build_train_transform(..., normalise=False)``) and
    the normalisation left to the device (``None`` when the loader normalises).

    CPU: the loader stacks and normalises each batch in one numpy pass (float32 out, as ``Normalize ->
    ToTensorV2`` per image gave, bit for bit). CUDA: the loader hands over uint8 (a quarter of the bytes over
    PCIe) and :func:`train_one_epoch` normalises on the device after the transfer. ``batch_augment``: a batch-level
    augmentation runs on the uint8 batch in :func:`train_one_epoch`, so the normalisation waits for it there.
    """
    normalise = BatchNormalise(device)
    if device.type == "cpu" and not batch_augment:
        return functools.partial(collate_uint8, normalise=normalise), None
    return collate_uint8, normalise


def train_one_epoch(
    cfg: ExperimentConfig,
    model: nn.Module,
    head: nn.Module,
    loader: Iterable,
    n_batches: int,
    step: OptimizerStep,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    epoch: int,
    *,
    ddp: DistributedDataParallel | None = None,
    ctx: DistContext | None = None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    augment: BatchShift | None = None,
) -> dict[str, float]:
    """One pass over the first ``n_batches`` of ``loader``; ``step`` owns accumulation, scaling, clipping, skips.

    Several processes: ``ddp`` wraps a :class:`~arcfold.training.ddp.DistributedTrainStep` of ``model`` (and
    ``head``, unless it is sharded: then ``step.sharded_params`` are its parameters, different on every rank). The
    losses and images counted are those of the global batch. ``normalise``: applied to each image batch once it is
    on ``device`` (the uint8 batches of :func:`build_train_collate` under CUDA). ``augment``: a batch-level
    augmentation (:func:`arcfold.data.transforms.build_batch_augment`, its epoch seed already set) applied to each
    uint8 batch on ``device`` before ``normalise``; every batch draws, also one skipped for a non-finite loss.
    """
    ctx = ctx or DistContext()
    model.train()
    head.train()
    loss_sum, n_seen = 0.0, 0
    step.start_epoch()
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
        if augment is not None:
            images = augment(images, ctx.rank, ctx.world_size)
        if normalise is not None:
            images = normalise(images)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        need_update, window = step.window(i, n_batches)
        where = f"epoch {epoch}, batch {i}"
        # DDP all-reduces the gradients only on the last micro-batch of an accumulation window
        sync = ddp.no_sync() if ddp is not None and not need_update else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                if ddp is None:
                    loss = head(model(images), labels)
                elif step.sharded_params is None:
                    loss = ddp(images, labels)  # the head runs inside DDP
                else:
                    loss = head(ddp(images, labels), labels)  # the sharded head, outside DDP
            # the global batch's loss: the same on every rank, so every rank takes the same skip decision
            global_loss = reduce_mean(loss, ctx) if ctx.enabled else loss
            finite = step.backward(loss, global_loss, window, where)
        if need_update:
            step.update(where)
        elif finite:
            step.guard.ok()
        if not finite:
            bar.update()
            continue
        loss_sum += global_loss.item() * len(images) * ctx.world_size
        n_seen += len(images) * ctx.world_size
        bar.update()
        bar.set_postfix(loss=f"{global_loss.item():.3f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    seconds = time.time() - t0
    if step.skipped_batches or step.skipped_steps:
        log.warning(
            "epoch %d: skipped %d batches with a non-finite loss and %d optimizer steps with inf/NaN gradients",
            epoch,
            step.skipped_batches,
            step.skipped_steps,
        )
    return {
        "train_loss": loss_sum / max(1, n_seen),
        "lr": step.optimizer.param_groups[0]["lr"],
        "train_images_per_s": n_seen / max(seconds, 1e-9),
        "train_seconds": round(seconds, 2),
        "skipped_batches": step.skipped_batches,
        "skipped_steps": step.skipped_steps,
        **({"ema_decay": step.ema.last_decay} if step.ema is not None else {}),  # the decay of the epoch's last update
    }
