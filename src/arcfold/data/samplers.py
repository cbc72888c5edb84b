"""Batch samplers: m images per class, so that pair and proxy losses see positives in every batch.

``build_sampler(labels, m_per_class, batch_size, seed)`` wraps pytorch-metric-learning's
``MPerClassSampler``: every consecutive block of ``batch_size`` indices holds ``batch_size / m``
distinct classes (the classes of a batch are drawn without replacement, uniformly over classes, not
over images) with ``m`` images each. Within a class the ``m`` images are drawn without replacement,
except that a class with fewer than ``m`` images is drawn **with** replacement, so the same image
appears more than once in the batch (PML's ``safe_random_choice``). One pass yields
``len(labels)`` rounded down to a whole number of batches, so an epoch has as many batches as a plain
shuffled ``drop_last`` loader.

Use it as ``DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True)`` (no ``shuffle``).

Reproducibility: PML draws from numpy's global RNG (``pytorch_metric_learning.utils.common_functions
.NUMPY_RANDOM``, which is ``np.random``). :class:`SeededMPerClassSampler` swaps in its own
``RandomState`` seeded from ``(seed, epoch)`` for the duration of each ``__iter__`` (which builds the
whole index list at once) and restores the global one afterwards, so the order depends only on the
seed and the epoch, never on what else used ``np.random`` before, and leaves the global state alone.

Several processes (DistributedDataParallel): ``train.batch_size`` is the global batch, and
:class:`ShardedBatchSampler` gives each of the ``world_size`` ranks its contiguous slice of every global batch
that one process would draw (:func:`global_batches`: the same shuffle, or the same m-per-class order, from the
same seed), so the ranks' slices are disjoint and together are exactly the single-process batch. With
m-per-class batches the per-rank batch must be a multiple of ``m``: then each class's ``m`` images (PML puts
them next to each other) stay on one rank. It does what ``DistributedSampler`` does (a shared seed, a new
order per epoch, disjoint shards), but shards each *batch* rather than the whole epoch, which is what keeps
the m-per-class blocks whole and the global batches those of a single-process run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as c_f
from torch.utils.data import DataLoader

__all__ = ["SeededMPerClassSampler", "ShardedBatchSampler", "build_sampler", "global_batches"]


class SeededMPerClassSampler(MPerClassSampler):
    """PML's ``MPerClassSampler`` with its own RNG, seeded from ``(seed, epoch)`` at every ``__iter__``.

    Iterating twice with the same seed and epoch gives the same order; :meth:`set_epoch` changes it
    (like ``DistributedSampler``). Arguments are checked by :func:`build_sampler`.
    """

    def __init__(self, labels: np.ndarray, m: int, batch_size: int, seed: int) -> None:
        super().__init__(labels, m, batch_size=batch_size, length_before_new_iter=len(labels))
        self.seed, self.epoch = int(seed), 0
        # MPerClassSampler shuffles self.labels in place; restart from this order so that an
        # iteration does not depend on the previous one
        self._initial_labels = list(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        entropy = [self.seed & 0xFFFFFFFFFFFFFFFF, self.epoch & 0xFFFFFFFFFFFFFFFF]  # SeedSequence needs ints >= 0
        rng = np.random.RandomState(np.random.SeedSequence(entropy).generate_state(8))
        self.labels = list(self._initial_labels)
        global_rng = c_f.NUMPY_RANDOM
        c_f.NUMPY_RANDOM = rng
        try:
            indices = list(super().__iter__())  # PML builds the full index list at once
        finally:
            c_f.NUMPY_RANDOM = global_rng
        return iter([int(i) for i in indices])  # plain ints, not np.int64


def build_sampler(labels: np.ndarray, m_per_class: int, batch_size: int, seed: int) -> SeededMPerClassSampler:
    """An m-per-class sampler over ``labels`` (N,) yielding ``N // batch_size * batch_size`` indices per pass.

    Raises ValueError when ``m_per_class < 1``, when ``batch_size`` is not a multiple of ``m_per_class``,
    when there are fewer than ``batch_size / m_per_class`` classes, or fewer than ``batch_size`` labels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if m_per_class < 1:
        raise ValueError(f"sampler.m_per_class must be at least 1 (got {m_per_class})")
    if batch_size % m_per_class:
        raise ValueError(
            f"train.batch_size={batch_size} is not a multiple of sampler.m_per_class={m_per_class}: "
            "every batch holds batch_size / m classes with m images each"
        )
    n_classes, classes_per_batch = len(np.unique(labels)), batch_size // m_per_class
    if n_classes < classes_per_batch:
        raise ValueError(
            f"{n_classes} classes, fewer than train.batch_size / sampler.m_per_class = {classes_per_batch} "
            "distinct classes per batch; lower the batch size or raise m_per_class"
        )
    if len(labels) < batch_size:
        raise ValueError(f"{len(labels)} images, fewer than one batch of train.batch_size={batch_size}")
    return SeededMPerClassSampler(labels, m_per_class, batch_size, seed)


def global_batches(
    n: int, batch_size: int, seed: int, sampler: torch.utils.data.Sampler | None = None
) -> list[list[int]]:
    """The batches of dataset indices that a single process trains on in one epoch, in order.

    Drawn by the same ``DataLoader`` as the single-process train loop (``shuffle`` with a generator seeded with
    ``seed``, or ``sampler``, ``drop_last``), over ``range(n)`` instead of the images: the DataLoader draws a
    worker base seed from the generator before the permutation, and reproducing it through the DataLoader
    itself rather than by hand keeps the order identical whatever torch does inside.
    """

    loader = DataLoader(
        range(n),
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return [batch.tolist() for batch in loader]


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Rank ``rank``'s contiguous slice of each global batch: ``batch[rank * b:(rank + 1) * b]``, b = B / world_size.

    ``batches`` are the global batches (:func:`global_batches`), each of ``world_size * b`` indices. Use it as
    ``DataLoader(ds, batch_sampler=ShardedBatchSampler(...))``.
    """

    def __init__(self, batches: Sequence[Sequence[int]], rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        sizes = {len(b) for b in batches}
        if len(sizes) > 1 or any(s % world_size for s in sizes):
            raise ValueError(f"every global batch must hold a multiple of world_size={world_size} indices: {sizes}")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            local = len(batch) // self.world_size
            yield list(batch[self.rank * local : (self.rank + 1) * local])
