"""Exponential moving average of the training weights (``train.ema_decay``), kept by timm's ``ModelEmaV3``.

What it covers: the embedding model *and* the head, one ``ModelEmaV3`` over both, so that the head saved in
``fold<K>.pt`` (reused by ``model.init_from``) is the head of the embedding model saved beside it. The train stage
validates every epoch, writes the kept epoch's OOF embeddings and saves ``fold<K>.pt`` with the EMA weights, so
inference, the test stage and blends use the EMA model without knowing about it.

What is averaged: parameters *and* floating-point buffers (ModelEmaV3's default, ``exclude_buffers=False``): the
BatchNorm running statistics are the EMA of the trained model's, consistent with EMA weights that drift slowly;
integer buffers (``num_batches_tracked``) are copied. The EMA is kept in fp32 on the model's device (AMP autocasts
the activations, the weights stay fp32).

When: after every *applied* optimizer step (one per window of ``train.accum_steps`` batches; a step skipped for a
non-finite loss or inf/NaN gradients does not update it). The decay of the n-th update:

* ``ema_warmup=true`` (ModelEmaV3's ``use_warmup``, called with ``step=n``): ``min(ema_decay, 1 - n^(-2/3))``, i.e.
  0 at the first update (the EMA restarts from the first trained weights), 0.9 at n = 32, 0.99 at 1,000, 0.999
  at 31,623: a short run is not dominated by its random init. ``n`` is part of the resume state.
* ``ema_warmup=false``: ``ema_decay`` from the first update (called with ``step=None``), so after one step the EMA
  is ``d * w0 + (1 - d) * w1`` of the weights before (w0) and after (w1) it.

Several processes: the EMA is of the unwrapped modules (not the DDP wrapper), identical on every rank. A head
sharded over the ranks (``head.sharded``) is refused by the config check.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

__all__ = ["WeightEma", "build_ema"]


class WeightEma:
    """EMA of ``model`` and ``head`` (updated in place from them); ``model`` / ``head`` are the averaged copies
    (eval mode). ``updates`` counts the updates so far: the warm-up's step, saved in the resume point."""

    def __init__(self, model: nn.Module, head: nn.Module, decay: float, warmup: bool) -> None:

        self.decay, self.warmup = decay, warmup
        self._source = nn.ModuleDict({"model": model, "head": head})  # the live modules (no copy)
        self._ema = ModelEmaV3(self._source, decay=decay, use_warmup=warmup)  # deep copy of both
        self.updates = 0
        self.last_decay = 0.0  # the decay of the latest update (history.csv: how far the warm-up is)

    @property
    def model(self) -> nn.Module:
        return self._ema.module["model"]

    @property
    def head(self) -> nn.Module:
        return self._ema.module["head"]

    def update(self) -> None:
        """Fold the live weights in; call after each applied optimizer step."""
        self.updates += 1
        step = self.updates if self.warmup else None
        self.last_decay = self._ema.get_decay(step)
        self._ema.update(self._source, step=step)

    def state_dict(self) -> dict[str, Any]:
        """Plain data + CPU tensors (``last.pt``): ``{"state_dict": {"model.<key>", "head.<key>"}, "updates": n}``."""
        state = {k: v.detach().cpu() for k, v in self._ema.module.state_dict().items()}
        return {"state_dict": state, "updates": self.updates, "last_decay": self.last_decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ema.module.load_state_dict(state["state_dict"])
        self.updates, self.last_decay = int(state["updates"]), float(state["last_decay"])


def build_ema(model: nn.Module, head: nn.Module, decay: float, warmup: bool) -> WeightEma | None:
    """A :class:`WeightEma` starting from the current weights, or None when ``decay`` is 0 (EMA off)."""
    if decay <= 0:
        return None
    with torch.no_grad():
        return WeightEma(model, head, decay, warmup)
