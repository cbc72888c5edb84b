"""One owner of the optimizer step: accumulation windows, AMP loss scaling, clipping, the non-finite guard, the
scheduler and the EMA update (the shape of timm's ``NativeScaler`` with its ``need_update`` rule).

The epoch loop (:func:`arcfold.training.loop.train_one_epoch`) only runs forward passes and hands each loss to
:meth:`OptimizerStep.backward`, then calls :meth:`OptimizerStep.update` at the end of each window.
"""

from __future__ import annotations

import torch
from torch import nn

from arcfold.config import ExperimentConfig
from arcfold.errors import NonFiniteLossError
from arcfold.training.ema import WeightEma

__all__ = ["NonFiniteGuard", "OptimizerStep", "clip_grad_norm_if_needed_", "sharded_grad_norm"]


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


def sharded_grad_norm(params: list[nn.Parameter], sharded: list[nn.Parameter]) -> torch.Tensor:
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


class OptimizerStep:
    """Steps the optimizer once per window of ``accum_steps`` batches, on the gradient of the window's mean loss (the
    last window of the epoch may be shorter: its batches are divided by its real length, not by ``accum_steps``).

    The scheduler advances once per window, whether its step was applied or skipped. A window in which a batch has a
    non-finite loss applies no update at all: the gradients of its other batches are dropped too. Steps skipped for
    inf/NaN gradients (by GradScaler under fp16, by a check of the gradient norm otherwise) and non-finite losses
    count towards ``guard``; ``ema`` is updated after every applied step (not after a skipped one).

    ``sharded_params``: the parameters of a class-sharded head (Partial FC), different on every rank; the gradient
    norm then spans every rank's rows. ``skipped_batches`` / ``skipped_steps`` count what one epoch skipped
    (:meth:`start_epoch` resets them).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        params: list[nn.Parameter],
        *,
        accum_steps: int = 1,
        grad_clip: float = 0.0,
        guard: NonFiniteGuard,
        sharded_params: list[nn.Parameter] | None = None,
        ema: WeightEma | None = None,
    ) -> None:
        self.optimizer, self.scheduler, self.scaler, self.params = optimizer, scheduler, scaler, params
        self.accum, self.clip, self.guard = accum_steps, grad_clip, guard
        self.sharded_params, self.ema = sharded_params, ema
        self.window_bad = False  # a non-finite loss in the current accumulation window: it applies no update
        self.skipped_batches = self.skipped_steps = 0

    @classmethod
    def from_config(
        cls,
        cfg: ExperimentConfig,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        params: list[nn.Parameter],
        guard: NonFiniteGuard | None = None,
        **kwargs,
    ) -> OptimizerStep:
        """``train.accum_steps``, ``train.grad_clip``; a fresh guard of ``train.max_nonfinite_steps`` unless given."""
        guard = guard if guard is not None else NonFiniteGuard(cfg.train.max_nonfinite_steps)
        return cls(
            optimizer, scheduler, scaler, params, accum_steps=cfg.train.accum_steps, grad_clip=cfg.train.grad_clip,
            guard=guard, **kwargs,
        )  # fmt: skip

    def start_epoch(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.window_bad = False
        self.skipped_batches = self.skipped_steps = 0

    def window(self, i: int, n_batches: int) -> tuple[bool, int]:
        """For batch ``i`` of ``n_batches``: whether it ends a window (an update follows), and that window's length."""
        need_update = (i + 1) == n_batches or (i + 1) % self.accum == 0
        return need_update, min(self.accum, n_batches - i // self.accum * self.accum)

    def backward(self, loss: torch.Tensor, global_loss: torch.Tensor, window: int, where: str) -> bool:
        """Back-propagate ``loss / window`` (scaled under fp16) when ``global_loss`` (the loss of the global batch,
        the same on every rank) is finite; otherwise mark the window bad and count the batch. Returns finiteness."""
        finite = bool(torch.isfinite(global_loss))
        if not finite:
            # an fp16 overflow or a diverging run: rather than poison the weights, the whole window applies no update
            # (the gradients of its other batches are dropped, as GradScaler drops a window whose gradients
            # overflow); the scheduler still advances at the window's end
            self.skipped_batches += 1
            self.window_bad = True
            self.guard.skipped(where, f"loss is {global_loss.item()}")
        else:  # the window's mean loss: each batch divided by the window's real length
            self.scaler.scale(loss / window).backward()
        return finite

    def update(self, where: str) -> None:
        """The end of a window: step (or skip) the optimizer, clear the gradients, advance the scheduler."""
        optimizer, scaler, params, clip = self.optimizer, self.scaler, self.params, self.clip
        if self.window_bad:  # already counted at its non-finite batch
            step_ok, why = None, ""
        elif self.sharded_params is not None:  # the norm spans every rank's rows of the head
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            norm = sharded_grad_norm(params, self.sharded_params)
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
        self.scheduler.step()  # once per window, applied or skipped: the schedule never drifts
        self.window_bad = False
        if step_ok:
            self.guard.ok()
            if self.ema is not None:
                self.ema.update()
        elif step_ok is not None:
            self.skipped_steps += 1
            self.guard.skipped(where, why)
