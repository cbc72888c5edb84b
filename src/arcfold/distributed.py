"""torch.distributed for the train stage: the process group from torchrun's environment, and a few collectives.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in each; :func:`dist_context` reads them (world size 1 without them: the single-process path, which
never touches torch.distributed). :func:`process_group` joins the group for the duration of a fold: NCCL on CUDA,
gloo on CPU, with a timeout so that a rank that died or hangs makes the others fail instead of waiting forever.

Everything else is torch's own: DistributedDataParallel, SyncBatchNorm, ``all_gather``/``all_reduce``,
pytorch-metric-learning's ``DistributedLossWrapper``. What is here is what torch has no one-liner for: gathering
row shards of unequal length back in their original order (:func:`gather_rows`), an index range per rank
(:func:`shard_range`), and running a step on rank 0 while the others wait for its result or its error
(:func:`on_rank0`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["DistContext", "dist_context", "gather_rows", "on_rank0", "process_group", "reduce_mean", "shard_range"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs to ``train.log`` and shows progress bars."""
        return self.rank == 0


def dist_context() -> DistContext:
    """The context torchrun set in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process without."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {e}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world_size}")
    return DistContext(rank, world_size, local_rank)


@contextlib.contextmanager
def process_group(ctx: DistContext, device: torch.device, timeout_s: float) -> Iterator[None]:
    """Join the process group of ``ctx`` (a no-op for one process or when already joined), leave it on exit.

    ``timeout_s`` bounds the rendezvous and every collective: a rank that crashed or hangs makes the others
    raise after at most that long (torchrun also stops the other workers as soon as one exits with an error).
    On a normal exit the ranks meet at a barrier before the group is destroyed, so none leaves while another
    still needs it; on an error the group is destroyed at once (a barrier could wait for a rank that is gone).
    """
    if not ctx.enabled or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    log.debug("rank %d of %d joined the %s process group", ctx.rank, ctx.world_size, backend)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``rank`` handles: contiguous, sizes differ by at most one.

    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_rows(local: np.ndarray, ctx: DistContext, device: torch.device) -> np.ndarray:
    """Concatenate every rank's ``(n_r, ...)`` rows in rank order; every rank gets the whole ``(sum n_r, ...)`` array.

    Ranks may hold different numbers of rows (:func:`shard_range`): each shard is padded to the longest for
    ``all_gather`` (which needs equal shapes) and the padding is cut off again, so no row is duplicated or lost.
    ``device`` is where the collective runs (the rank's GPU under NCCL, the CPU under gloo).
    """
    if not ctx.enabled:
        return local
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([len(local)], dtype=torch.int64, device=device))
    n_rows = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(n_rows), *local.shape[1:]), dtype=torch.from_numpy(local).dtype, device=device)
    padded[: len(local)] = torch.from_numpy(local).to(device)
    shards = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(shards, padded)
    return torch.cat([s[:n] for s, n in zip(shards, n_rows, strict=True)]).cpu().numpy()


def reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a scalar over the ranks (a detached copy; the value itself for one process).

    A NaN or inf on any rank makes the mean non-finite on every rank, so a decision taken on it (skip this
    step) is the same everywhere.
    """
    value = value.detach().clone()
    if ctx.enabled:
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


def on_rank0(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result (which must pickle).

    An exception on rank 0 is re-raised there and raised on the other ranks too (the same exception when it
    pickles, else a RuntimeError naming it), so a refusal (a finished fold, a bad config) ends every rank at once,
    each with the same one-line message, rather than leaving them waiting for rank 0.
    """
    if not ctx.enabled:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - sent to the other ranks, then re-raised below
            error = e
            try:
                pickle.loads(pickle.dumps(e))
                box[0] = ("error", e)
            except Exception:  # noqa: BLE001 - an exception that does not pickle: its text
                box[0] = ("error", RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, payload = box[0]
    if status == "error":
        raise payload
    return payload
