import numpy as np
import pytest
import torch

from arcfold.data.transforms import AUGMENT_PRESETS, build_eval_transform, build_train_transform


def test_eval_transform_flip_is_the_mirror_image():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    plain = build_eval_transform(32)(image=image)["image"]
    flipped = build_eval_transform(32, hflip=True)(image=image)["image"]
    assert plain.shape == (3, 32, 32) and plain.dtype == torch.float32
    torch.testing.assert_close(flipped, plain.flip(-1))


@pytest.mark.parametrize("preset", sorted(AUGMENT_PRESETS))
def test_train_presets_give_normalised_tensors_of_the_asked_size(preset):
    image = np.full((32, 32, 3), 255, np.uint8)
    out = build_train_transform(preset, 32, hflip=0.5, seed=0)(image=image)["image"]
    assert out.shape == (3, 32, 32)
    assert out.max().item() == pytest.approx((1 - 0.406) / 0.225, abs=0.6)  # white, ImageNet-normalised
    with pytest.raises(ValueError, match="data.augment='nope' is unknown"):
        build_train_transform("nope", 32)
    # the pipelines never resize (arcfold.data.dataset.resize_image does, for training, OOF and inference alike)
    with pytest.raises(ValueError, match=r"image of 70x50 px, the transform expects 32x32: resize it with"):
        build_train_transform(preset, 32, seed=0)(image=np.full((50, 70, 3), 255, np.uint8))
    with pytest.raises(ValueError, match=r"image of 40x40 px, the transform expects 32x32"):
        build_eval_transform(32)(image=np.zeros((40, 40, 3), np.uint8))


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("preset", sorted(AUGMENT_PRESETS))
def test_batch_normalised_loader_gives_the_per_image_normalised_batches(preset, num_workers):
    """uint8 augmentation + collate_uint8 + BatchNormalise == Normalize -> ToTensorV2 per image + default collate,
    bit for bit and with the same layout, for the same seeds (the random stream must not shift either)."""
    from torch.utils.data import DataLoader

    from arcfold.data.dataset import ImageDataset
    from arcfold.data.transforms import BatchNormalise, collate_uint8

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(12)]

    def batches(normalise: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        transform = build_train_transform(preset, 32, hflip=0.5, seed=3, normalise=normalise)
        dataset = ImageDataset([f"{i}.png" for i in range(12)], list(range(12)), transform)
        dataset._cache = images  # in memory, no files
        dataset.set_augment_seed(7)
        collate = None if normalise else lambda items: collate_uint8(items, BatchNormalise(torch.device("cpu")))
        loader = DataLoader(
            dataset,
            batch_size=4,
            shuffle=True,
            num_workers=num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(5),
        )
        return list(loader)

    old, new = batches(normalise=True), batches(normalise=False)
    assert len(old) == len(new) == 3
    for (x_old, y_old), (x_new, y_new) in zip(old, new, strict=True):
        assert x_new.dtype == torch.float32 and x_new.shape == (4, 3, 32, 32) and x_new.is_contiguous()
        assert x_new.stride() == x_old.stride()
        assert torch.equal(x_new, x_old)
        assert torch.equal(y_new, y_old) and y_new.dtype == y_old.dtype
    assert not torch.equal(old[0][0], old[1][0])  # a test that can fail: the batches differ


def test_batch_normalise_matches_the_eval_transform_on_every_level():
    from arcfold.data.transforms import BatchNormalise, collate_uint8

    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)  # every level, every channel
    images, _ = collate_uint8([(image, 0), (image[::-1].copy(), 1)], BatchNormalise(torch.device("cpu")))
    expected = torch.stack([build_eval_transform(16)(image=im)["image"] for im in (image, image[::-1].copy())])
    assert torch.equal(images, expected)
