"""Image dataset: paths + integer labels -> ``(image tensor, label)``.

Images are decoded with OpenCV as RGB. With ``cache=True`` every image is decoded and resized once
(to ``cache_size``, shorter work for every later epoch) and kept in RAM as uint8; on a 2-core
machine decoding PNG/JPEG each epoch would otherwise cost as much as the model's forward pass.
The cache is filled in the main process before the DataLoader forks, so workers share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = ["ImageDataset", "read_image"]


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB; resized to ``size x size`` when given. Raises with the path on failure."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(
            f"cannot read image {path}: missing, unreadable or not an image. Fix or remove it, or set "
            "data.skip_bad_images=true to leave images that cannot be decoded out of training"
        )
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if size is not None and image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


class ImageDataset(Dataset):
    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray | None = None,
        transform: Callable | None = None,
        cache: bool = False,
        cache_size: int | None = None,
        progress: bool = True,
    ) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.transform = transform
        self.cache_size = cache_size
        self._cache: list[np.ndarray] | None = None
        if cache:
            with ThreadPoolExecutor(max_workers=4) as pool:  # cv2 decodes without the GIL
                self._cache = list(
                    tqdm(
                        pool.map(lambda p: read_image(p, cache_size), self.paths),
                        total=len(self.paths),
                        desc="caching images",
                        disable=not progress,
                        leave=False,
                    )
                )

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        return self._cache[index] if self._cache is not None else read_image(self.paths[index], self.cache_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        label = int(self.labels[index]) if self.labels is not None else -1
        return image, label
