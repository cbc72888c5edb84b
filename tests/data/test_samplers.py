"""m-per-class sampler: batch composition, length, reproducibility from the seed alone, small classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils import common_functions as c_f
from torch.utils.data import DataLoader, Dataset

from arcfold.data.samplers import build_sampler


class LabelDataset(Dataset):
    """Returns (index, label): enough to check what a loader built on the sampler yields."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, int(self.labels[i])


def uneven_labels(seed: int = 0) -> np.ndarray:
    """103 images in 12 classes of 4 to 14 images."""
    rng = np.random.default_rng(seed)
    sizes = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 4]
    labels = np.repeat(np.arange(len(sizes)) * 10, sizes)  # non-contiguous class ids
    return rng.permutation(labels)


def batches(sampler, labels: np.ndarray, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(LabelDataset(labels), batch_size=batch_size, sampler=sampler, drop_last=True)
    return list(loader)


def test_every_batch_has_batch_size_over_m_classes_with_m_images_each():
    labels, m, batch_size = uneven_labels(), 4, 16
    sampler = build_sampler(labels, m, batch_size, seed=0)
    got = batches(sampler, labels, batch_size)
    assert len(got) == len(labels) // batch_size == len(sampler) // batch_size
    for indices, batch_labels in got:
        assert len(indices) == batch_size
        classes, counts = np.unique(batch_labels.numpy(), return_counts=True)
        assert len(classes) == batch_size // m and (counts == m).all()
        np.testing.assert_array_equal(labels[indices.numpy()], batch_labels.numpy())
        assert len(set(indices.tolist())) == batch_size  # every class here has >= m images: no repeats


def test_length_is_the_data_rounded_down_to_whole_batches():
    labels = uneven_labels()
    for batch_size in (8, 16, 24):
        sampler = build_sampler(labels, 4, batch_size, seed=0)
        assert len(sampler) == len(list(sampler)) == len(labels) // batch_size * batch_size
    assert all(isinstance(i, int) for i in build_sampler(labels, 4, 16, seed=0))


def test_order_depends_on_the_seed_only():
    labels = uneven_labels()
    np.random.seed(1)
    first = list(build_sampler(labels, 4, 16, seed=7))
    np.random.seed(2)  # the global RNG that PML's sampler normally uses
    again = list(build_sampler(labels, 4, 16, seed=7))
    assert first == again
    assert list(build_sampler(labels, 4, 16, seed=8)) != first


def test_same_sampler_repeats_an_epoch_and_set_epoch_changes_it():
    labels = uneven_labels()
    sampler = build_sampler(labels, 4, 16, seed=7)
    first = list(sampler)
    assert list(sampler) == first  # the in-place class shuffle does not carry over
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_global_numpy_rng_is_left_alone():
    labels = uneven_labels()
    np.random.seed(3)
    expected = np.random.random(5)
    np.random.seed(3)
    list(build_sampler(labels, 4, 16, seed=0))
    np.testing.assert_array_equal(np.random.random(5), expected)
    assert c_f.NUMPY_RANDOM is np.random


def test_small_classes_are_sampled_with_replacement():
    # PML's behaviour: a class with fewer than m images repeats some of them to fill its m slots
    labels = np.array([0] * 2 + [1] * 6 + [2] * 6 + [3] * 6)
    sampler = build_sampler(labels, 4, 8, seed=0)
    seen_small = 0
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for indices, batch_labels in batches(sampler, labels, 8):
            small = indices[batch_labels == 0].tolist()
            assert len(small) in (0, 4)
            if small:
                seen_small += 1
                assert set(small) == {0, 1}  # both images, each used twice or one thrice
    assert seen_small > 0


@pytest.mark.parametrize(
    ("labels", "m", "batch_size", "message"),
    [
        (np.repeat(np.arange(8), 4), 3, 16, "not a multiple"),
        (np.repeat(np.arange(3), 10), 4, 16, "3 classes, fewer than"),
        (np.arange(8), 2, 16, "8 images, fewer than one batch"),
        (np.repeat(np.arange(8), 4), 0, 16, "at least 1"),
    ],
)
def test_impossible_settings_are_clear_errors(labels, m, batch_size, message):
    with pytest.raises(ValueError, match=message):
        build_sampler(labels, m, batch_size, seed=0)
