"""BatchShift, the ``shift`` preset on a whole uint8 batch: albumentations' integer translation bit for bit, the
same uniform draws, reproducible per epoch, and each rank's slice of the global batch's draws."""

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from arcfold.data.transforms import BatchShift, build_batch_augment, build_train_transform


def test_every_shift_is_albumentations_affine_translation_bit_for_bit():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (81, 3, 32, 24), dtype=np.uint8))  # not square: rows vs columns
    shifts = torch.tensor([(dx, dy) for dx in range(-4, 5) for dy in range(-4, 5)])
    out = BatchShift.apply(images, shifts)
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.is_contiguous()
    for image, (dx, dy), got in zip(images, shifts.tolist(), out, strict=True):
        affine = A.Affine(translate_px={"x": (dx, dx), "y": (dy, dy)}, border_mode=cv2.BORDER_REPLICATE, p=1.0)
        expected = affine(image=np.ascontiguousarray(image.permute(1, 2, 0).numpy()))["image"]
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected, err_msg=f"dx={dx}, dy={dy}")


def test_a_hand_computed_shift():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    # right by 1 (the first column repeated), up by 2 (the last row repeated)
    expected = torch.tensor([[8, 8, 9, 10], [12, 12, 13, 14], [12, 12, 13, 14], [12, 12, 13, 14]], dtype=torch.uint8)
    torch.testing.assert_close(BatchShift.apply(x, torch.tensor([[1, -2]]))[0, 0], expected)


def test_draws_are_albumentations_range_uniform_and_replayed_per_epoch():
    shift = BatchShift(64)  # the preset's limit: 64 / 16 = 4 px
    assert shift.limit == 4 and BatchShift(16).limit == 1 and BatchShift(8).limit == 1
    shift.start_epoch(3)
    draws = shift.draw(9 * 9 * 400)
    counts = np.bincount((draws + 4).numpy().ravel(), minlength=9)
    assert draws.min() == -4 and draws.max() == 4 and len(counts) == 9
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()
    shift.start_epoch(3)
    torch.testing.assert_close(shift.draw(9 * 9 * 400), draws)


def test_each_rank_applies_its_slice_of_the_global_batch_draws():
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8))
    single, ranks = BatchShift(64), [BatchShift(64), BatchShift(64)]
    for s in (single, *ranks):
        s.start_epoch(11)
    for _ in range(3):  # batches in a row stay in step
        whole = single(x)
        halves = [ranks[r](x[4 * r : 4 * r + 4], rank=r, world_size=2) for r in range(2)]
        torch.testing.assert_close(torch.cat(halves), whole)


def test_per_image_pipeline_leaves_the_shift_to_the_batch():
    assert build_batch_augment("shift", 64) is not None
    assert build_batch_augment("shift", 64, enabled=False) is None
    assert build_batch_augment("light", 64) is None  # no batch-level version: albumentations per image
    assert build_train_transform("shift", 64, batch_level=True, normalise=False) is None  # nothing left per image
    names = [type(t).__name__ for t in build_train_transform("shift", 64, hflip=0.5, batch_level=True)]
    assert names == ["RequireSize", "HorizontalFlip", "Normalize", "ToTensorV2"]
    names = [type(t).__name__ for t in build_train_transform("shift", 64, hflip=0.5, normalise=False)]
    assert names == ["RequireSize", "Affine", "HorizontalFlip"]
    light = build_train_transform("light", 64, batch_level=True, normalise=False)
    assert [type(t).__name__ for t in light][1] == "Affine"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_the_shift_on_the_gpu_is_the_cpu_shift():
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (6, 3, 20, 20), dtype=np.uint8))
    shifts = BatchShift(64).draw(6)
    torch.testing.assert_close(BatchShift.apply(x.cuda(), shifts).cpu(), BatchShift.apply(x, shifts))
