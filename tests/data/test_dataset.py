"""ImageDataset: one resize whether the cache is on or off (inference's too), and augmentation random streams
that depend on the seed, the image and its batch only: not on the DataLoader workers nor on the DDP rank."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from arcfold.data.dataset import ImageDataset
from arcfold.data.samplers import ShardedBatchSampler, build_sampler, global_batches
from arcfold.data.transforms import BatchNormalise, build_eval_transform, build_train_transform, collate_uint8


def _write_images(folder: Path, n: int, height: int = 45, width: int = 61) -> list[str]:
    """``n`` random colour PNGs of ``height x width``: not square, and not a whole multiple of 32."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


def _in_memory(n: int, transform, labels=None) -> ImageDataset:
    rng = np.random.default_rng(1)
    dataset = ImageDataset([f"{i}.png" for i in range(n)], labels if labels is not None else list(range(n)), transform)
    dataset._cache = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]  # no files
    return dataset


def _collate(items):
    return collate_uint8(items, BatchNormalise(torch.device("cpu")))


def test_images_are_resized_when_read_with_the_cache_on_or_off_as_inference_resizes_them(tmp_path) -> None:
    from arcfold.inference.ensemble import _MultiSizeDataset

    paths = _write_images(tmp_path, 5)
    on = ImageDataset(paths, None, build_eval_transform(32), cache=True, size=32, progress=False)
    off = ImageDataset(paths, None, build_eval_transform(32), cache=False, size=32)
    views = _MultiSizeDataset(paths, [32])
    for i, path in enumerate(paths):
        # OpenCV's area interpolation of the decoded file, by hand
        want = cv2.resize(cv2.imread(path)[..., ::-1], (32, 32), interpolation=cv2.INTER_AREA)  # (32, 32, 3) RGB
        assert np.array_equal(on.load(i), want) and np.array_equal(off.load(i), want)
        assert np.array_equal(views[i][32], want.transpose(2, 0, 1))  # inference's view of the image
        assert torch.equal(on[i][0], off[i][0]) and on[i][0].shape == (3, 32, 32)
    # the augmentation that crops and resizes still gets the image at the model's size, cached or not
    tf = build_train_transform("strong", 32, normalise=False)
    strong = [ImageDataset(paths, [0] * 5, tf, cache=cache, size=32, progress=False) for cache in (True, False)]
    for dataset in strong:
        dataset.set_augment_seed(3)
    for i in range(len(paths)):
        (a, _), (b, _) = strong[0][i], strong[1][i]
        assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"image of 61x45 px, the transform expects 32x32"):
        ImageDataset(paths, None, build_eval_transform(32))[0]  # not resized: an error, not other pixels


def _batches(dataset: ImageDataset, num_workers: int, **batching) -> list[torch.Tensor]:
    loader = DataLoader(
        dataset, num_workers=num_workers, collate_fn=_collate, generator=torch.Generator().manual_seed(5), **batching
    )
    return [x for x, _ in loader]


def test_augmentation_does_not_depend_on_the_number_of_workers() -> None:
    dataset = _in_memory(24, build_train_transform("strong", 32, hflip=0.5, normalise=False))
    dataset.set_augment_seed(11)
    batching = {"batch_size": 6, "shuffle": True, "drop_last": True}
    by_workers = [_batches(dataset, n, **batching) for n in (0, 1, 2)]
    for other in by_workers[1:]:
        assert all(torch.equal(x, y) for x, y in zip(by_workers[0], other, strict=True))
    dataset.set_augment_seed(12)  # a test that can fail: another epoch's seed gives other pixels
    assert not torch.equal(_batches(dataset, 0, **batching)[0], by_workers[0][0])


def test_ranks_augment_their_own_images_exactly_as_one_process_would() -> None:
    """ShardedBatchSampler slices of the m-per-class global batches, on 2 "ranks" (one with a worker process): the
    slices put together are the single-process batches to the bit, and the ranks' images differ. Class 0 has 2
    images for m=4, so its images appear twice in a batch: the copies are augmented differently."""
    labels = [0] * 2 + [1] * 6 + [2] * 6 + [3] * 6  # (20,)
    dataset = _in_memory(len(labels), build_train_transform("strong", 32, normalise=False), labels)
    dataset.set_augment_seed(21)
    sampler = build_sampler(np.asarray(labels), m_per_class=4, batch_size=8, seed=0)
    single = _batches(dataset, 0, batch_size=8, sampler=sampler, drop_last=True)
    batches = global_batches(len(labels), 8, seed=5, sampler=sampler)
    ranks = [_batches(dataset, rank, batch_sampler=ShardedBatchSampler(batches, rank, 2)) for rank in (0, 1)]
    assert len(single) == len(batches) == 2
    for x, x0, x1, indices in zip(single, *ranks, batches, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x)
        assert not torch.equal(x0, x1)
        repeated = [i for i, n in Counter(indices).items() if n > 1]
        for index in repeated:  # the same image twice in the batch: two different views of it
            first, second = [k for k, i in enumerate(indices) if i == index][:2]
            assert not torch.equal(x[first], x[second])
    assert any(len(set(b)) < len(b) for b in batches), "class 0 should have been drawn with replacement"


def test_the_transforms_of_a_sample_draw_independently() -> None:
    """Two p=0.5 flips over 400 samples: all four outcomes, about 100 each. albumentations' own per-transform
    seeding (``Compose.set_random_seed``) gives both flips the same draw: only "none" and "both" occur."""
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2)  # corner value says which flips ran
    corner_to_outcome = {0: "none", 3: "h", 12: "v", 15: "hv"}
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    dataset = ImageDataset([f"{i}.png" for i in range(400)], None, flips)
    dataset._cache = [image] * 400
    dataset.set_augment_seed(0)
    counts = Counter(corner_to_outcome[int(dataset[i][0][0, 0, 0])] for i in range(400))
    assert set(counts) == {"none", "h", "v", "hv"} and all(60 <= n <= 140 for n in counts.values()), counts
    albumentations_seeding = Counter()
    for i in range(400):
        flips.set_random_seed(i)
        albumentations_seeding[corner_to_outcome[int(flips(image=image)["image"][0, 0, 0])]] += 1
    assert set(albumentations_seeding) == {"none", "hv"}  # why arcfold shares one stream between the transforms


def test_a_transform_without_random_state_cannot_be_seeded() -> None:
    dataset = ImageDataset(["a.png"], None, lambda image: {"image": image})
    with pytest.raises(TypeError, match="cannot seed function per sample"):
        dataset.set_augment_seed(0)
