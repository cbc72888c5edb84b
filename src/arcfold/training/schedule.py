"""The optimizer (timm's, with parameter groups: the head at its own lr, no weight decay on norms and biases) and the
learning-rate schedule (linear warm-up, then cosine or constant, per optimizer step)."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn

from arcfold.config import ExperimentConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


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
    o = cfg.optim
    head_lr = o.head_lr if o.head_lr is not None else 10 * o.lr
    # timm puts biases, norm layers and scalars (GeM p, PReLU slope) in a no-weight-decay group
    groups = [{**g, "lr": o.lr} for g in param_groups_weight_decay(model, o.weight_decay)]
    groups += [{**g, "lr": head_lr} for g in param_groups_weight_decay(head, o.weight_decay)]
    groups = [g for g in groups if len(g["params"])]
    kwargs: dict[str, Any] = {"momentum": o.momentum} if o.name == "sgd" else {}
    # fused: the whole update of every tensor in one kernel (torch's fused Adam/AdamW/SGD, CPU and CUDA). PyTorch
    # defaults to a Python loop over the tensors on CPU and to foreach on CUDA; on this project's 2-core CPU a
    # resnet18 + ArcFace-head Adam step alone took 6.6 ms fused against 32 ms foreach and 34 ms looped (a one-off
    # micro-benchmark), and a whole 64 px batch-32 training step with foreach ran at 0.949x the fused one
    # (benchmarks/bench_train.py, its bare_foreach loop). A device without fused kernels gets foreach.
    try:
        return create_optimizer_v2(groups, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, fused=True, **kwargs)
    except RuntimeError:  # "`fused=True` requires all the params to be floating point Tensors of supported devices"
        return create_optimizer_v2(groups, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, foreach=True, **kwargs)


def build_scheduler(
    cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int, n_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` over ``updates_per_epoch * n_epochs`` optimizer steps, warm-up ``scheduler.warmup_epochs``."""
    s = cfg.scheduler
    total_updates = updates_per_epoch * n_epochs
    warmup = round(s.warmup_epochs * updates_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_updates, warmup, s.warmup_lr_factor, s.min_lr_factor, s.name),
    )
