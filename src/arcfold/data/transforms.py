"""albumentations pipelines, picked by preset name, and the batch normalisation that can replace their last step.

The pipelines do not resize: their input must already be ``image_size x image_size`` (an error says so
otherwise), as :class:`arcfold.data.dataset.ImageDataset` reads it through
:func:`arcfold.data.dataset.resize_image`, the one resize of training, OOF and inference. Every pipeline ends in
``Normalize (ImageNet statistics, what timm's pretrained weights expect) -> ToTensorV2`` and returns a
``(3, H, W)`` float tensor. Train presets add geometric and photometric noise of increasing strength (``shift``: a
random translation only, the plain metric-learning loop's augmentation; ``strong``
crops and resizes back to ``image_size``); horizontal flips are a separate knob (``data.hflip``) because they
change the identity of characters and text but not of most objects.

``build_train_transform(..., normalise=False)`` stops before ``Normalize`` (a ``(H, W, 3)`` uint8 array per image);
:func:`collate_uint8` stacks such images and :class:`BatchNormalise` normalises the whole batch at once, bit for
bit what ``Normalize -> ToTensorV2`` gives per image (normalisation is pointwise and draws no random numbers),
but one numpy pass per batch instead of per-image float work, and a quarter of the bytes to move (between
DataLoader workers, to the GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

__all__ = [
    "AUGMENT_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchNormalise",
    "RequireSize",
    "build_eval_transform",
    "build_train_transform",
    "collate_uint8",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _none(image_size: int) -> list[A.BasicTransform]:
    return []


def _shift(image_size: int) -> list[A.BasicTransform]:
    # a random shift of up to 1/16 of the side (4 px at 64), every image: the plain loop's only augmentation
    limit = max(1, round(image_size / 16))
    return [A.Affine(translate_px=(-limit, limit), border_mode=cv2.BORDER_REPLICATE, p=1.0)]


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
    "shift": _shift,
    "light": _light,
    "medium": _medium,
    "strong": _strong,
}


class RequireSize(A.ImageOnlyTransform):
    """Passes a ``(size, size, C)`` image through unchanged; any other size is an error (the pipelines do not resize:
    read images with ``arcfold.data.dataset.read_image(path, size)``). Draws no random number."""

    def __init__(self, size: int) -> None:
        super().__init__(p=1.0)
        self.size = size

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        if img.shape[:2] != (self.size, self.size):
            raise ValueError(
                f"image of {img.shape[1]}x{img.shape[0]} px, the transform expects {self.size}x{self.size}: resize "
                "it with arcfold.data.dataset.read_image(path, size) / resize_image (ImageDataset(size=...))"
            )
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


def _finish(normalise: bool = True) -> list[A.BasicTransform]:
    return [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()] if normalise else []


def build_train_transform(
    preset: str, image_size: int, hflip: float = 0.0, seed: int | None = None, normalise: bool = True
) -> A.Compose:
    """The ``preset`` augmentation; ``normalise=False`` leaves out ``Normalize -> ToTensorV2`` (uint8 (H, W, 3)
    out, for :func:`collate_uint8` + :class:`BatchNormalise`; the random stream is the same either way).

    ``seed`` seeds albumentations' own streams (the same seed in every transform: their draws coincide); training
    reseeds per sample instead (:meth:`arcfold.data.dataset.ImageDataset.set_augment_seed`)."""
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"data.augment={preset!r} is unknown; choose one of {', '.join(AUGMENT_PRESETS)}")
    steps = AUGMENT_PRESETS[preset](image_size)
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    return A.Compose([RequireSize(image_size), *steps, *_finish(normalise)], seed=seed)


def build_eval_transform(image_size: int, hflip: bool = False) -> A.Compose:
    """Normalise an ``image_size`` image; ``hflip=True`` always flips (the flipped view of test-time augmentation)."""
    return A.Compose([RequireSize(image_size), *([A.HorizontalFlip(p=1.0)] if hflip else []), *_finish()])


class BatchNormalise:
    """The eval transform's normalisation of a uint8 batch: bit-identical to ``Normalize -> ToTensorV2``.

    The per-channel value of each of the 256 levels is read off :func:`build_eval_transform` itself (a ramp image
    through it) into a (3, 256) table. A batch is ``(x - mean) * scale`` in float32 when that reproduces the table
    exactly on all 256 levels (it does for the ImageNet constants), else a lookup in the table. CPU tensors are
    normalised in numpy: single-threaded, so the loader can do it and a small elementwise op never waits on torch's
    thread pool, which stalls when other processes hold the cores (measured 0.25 ms per 64 px image with 2 torch
    threads on a loaded 2-core VM, 0.002 ms in numpy).
    """

    def __init__(self, device: torch.device) -> None:
        ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)  # (16, 16, 3)
        table = build_eval_transform(16)(image=ramp)["image"].reshape(3, 256)  # (3, 256) float32, no resize at 16
        self.mean_np = (np.asarray(IMAGENET_MEAN, dtype=np.float32) * np.float32(255)).reshape(1, 3, 1, 1)
        self.scale_np = (1 / (np.asarray(IMAGENET_STD, dtype=np.float32) * np.float32(255))).reshape(1, 3, 1, 1)
        self.mean, self.scale = torch.from_numpy(self.mean_np).to(device), torch.from_numpy(self.scale_np).to(device)
        levels = torch.arange(256, dtype=torch.uint8).expand(3, 256).reshape(1, 3, 16, 16)
        self.table = table.reshape(-1).to(device)  # (3 * 256,)
        self.offsets = (torch.arange(3, device=device) * 256).view(1, 3, 1, 1)
        self.exact_affine = True
        self.exact_affine = torch.equal(self(levels).reshape(3, 256), table) and (
            device.type == "cpu" or torch.equal(self(levels.to(device)).cpu().reshape(3, 256), table)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, H, W) float32, on ``x``'s device."""
        if not self.exact_affine:
            return self.table.to(x.device).take(x.long() + self.offsets.to(x.device))
        if x.device.type == "cpu":
            out = x.numpy().astype(np.float32)  # a new array; then in place
            out -= self.mean_np
            out *= self.scale_np
            return torch.from_numpy(out)
        return x.to(torch.float32, copy=True).sub_(self.mean).mul_(self.scale)


def collate_uint8(
    items: Sequence[tuple[np.ndarray, int]], normalise: BatchNormalise | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(image (H, W, 3) uint8, label)]`` -> ``(images (B, 3, H, W), labels (B,) int64)``.

    The images are uint8, or float32 through ``normalise`` when given (then the same contiguous tensor as the
    default collate of ``Normalize -> ToTensorV2`` outputs). Stacked in numpy: no torch thread pool in the loader.
    """
    images = np.ascontiguousarray(np.stack([image for image, _ in items]).transpose(0, 3, 1, 2))  # (B, 3, H, W)
    x = torch.from_numpy(images)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return (x if normalise is None else normalise(x)), labels
