"""Class-sharded margin head (Partial FC): each rank holds a slice of the class centres, the softmax spans ranks.

With 80k-1M classes the centres ``W (C, D)``, their gradient and the AdamW moments (4 copies of C x D fp32:
8 GiB at C = 1M, D = 512) and the logits of the global batch outgrow one GPU. Following Partial FC (An et al.,
"Partial FC: Training 10 Million Identities on a Single Machine", ICCV-W 2021; insightface ``partial_fc_v2``),
rank r of w holds the rows ``shard_range(C, r, w)`` of ``W`` and, per step:

1. all-gathers the embeddings (with autograd) and the labels of the global batch, N = sum of the per-rank B;
2. computes the cosine logits ``(N, C_r)`` of its own classes, the margin (``heads.arcface_logits`` /
   ``heads.cosface_logits``) applied to the target logit only in the rows whose class lives on this rank;
3. computes the cross-entropy over all C classes without ever holding an ``(N, C)`` block: the row max and
   then the row sum of ``exp(z - max)`` and the target logit are all-reduced (:func:`distributed_cross_entropy`).

The loss is the mean over the N rows of the global batch and the same scalar on every rank. Only the
distributed softmax is written by hand: ``F.cross_entropy`` needs every logit of a row in one tensor, and
neither torch.distributed nor any library we depend on has a cross-entropy over class-sharded logits. The
collectives are torch's ``dist.all_gather`` / ``dist.all_reduce``; the embeddings' all-gather is wrapped in a
small autograd Function (backward: all-reduce of the gradient, this rank's rows, times world_size).

Gradient convention (the head is *not* wrapped in DDP; the backbone is):

* the weight shard ``weight (C_r, D)`` receives exactly the rows ``[start, stop)`` of the single-process
  gradient of the same global batch (no scaling, no averaging; keep the head out of DDP);
* the gradient reaching each rank's embeddings is ``world_size`` times the single-process gradient of the mean
  loss with respect to those rows, so that after DDP *averages* the backbone gradients over the world_size
  ranks, the backbone gradient equals the single-process gradient of the global batch.

Numerics: everything after the embeddings runs in fp32 with autocast disabled (the margin arithmetic as in
``heads.py``). The row max is taken across ranks before any ``exp``, so ``exp(z - max) <= 1`` and no row can
overflow whatever the scale (the tests use s = 2000, where a naive fp32 ``exp(z)`` is inf). With
``world_size == 1`` the forward is literally ``classification_loss(arcface_logits(...))``, bit for bit the
loss of ``heads.ArcFaceHead`` / ``heads.CosFaceHead`` with the same weight.

Memory per rank (``benchmarks/bench_partial_fc.py``): state 4 C_r D fp32 (weights, gradient, AdamW moments);
one logits block N C_r = B C fp32, not shrunk by sharding. The forward + backward peaks at about 3.6 weight-sized
temporaries (``F.normalize`` of the shard and its backward) + 2.9 logits blocks (fit on CPU), so the weight
temporaries outweigh the logits unless w B is above about D; ``sample_rate`` shrinks both.

Optional class sampling (``sample_rate < 1``, Partial FC's negative sampling, positives always kept) shrinks
the logits; ``sample_rate = 1`` (the default) is exact. Not supported here (the unsharded heads have them):
per-class (dynamic) margins, class weights, focal loss, sub-centres. ``margin_factor`` (margin warm-up) is.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from arcfold import distributed
from arcfold.models.margins import arcface_logits, classification_loss, cosface_logits

__all__ = ["SHARDED_KINDS", "ShardedMarginHead", "distributed_cross_entropy", "shard_range"]

# margin kind -> the unsharded heads' logits function (cosine (B, C), labels (B,), margin, scale) -> (B, C) fp32
_MARGIN_LOGITS = {"arcface": arcface_logits, "cosface": cosface_logits}
SHARDED_KINDS: tuple[str, ...] = tuple(_MARGIN_LOGITS)


def shard_range(n_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the class centres held by ``rank``: contiguous, sizes differ by at most 1.

    The first ``n_classes % world_size`` ranks hold one class more.

    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size (got rank={rank}, world_size={world_size})")
    if n_classes < world_size:
        raise ValueError(f"n_classes={n_classes} is smaller than world_size={world_size}: a rank would hold no class")
    return distributed.shard_range(n_classes, rank, world_size)  # the same split as the validation rows


# ----------------------------------------------------------------------------------------------------------------------
# the distributed softmax cross-entropy


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits sharded by column over the ranks of ``group``; see the module docstring.

    forward: logits (N, C_r) float, local_labels (N,) int64 (the target's column in this shard, -1 where the
    target lives on another rank) -> scalar, the same on every rank. Collectives: an all-reduce MAX of the
    row max (N,) and one all-reduce SUM of the stacked (row sum of exp, target logit) (2, N). backward is
    local: ``dL/dz = (softmax - onehot) / N`` on this shard's columns (the softmax is kept from the forward,
    one (N, C_r) block, as in insightface's ``DistCrossEntropyFunc``).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, local_labels: torch.Tensor, group, distributed: bool) -> torch.Tensor:
        n_rows = len(logits)
        row_max = logits.detach().amax(dim=1)  # (N,) this shard's max
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)  # (N,) max over all C classes
        exp = (logits.detach() - row_max[:, None]).exp_()  # (N, C_r) in (0, 1]: cannot overflow
        here = (local_labels >= 0).nonzero()[:, 0]  # rows whose target column is in this shard
        target = torch.zeros(n_rows, dtype=logits.dtype, device=logits.device)  # (N,) z_y - max, 0 elsewhere
        target[here] = logits.detach()[here, local_labels[here]] - row_max[here]
        sums = torch.stack([exp.sum(dim=1), target])  # (2, N)
        if distributed:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)  # each target lives on exactly one rank
        sum_exp, target = sums  # (N,) sum_j exp(z_j - max) >= 1, (N,) z_y - max <= 0
        loss = (sum_exp.log() - target).mean()  # -log softmax_y = log sum exp(z - max) - (z_y - max)
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local_labels)  # (N, C_r) softmax of this shard
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_labels = ctx.saved_tensors
        here = (local_labels >= 0).nonzero()[:, 0]
        grad = softmax.clone()  # (N, C_r)
        grad[here, local_labels[here]] -= 1.0
        return grad.mul_(grad_loss / len(softmax)), None, None, None


def distributed_cross_entropy(logits: torch.Tensor, local_labels: torch.Tensor, group=None) -> torch.Tensor:
    """Mean softmax cross-entropy over classes sharded by column across the ranks of ``group``.

    logits: (N, C_r) this rank's columns of the (N, C) logits, the same N rows on every rank; local_labels: (N,)
    int64, the target's column within this shard, or -1 where the target is another rank's class. Returns the
    mean over the N rows of ``logsumexp_j z_j - z_y`` (a scalar, the same on every rank; computed in the logits'
    dtype) and, backward, exactly ``(softmax - onehot) / N`` for this shard's columns. Without an initialised
    process group (``torch.distributed`` not initialised) it is the plain cross-entropy of the local columns.
    """
    distributed = dist.is_available() and dist.is_initialized()
    return _ShardedCrossEntropy.apply(logits, local_labels, group, distributed)


class _AllGatherScaledGrad(torch.autograd.Function):
    """All-gather of equal-shaped (B, D) tensors with autograd: forward (w * B, D) in rank order; backward, the
    gradients of every rank's copy are summed (all-reduce) and this rank's rows come back times ``grad_factor``.

    torch's autograd all-gather (``torch.distributed.nn.functional.all_gather``) is deprecated in torch 2.x (its
    suggested successor is in the private ``torch.distributed._functional_collectives``); the gradient sum here is
    an all-reduce of the small (w * B, D) block, which every backend (gloo, nccl) has.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, world_size: int, rank: int, grad_factor: float) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.grad_factor, ctx.rows = group, rank, grad_factor, len(x)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)  # (w * B, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()  # (w * B, D) this rank's gradient of every rank's rows
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        mine = grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]  # (B, D) summed over the class shards
        return mine * ctx.grad_factor, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# the head


