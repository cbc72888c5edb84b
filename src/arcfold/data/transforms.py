"""albumentations pipelines, picked by preset name, and the batch normalisation that can replace their last step.

The pipelines do not resize: their input must already be ``image_size x image_size`` (an error says so
otherwise), as :class:`arcfold.data.dataset.ImageDataset` reads it through
:func:`arcfold.data.dataset.resize_image`, the one resize of training, OOF and inference. Every pipeline ends in
``Normalize (ImageNet statistics, what timm's pretrained weights expect) -> ToTensorV2`` and returns a
``(3, H, W)`` float tensor. Train presets add geometric and photometric noise of increasing strength (``shift``: a
random translation only, the plain metric-learning loop's augmentation; ``strong``
crops and resizes back to ``image_size``); horizontal flips are a separate knob (``data.hflip``) because they
change the identity of characters and text but not of most objects.

**Batch-level augmentation.** A preset with an entry in :data:`BATCH_AUGMENTS` (``shift``) can instead run on
the whole uint8 batch in one torch indexing call, on the training device (``data.batch_augment``, on by default):
:class:`BatchShift` gives the same pixels as albumentations' ``Affine(translate_px=..., BORDER_REPLICATE)`` for the
same integer shift (an integer translation is a copy with the edge rows/columns repeated), drawn from the same
uniform distribution, at a fraction of the per-image cost. ``build_train_transform(..., batch_level=True)`` then
leaves it out of the per-image pipeline.

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
    "BATCH_AUGMENTS",
    "BatchShift",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchNormalise",
    "RequireSize",
    "build_eval_transform",
    "build_batch_augment",
    "build_train_transform",
    "collate_uint8",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _none(image_size: int) -> list[A.BasicTransform]:
    return []


def _shift_limit(image_size: int) -> int:
    return max(1, round(image_size / 16))  # 1/16 of the side: 4 px at 64


def _shift(image_size: int) -> list[A.BasicTransform]:
    # a random shift of up to 1/16 of the side, every image: the plain loop's only augmentation
    limit = _shift_limit(image_size)
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


class BatchShift:
    """A random integer shift of every image of a batch, borders replicated: the ``shift`` preset on the whole batch.

    Each image gets its own ``(dx, dy)``, both uniform in ``[-limit, limit]`` (what ``A.Affine(translate_px=(-limit,
    limit))`` draws); the output pixel ``(i, j)`` is the input's ``(clamp(i - dy), clamp(j - dx))``: for one shift,
    albumentations' ``Affine(translate_px=..., border_mode=BORDER_REPLICATE)`` bit for bit (tested). One gather for
    the batch instead of one ``warpAffine`` per image: measured in ``benchmarks/bench_train.py``.

    The draws come from a CPU ``torch.Generator`` reset by :meth:`start_epoch` (the epoch seed: a resumed epoch
    replays its shifts) and advance one global batch at a time: with ``world_size`` processes each draws the shifts
    of the whole global batch and applies its contiguous slice (:class:`arcfold.data.samplers.ShardedBatchSampler`),
    so every image is shifted as the single-process run shifts it.
    """

    def __init__(self, image_size: int) -> None:
        self.limit = _shift_limit(image_size)
        self.generator = torch.Generator().manual_seed(0)

    def start_epoch(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def draw(self, n: int) -> torch.Tensor:
        """``(n, 2)`` int64 shifts ``(dx, dy)`` in ``[-limit, limit]``."""
        return torch.randint(-self.limit, self.limit + 1, (n, 2), generator=self.generator)

    @staticmethod
    def apply(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W), any dtype and device, shifted by ``shifts`` (B, 2) ``(dx, dy)``: a new tensor."""
        b, _, h, w = x.shape
        shifts = shifts.to(x.device)
        rows = (torch.arange(h, device=x.device) - shifts[:, 1:2]).clamp_(0, h - 1)  # (B, H)
        cols = (torch.arange(w, device=x.device) - shifts[:, 0:1]).clamp_(0, w - 1)  # (B, W)
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        # the advanced indices are split by the channel slice, so their (B, H, W) dimensions come first
        return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

    def __call__(self, x: torch.Tensor, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Shift this process's ``x`` (B, C, H, W): rank ``rank``'s slice of a global batch of ``world_size * B``."""
        b = len(x)
        return self.apply(x, self.draw(b * world_size)[rank * b : (rank + 1) * b])


# presets that have a batch-level version: the per-image pipeline leaves them out when it is used
BATCH_AUGMENTS: dict[str, Callable[[int], BatchShift]] = {"shift": BatchShift}


def build_batch_augment(preset: str, image_size: int, enabled: bool = True) -> BatchShift | None:
    """The batch-level version of ``preset`` when ``enabled`` and one exists (``data.batch_augment``), else None."""
    return BATCH_AUGMENTS[preset](image_size) if enabled and preset in BATCH_AUGMENTS else None


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
    preset: str,
    image_size: int,
    hflip: float = 0.0,
    seed: int | None = None,
    normalise: bool = True,
    batch_level: bool = False,
) -> A.Compose | None:
    """The ``preset`` augmentation; ``normalise=False`` leaves out ``Normalize -> ToTensorV2`` (uint8 (H, W, 3)
    out, for :func:`collate_uint8` + :class:`BatchNormalise`; the random stream is the same either way).
    ``batch_level=True`` leaves out what :func:`build_batch_augment` does on the whole batch instead, and returns
    None when nothing is left to do per image (the size check aside: ``read_image`` already gives the size).

    ``seed`` seeds albumentations' own streams (the same seed in every transform: their draws coincide); training
    reseeds per sample instead (:meth:`arcfold.data.dataset.ImageDataset.set_augment_seed`)."""
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"data.augment={preset!r} is unknown; choose one of {', '.join(AUGMENT_PRESETS)}")
    steps = [] if batch_level and preset in BATCH_AUGMENTS else AUGMENT_PRESETS[preset](image_size)
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if batch_level and not steps:
        return None
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
