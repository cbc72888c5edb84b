"""Several processes (DistributedDataParallel under torchrun): the device of a rank, what DDP wraps, the sharded
head (Partial FC) and its optimizer state, the config checks only a multi-process run needs. See the module doc of
:mod:`arcfold.training.fold` for how a fold trains over several processes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from arcfold.config import ExperimentConfig
from arcfold.distributed import DistContext
from arcfold.errors import ArtifactExistsError, ConfigError
from arcfold.models.heads import build_head
from arcfold.models.losses import LOSSES
from arcfold.models.partial_fc import SHARDED_KINDS, ShardedMarginHead
from arcfold.runtime import resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "DistributedTrainStep",
    "GlobalPairLoss",
    "build_ddp",
    "build_sharded_head",
    "check_distributed_config",
    "freeze_unused_parameters",
    "sharded_optimizer_state",
    "to_cpu",
    "training_device",
]


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


class GlobalPairLoss(nn.Module):
    """A :class:`arcfold.models.losses.PairLossHead` on the global batch: PML's ``DistributedLossWrapper`` and
    ``DistributedMinerWrapper`` all-gather the embeddings and labels of every rank. Returns L, the loss of the
    global batch (the wrapper returns world_size * L), the same on every rank. The head object itself is kept
    unchanged, so its state dict (saved in ``last.pt``) has the same keys as in one process."""

    def __init__(self, head: nn.Module, world_size: int) -> None:
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


def build_ddp(
    cfg: ExperimentConfig, model: nn.Module, head: nn.Module, ctx: DistContext, device: torch.device
) -> DistributedDataParallel:
    """DDP around a :class:`DistributedTrainStep` of ``model`` and ``head`` (the head left out when it is sharded;
    a pair/proxy loss on the global batch). Parameters the embedding never uses are frozen first."""
    in_ddp_head, grad_factor = (None if cfg.head.sharded else head), 1.0
    if cfg.head.name in LOSSES:  # pair/proxy losses: on the global batch, see DistributedTrainStep
        in_ddp_head, grad_factor = GlobalPairLoss(head, ctx.world_size), float(ctx.world_size)
    freeze_unused_parameters(model, cfg.data.image_size, device)
    return DistributedDataParallel(
        DistributedTrainStep(model, in_ddp_head, grad_factor), device_ids=[device] if device.type == "cuda" else None
    )


def freeze_unused_parameters(model: nn.Module, image_size: int, device: torch.device) -> None:
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


def check_distributed_config(cfg: ExperimentConfig, ctx: DistContext, device: torch.device) -> None:
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


def build_sharded_head(cfg: ExperimentConfig, n_classes: int, ctx: DistContext) -> nn.Module:
    """The class-sharded margin head (``head.sharded``): this rank's rows of the class centres.

    The rows are those of the unsharded head a single process would build at this point (made on the CPU and
    dropped again: C x D fp32 of host memory for a moment, 2 GiB at 1M x 512), so that the run starts from the
    single-process weights and draws the same random numbers afterwards.
    """
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


def sharded_optimizer_state(ckpt: dict[str, Any], ctx: DistContext, source: Path) -> dict[str, Any]:
    """This rank's optimizer state from a resume point of a sharded head (one state per rank)."""
    states = ckpt.get("optimizer_ranks")
    if states is None or len(states) != ctx.world_size:
        found = "no per-rank state" if states is None else f"{len(states)} processes"
        raise ArtifactExistsError(
            f"{source} was not written by a head.sharded=true run of {ctx.world_size} processes ({found}); resume "
            "with the same number of processes, or start over with train.force=true"
        )
    return states[ctx.rank]


def to_cpu(obj: Any) -> Any:
    """Tensors of a nested dict/list moved to the CPU (to gather optimizer states across ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
