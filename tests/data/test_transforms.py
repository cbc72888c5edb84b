import numpy as np
import pytest
import torch

from arcfold.data.transforms import AUGMENT_PRESETS, build_eval_transform, build_train_transform


def test_eval_transform_flip_is_the_mirror_image():
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    plain = build_eval_transform(32)(image=image)["image"]
    flipped = build_eval_transform(32, hflip=True)(image=image)["image"]
    assert plain.shape == (3, 32, 32) and plain.dtype == torch.float32
    torch.testing.assert_close(flipped, plain.flip(-1))


@pytest.mark.parametrize("preset", sorted(AUGMENT_PRESETS))
def test_train_presets_give_normalised_tensors_of_the_asked_size(preset):
    image = np.full((50, 70, 3), 255, np.uint8)
    out = build_train_transform(preset, 32, hflip=0.5, seed=0)(image=image)["image"]
    assert out.shape == (3, 32, 32)
    assert out.max().item() == pytest.approx((1 - 0.406) / 0.225, abs=0.6)  # white, ImageNet-normalised
    with pytest.raises(ValueError, match="data.augment='nope' is unknown"):
        build_train_transform("nope", 32)