class ShardedMarginHead(nn.Module):
    """ArcFace / CosFace head whose class centres are sharded over ``world_size`` ranks (Partial FC).

    ``kind``: ``arcface`` (``margin`` m in radians, typical 0.2-0.5) or ``cosface`` (m in cosine units, typical
    0.1-0.4); ``scale`` s typical 30-64. Rank ``rank`` holds ``weight (C_r, D)`` = rows ``shard_range(n_classes,
    rank, world_size)`` of the full ``(n_classes, D)`` centres, initialised N(0, 1) (the scheme of
    ``heads.ArcFaceHead``, not the same numbers). ``group``: the process group of
    the ``world_size`` ranks (None: the default group). With ``world_size == 1`` no collective is used.

    ``forward(embeddings (B, D), labels (B,) global class ids) -> scalar fp32`` loss, the mean over the global
    batch of all ranks, identical on every rank. Every rank must call it in the same step (it is collective);
    the per-rank B may differ. Gradients: the weight shard gets its rows of the single-process gradient; the
    embeddings get ``world_size`` times the single-process gradient, so that DDP's *average* of the backbone
    gradients equals the single-process backbone gradient (see the module docstring). The head must not be
    wrapped in DDP: its shards differ per rank by design.

    ``sample_rate < 1`` (Partial FC's class sampling; typical 0.1-0.3 at 1M classes): in training mode each rank
    keeps the classes of its shard that are a target in the global batch plus random others, in all
    ``ceil(sample_rate * C_r)`` (or all its positives if they are more), and the softmax runs over the kept classes
    of all ranks only: the loss and gradients are those of the unsharded head restricted to those classes, and
    the rows not kept get a zero gradient (AdamW still decays them and moves them by their moments). The logits
    block shrinks by ``sample_rate``. ``last_sampled`` holds the global ids kept at the last step. In eval mode,
    and with ``sample_rate = 1`` (exact, the default), every class is used.
    """

    def __init__(
        self,
        kind: str,
        embedding_size: int,
        n_classes: int,
        scale: float,
        margin: float,
        rank: int = 0,
        world_size: int = 1,
        group=None,
        *,
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1] (got {sample_rate})")
        if kind not in _MARGIN_LOGITS:
            raise ValueError(f"sharded head kind {kind!r} is unknown; choose one of {', '.join(SHARDED_KINDS)}")
        self.kind, self.embedding_size, self.n_classes = kind, embedding_size, n_classes
        self.scale, self.margin = scale, margin
        self.rank, self.world_size, self.group = rank, world_size, group
        self.sample_rate = sample_rate
        self.last_sampled: torch.Tensor | None = None  # (S_r,) global class ids of the last sampled step
        self.start, self.stop = shard_range(n_classes, rank, world_size)
        self.margin_factor = 1.0  # set by the train loop for margin warm-up; not part of the state dict
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, embedding_size))  # (C_r, D) this shard
        nn.init.normal_(self.weight)  # N(0, 1), as heads.ArcFaceHead (why: heads._CosineHead)

    # ------------------------------------------------------------------------------------------------ pieces

    def sample_columns(self, labels: torch.Tensor) -> torch.Tensor | None:
        """(N,) global labels -> (S_r,) ascending columns of this shard to keep, or None for all of them.

        None unless training with ``sample_rate < 1``. Every positive (a class of this shard that is a target in
        the batch) is kept; random other columns fill up to ``ceil(sample_rate * C_r)``.
        """
        if self.sample_rate >= 1.0 or not self.training:
            return None
        n_local = self.stop - self.start
        positives = torch.unique(labels[(labels >= self.start) & (labels < self.stop)] - self.start)  # ascending
        n_keep = math.ceil(self.sample_rate * n_local)
        if len(positives) >= n_keep:
            columns = positives
        else:
            priority = torch.rand(n_local, device=labels.device)  # (C_r,) in [0, 1)
            priority[positives] = 2.0  # positives first
            columns = priority.topk(n_keep).indices.sort().values
        self.last_sampled = columns + self.start
        return columns

    def shard_logits(
        self, embeddings: torch.Tensor, labels: torch.Tensor, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This shard's columns of the training logits: (N, D) embeddings, (N,) global labels -> (N, C_r) fp32.

        ``columns`` (S_r,) ascending: only those columns of the shard (from :meth:`sample_columns`), (N, S_r).
        The margin goes to the target logit of the rows whose class is in this shard; the other rows are
        ``s cos`` only. They are passed to the heads' logits function with margin 0 and column 0 as a stand-in
        target, which leaves that column's value and gradient unchanged (``cos(theta + 0)``, ``cos - 0``).
        """
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            weight = self.weight if columns is None else self.weight[columns]  # (C_r or S_r, D)
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(weight.float()))  # (N, C_r or S_r)
            column = self.local_labels(labels, columns)  # (N,) -1 where the target is not among the columns
            here = column >= 0
            margin = torch.where(here, float(self.margin * self.margin_factor), 0.0).float()  # (N,)
            return _MARGIN_LOGITS[self.kind](cosine, column.clamp(min=0), margin, self.scale)

    def local_labels(self, labels: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) global class ids -> (N,) column in this shard (or among ``columns``), -1 where the class is elsewhere.

        With ``columns`` every positive of this shard is among them (:meth:`sample_columns` keeps them all).
        """
        here = (labels >= self.start) & (labels < self.stop)
        column = labels - self.start
        if columns is not None:
            column = torch.searchsorted(columns, column.clamp(0, self.stop - self.start - 1))
        return torch.where(here, column, -1)

    def _gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local (B, D), (B,) -> global (N, D), (N,) in rank order. Backward, the embeddings' gradient is summed
        over the class shards and multiplied by world_size (the DDP-averaging convention of the class docstring)."""
        sizes = [torch.zeros(1, dtype=torch.int64, device=labels.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(labels)], device=labels.device), group=self.group)
        sizes = [int(s) for s in sizes]
        pad = max(sizes) - len(labels)  # all_gather needs equal shapes: pad to the largest per-rank batch B_max
        padded_labels = F.pad(labels, (0, pad), value=-1)
        all_labels = [torch.empty_like(padded_labels) for _ in range(self.world_size)]
        dist.all_gather(all_labels, padded_labels, group=self.group)
        all_embeddings = _AllGatherScaledGrad.apply(
            F.pad(embeddings, (0, 0, 0, pad)), self.group, self.world_size, self.rank, float(self.world_size)
        ).split(max(sizes))  # w x (B_max, D)
        return (
            torch.cat([e[:n] for e, n in zip(all_embeddings, sizes, strict=True)]),  # (N, D)
            torch.cat([y[:n] for y, n in zip(all_labels, sizes, strict=True)]),  # (N,)
        )

    def _check_group(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"ShardedMarginHead with world_size={self.world_size} needs torch.distributed initialised"
            )
        group_size, group_rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if (group_size, group_rank) != (self.world_size, self.rank):
            raise RuntimeError(
                f"ShardedMarginHead built for rank {self.rank} of {self.world_size}, "
                f"but the process group says rank {group_rank} of {group_size}"
            )

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (B, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels.shape != (len(embeddings),) or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 of shape ({len(embeddings)},), got {labels.dtype} {tuple(labels.shape)}"
            )

    @staticmethod
    def _check_label_range(labels: torch.Tensor, n_classes: int) -> None:
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():  # checked on the gathered labels, so every rank raises together instead of hanging
            raise ValueError(
                f"labels must be class ids in [0, {n_classes}); got {labels[bad].unique()[:10].tolist()} "
                f"in the global batch"
            )

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if self.world_size == 1:  # exactly the unsharded head: same logits function, same loss call
                self._check_label_range(labels, self.n_classes)
                columns = self.sample_columns(labels)
                logits = self.shard_logits(embeddings, labels, columns)  # (B, C) fp32 (sampled: (B, S))
                return classification_loss(logits, self.local_labels(labels, columns))
            self._check_group()
            all_embeddings, all_labels = self._gather(embeddings, labels)  # (N, D), (N,)
            self._check_label_range(all_labels, self.n_classes)
            columns = self.sample_columns(all_labels)  # None, or (S_r,) with every positive of this shard
            logits = self.shard_logits(all_embeddings, all_labels, columns)  # (N, C_r) fp32 (sampled: (N, S_r))
            return distributed_cross_entropy(logits, self.local_labels(all_labels, columns), self.group)

    # ------------------------------------------------------------------------------------------------ checkpoints

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"weight": (n_classes, D)}``, the full centres on every rank (collective: every rank must call it).

        The layout is that of ``heads.ArcFaceHead.weight`` / ``CosFaceHead.weight``.
        """
        if self.world_size == 1:
            return {"weight": self.weight.detach().clone()}
        self._check_group()
        rows = max(b - a for a, b in (shard_range(self.n_classes, r, self.world_size) for r in range(self.world_size)))
        padded = F.pad(self.weight.detach(), (0, 0, 0, rows - len(self.weight)))  # (C_max, D)
        shards = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(shards, padded, group=self.group)
        sizes = [b - a for a, b in (shard_range(self.n_classes, r, self.world_size) for r in range(self.world_size))]
        return {"weight": torch.cat([s[:n] for s, n in zip(shards, sizes, strict=True)])}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the full ``{"weight": (n_classes, D)}`` (from :meth:`full_state_dict` or an unsharded head); keeps
        this rank's rows. Not collective."""
        weight = state["weight"]
        if tuple(weight.shape) != (self.n_classes, self.embedding_size):
            raise ValueError(
                f"full weight must be ({self.n_classes}, {self.embedding_size}), got {tuple(weight.shape)}"
            )
        self.weight.copy_(weight[self.start : self.stop])

    def extra_repr(self) -> str:
        unit = "rad" if self.kind == "arcface" else "(cosine units)"
        return (
            f"kind={self.kind}, embedding_size={self.embedding_size}, n_classes={self.n_classes}, "
            f"rows=[{self.start}, {self.stop}), rank={self.rank}, world_size={self.world_size}, "
            f"scale={self.scale}, margin={self.margin} {unit}"
            + (f", sample_rate={self.sample_rate}" if self.sample_rate < 1 else "")
        )
