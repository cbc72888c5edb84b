"""albumentations pipelines, picked by preset name.

Every pipeline ends in ``Resize -> Normalize (ImageNet statistics, what timm's pretrained weights
expect) -> ToTensorV2`` and returns a ``(3, H, W)`` float tensor. Train presets add geometric and
photometric noise of increasing strength; horizontal flips are a separate knob (``data.hflip``)
because they change the identity of characters and text but not of most objects.
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

__all__ = ["AUGMENT_PRESETS", "IMAGENET_MEAN", "IMAGENET_STD", "build_eval_transform", "build_train_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _none(image_size: int) -> list[A.BasicTransform]:
    return []


def _light(image_size: int) -> list[A.BasicTransform]:
    return [
        A.Affine(
            scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), border_mode=cv2.BORDER_REPLICATE, p=0.7
        ),
        A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
    ]


def _medium(image_size: int) -> list[A.BasicTransform]:
    return [
        A.Affine(
            scale=(0.8, 1.2),
            translate_percent=(-0.08, 0.08),
            rotate=(-15, 15),
            shear=(-8, 8),
            border_mode=cv2.BORDER_REPLICATE,
            p=0.8,
        ),
        A.RandomBrightnessContrast(0.25, 0.25, p=0.6),
        A.GaussianBlur(sigma_limit=(0.2, 1.0), p=0.2),
        A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25), p=0.3),
    ]


def _strong(image_size: int) -> list[A.BasicTransform]:
    return [
        A.RandomResizedCrop(size=(image_size, image_size), scale=(0.5, 1.0), ratio=(0.75, 1.33), p=1.0),
        A.Affine(rotate=(-20, 20), shear=(-10, 10), border_mode=cv2.BORDER_REPLICATE, p=0.7),
        A.ColorJitter(0.3, 0.3, 0.3, 0.05, p=0.7),
        A.GaussianBlur(sigma_limit=(0.2, 1.5), p=0.3),
        A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.3), p=0.5),
    ]


AUGMENT_PRESETS: dict[str, Callable[[int], list[A.BasicTransform]]] = {
    "none": _none,
    "light": _light,
    "medium": _medium,
    "strong": _strong,
}


def _finish(image_size: int) -> list[A.BasicTransform]:
    return [A.Resize(image_size, image_size), A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]


def build_train_transform(preset: str, image_size: int, hflip: float = 0.0, seed: int | None = None) -> A.Compose:
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"data.augment={preset!r} is unknown; choose one of {', '.join(AUGMENT_PRESETS)}")
    steps = AUGMENT_PRESETS[preset](image_size)
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    return A.Compose([*steps, *_finish(image_size)], seed=seed)


def build_eval_transform(image_size: int, hflip: bool = False) -> A.Compose:
    """Resize + normalise; ``hflip=True`` always flips (the flipped view of test-time augmentation)."""
    return A.Compose([*([A.HorizontalFlip(p=1.0)] if hflip else []), *_finish(image_size)])
