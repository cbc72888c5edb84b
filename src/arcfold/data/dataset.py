"""Image dataset: paths + integer labels -> ``(image, label)``, and the one function that resizes an image.

**One preprocessing path.** :func:`resize_image` (OpenCV ``INTER_AREA``) is the only resize of an image to a
model's input size: :func:`read_image` calls it, :class:`ImageDataset` reads every image through
``read_image(path, size)`` whether the RAM cache is on or off, and inference (:mod:`arcfold.infer`) resizes its
decoded images with it too. Training, the OOF embeddings and ``inference.py`` therefore see the same pixels; the
transforms of :mod:`arcfold.data.transforms` do not resize (they require ``size x size`` input), and augmentations
that crop and resize (``strong``: ``RandomResizedCrop``) work on the resized image.

Images are decoded with OpenCV as RGB. With ``cache=True`` every image is decoded and resized once and kept in
RAM as uint8; on a 2-core machine decoding PNG/JPEG each epoch would otherwise cost as much as the model's forward
pass. The cache is filled in the main process before the DataLoader forks, so workers share it.

**Augmentation random streams.** With :meth:`ImageDataset.set_augment_seed` the transform is reseeded for every
sample from ``(seed, index, draw)``, ``draw`` counting earlier copies of the same index in the batch (an
m-per-class sampler repeats the images of a class smaller than m): a sample's pixels depend on the seed, the
image and its batch, never on which DataLoader worker or how many of them augment it, nor on which process of a
DistributedDataParallel run does (the ranks take disjoint indices, so they augment different images, each as one
process would). One stream (a numpy ``Generator`` and a ``random.Random``) is shared by all the transforms of a
sample: albumentations' own ``set_random_seed`` gives each transform the *same* seed, so their random draws
coincide (two ``p=0.5`` flips then always fire together).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = ["ImageDataset", "read_image", "resize_image"]

_MASK64 = (1 << 64) - 1
_MASK128 = (1 << 128) - 1


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C) with OpenCV ``INTER_AREA`` (the input itself when already that size).

    The one resize of training, OOF and inference (see the module doc): change it here and all three follow.
    """
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB; resized to ``size x size`` by :func:`resize_image` when given. Raises with the path."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(
            f"cannot read image {path}: missing, unreadable or not an image. Fix or remove it, or set "
            "data.skip_bad_images=true to leave images that cannot be decoded out of training"
        )
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image if size is None else resize_image(image, size)


class ImageDataset(Dataset):
    """``dataset[i] -> (transform(read_image(paths[i], size)), label)``; label -1 without labels.

    ``size``: every image is resized to ``size x size`` when it is read, cached or not (``None`` keeps the file's
    size). ``cache``: decode and resize every image once, up front, into RAM. The transform's random stream is
    set per sample after :meth:`set_augment_seed` (see the module doc).
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray | None = None,
        transform: Callable | None = None,
        cache: bool = False,
        size: int | None = None,
        progress: bool = True,
    ) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.transform = transform
        self.size = size
        self.augment_seed: int | None = None
        self._rng, self._py_random = np.random.Generator(np.random.PCG64()), random.Random()  # reseeded per sample
        self._cache: list[np.ndarray] | None = None
        if cache:
            with ThreadPoolExecutor(max_workers=4) as pool:  # cv2 decodes without the GIL
                self._cache = list(
                    tqdm(
                        pool.map(lambda p: read_image(p, size), self.paths),
                        total=len(self.paths),
                        desc="caching images",
                        disable=not progress,
                        leave=False,
                    )
                )

    def __len__(self) -> int:
        return len(self.paths)

    def set_augment_seed(self, seed: int | None) -> None:
        """Reseed the transform per sample from ``(seed, index, draw)`` from now on (``None``: leave its stream alone).

        Set it before the DataLoader's workers start (``persistent_workers=False``: they start with each epoch's
        iterator). The transform must be an albumentations ``Compose`` (it has ``set_random_state``).
        """
        if seed is not None and not hasattr(self.transform, "set_random_state"):
            raise TypeError(f"cannot seed {type(self.transform).__name__} per sample: it has no set_random_state")
        self.augment_seed = None if seed is None else int(seed) & _MASK64

    def _seed_transform(self, index: int, draw: int) -> None:
        """Point the transform at this sample's stream: a blake2b hash of ``(seed, index, draw)`` sets the state and
        increment of a PCG64 generator and seeds a ``random.Random``, both reused (set in place).

        Cost per sample, 64 px ``light`` preset (~90 us of augmentation) on an idle 2-core VM: +14 us. A new
        ``np.random.default_rng`` + ``random.Random`` per sample cost +43 us, albumentations' ``set_random_seed``
        (one of each per transform) +82 us.
        """
        key = int.from_bytes(
            hashlib.blake2b(f"{self.augment_seed}:{index}:{draw}".encode(), digest_size=32).digest(), "little"
        )  # 256 bits
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": key >> 128, "inc": (key & _MASK128) | 1},  # the increment must be odd
            "has_uint32": 0,
            "uinteger": 0,
        }
        self._py_random.seed(key)
        self.transform.set_random_state(self._rng, self._py_random)

    def load(self, index: int) -> np.ndarray:
        return self._cache[index] if self._cache is not None else read_image(self.paths[index], self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | np.ndarray, int]:
        return self._item(index, 0)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor | np.ndarray, int]]:
        """A batch (the DataLoader's fetcher calls this): ``draw`` numbers repeated indices 0, 1, ... in order."""
        draws: Counter[int] = Counter()
        items = []
        for index in indices:
            items.append(self._item(index, draws[index]))
            draws[index] += 1
        return items

    def _item(self, index: int, draw: int) -> tuple[torch.Tensor | np.ndarray, int]:
        image = self.load(index)
        if self.transform is not None:
            if self.augment_seed is not None:
                self._seed_transform(int(index), draw)
            image = self.transform(image=image)["image"]
        label = int(self.labels[index]) if self.labels is not None else -1
        return image, label
