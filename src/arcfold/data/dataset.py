"""Image dataset: paths + integer labels -> ``(image, label)``, and the one function that resizes an image.

**One preprocessing path.** :func:`resize_image` (OpenCV ``INTER_AREA``) is the only resize of an image to a
model's input size: :func:`read_image` calls it, :class:`ImageDataset` reads every image through
``read_image(path, size)`` whether the RAM cache is on or off, and inference (:mod:`arcfold.infer`) resizes its
decoded images with it too. Training, the OOF embeddings and ``inference.py`` therefore see the same pixels; the
transforms of :mod:`arcfold.data.transforms` do not resize (they require ``size x size`` input), and augmentations
that crop and resize (``strong``: ``RandomResizedCrop``) work on the resized image.

**Decoding** (:func:`read_image`, OpenCV) gives (H, W, 3) uint8 RGB for every file, by these rules:

- Every file but the PNGs below decodes as OpenCV's colour decode gives it (EXIF orientation applied, greyscale
  replicated to RGB, 16 bits cut to the top byte).
- 16-bit PNGs (PIL mode ``I;16``, RGB(A) 16-bit) keep the top byte, ``value >> 8``: the PNG rule (a sample is
  stored scaled to the file's full bit depth; an ``sBIT`` chunk records how many bits were significant), the same
  for every image, so a pixel's value never depends on the rest of its image. A max-based rescale would brighten a
  real 16-bit image with low values (a dark scene) and give two images of one object different scales. Data of
  10 or 12 bits stored *unscaled* in 16-bit files (values 0..4095, as some medical and scientific exports are)
  decode dark (0..15): convert those files to the full range first (``value << 4`` for 12 bits); a 16-bit image
  whose values all lie below 4096 is logged once per process as possibly such a file.
- PNGs with transparency (an alpha channel, grey + alpha, or a ``tRNS`` chunk) are composited over white, what
  image viewers show: ``(c * a + 255 * (255 - a)) / 255``, rounded. Where the colour is the same in every pixel
  that is not fully transparent and only the alpha varies (strokes drawn in the alpha channel, RGB all black or
  all white), the alpha *is* the image: it decodes as black strokes on white, ``255 - alpha`` in every channel,
  as in an ordinary scan, whatever the colour. EXIF orientation is applied to these PNGs too.
- A decoded image whose pixels are all equal (blank, or fully transparent) is logged as a warning naming the file,
  once per file and process: it trains as a constant input.

With ``cache=True`` every image is decoded and resized once and kept in
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
import io
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from PIL import Image
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
    """(H, W, 3) uint8 RGB; resized to ``size x size`` by :func:`resize_image` when given. Raises with the path.

    16-bit and transparent PNGs are converted by the rules of the module doc; a constant image is logged.
    """
    try:
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)  # (n_bytes,): decoded from memory, header read from it
    except OSError:
        data = np.empty(0, np.uint8)
    image = None
    if data.size:
        if _png_needs_own_decode(data):
            raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # keeps 16 bits and alpha; ignores EXIF orientation
            image = None if raw is None else _orient(_to_rgb8(raw, path), data)
        else:
            image = cv2.imdecode(data, cv2.IMREAD_COLOR)
            image = None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image is None:
        raise OSError(
            f"cannot read image {path}: missing, unreadable or not an image. Fix or remove it, or set "
            "data.skip_bad_images=true to leave images that cannot be decoded out of training"
        )
    flat = image.reshape(-1)
    if path not in _warned_constant and (flat[3:] == flat[:-3]).all():  # every pixel equals the next: constant
        _warned_constant.add(path)
        log.warning(
            "image %s is constant (every pixel %s after decoding): it trains as a blank input; check the file",
            path,
            tuple(int(v) for v in image[0, 0]),
        )
    return image if size is None else resize_image(image, size)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_warned_constant: set[str] = set()  # paths already reported as constant (per process)
_warned_low_16bit = False  # the 10/12-bit hint is logged once per process


def _png_needs_own_decode(data: np.ndarray) -> bool:
    """True for a PNG with 16-bit samples, an alpha channel or a ``tRNS`` chunk (OpenCV's colour decode would drop
    the alpha and the low byte silently). Reads IHDR's bit depth and colour type and the chunk names before the
    first IDAT, from the bytes already in memory: PIL's header parse costs ~35 us, half a 64 px PNG's decode."""
    raw = data[:33].tobytes()
    if len(raw) < 33 or raw[:8] != _PNG_SIGNATURE:
        return False
    bit_depth, colour_type = raw[24], raw[25]
    if bit_depth == 16 or colour_type in (4, 6):  # 4: grey + alpha, 6: RGBA
        return True
    pos = 8
    while pos + 8 <= data.size:
        length = int.from_bytes(data[pos : pos + 4].tobytes(), "big")
        kind = data[pos + 4 : pos + 8].tobytes()
        if kind == b"tRNS":
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        pos += 12 + length  # length, type, data, CRC
    return False


def _to_rgb8(raw: np.ndarray, path: str) -> np.ndarray:
    """OpenCV's unchanged decode (H, W[, 1|3|4]) uint8/uint16 BGR(A) -> (H, W, 3) uint8 RGB (module doc rules)."""
    global _warned_low_16bit
    if raw.dtype == np.uint16:
        if not _warned_low_16bit and int(raw[..., :3].max() if raw.ndim == 3 else raw.max()) < 4096:
            _warned_low_16bit = True
            log.warning(
                "16-bit image %s has no value above 4095: decoded as value >> 8 it is dark. If your data set holds "
                "10- or 12-bit values stored unscaled, convert its files to the full 16-bit range (value << 4 for "
                "12 bits); not repeated for further images",
                path,
            )
        raw = (raw >> 8).astype(np.uint8)
    if raw.ndim == 2 or raw.shape[2] == 1:
        return cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    if raw.shape[2] == 3:
        return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    colour, alpha = cv2.cvtColor(raw[..., :3], cv2.COLOR_BGR2RGB), raw[..., 3]
    seen = colour[alpha > 0]  # (n, 3): the pixels not fully transparent
    if alpha.min() != alpha.max() and len(seen) and (seen == seen[0]).all():
        # one colour, strokes only in the alpha: draw the alpha, black on white
        return np.repeat((255 - alpha)[..., None], 3, axis=2)
    a = alpha[..., None].astype(np.uint32)
    return ((colour * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)  # over white, rounded


# EXIF orientation -> the numpy view that undoes it (PIL's ImageOps.exif_transpose, OpenCV's colour decode)
_ORIENT = {
    2: lambda x: x[:, ::-1],
    3: lambda x: x[::-1, ::-1],
    4: lambda x: x[::-1],
    5: lambda x: x.swapaxes(0, 1),
    6: lambda x: x[::-1].swapaxes(0, 1),
    7: lambda x: x[::-1, ::-1].swapaxes(0, 1),
    8: lambda x: x[:, ::-1].swapaxes(0, 1),
}


def _orient(image: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Apply the file's EXIF orientation (PNG ``eXIf``), as OpenCV's colour decode does for every other file."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # PIL raises many types on odd files; OpenCV decoded it, so keep it as decoded
        return image
    turn = _ORIENT.get(orientation)
    return image if turn is None else np.ascontiguousarray(turn(image))


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
        iterator). The transform must be an albumentations ``Compose`` (it has ``set_random_state``), or None
        (nothing to seed).
        """
        if seed is not None and self.transform is not None and not hasattr(self.transform, "set_random_state"):
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
