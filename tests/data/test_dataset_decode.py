"""read_image on files OpenCV's colour decode gets wrong without a word: 16-bit PNGs, strokes drawn only in the
alpha channel, transparency; and the warning for an image that decodes constant. Real PNGs written by PIL, expected
pixels computed by hand from the rules of arcfold.data.dataset's module doc."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from PIL import Image

import arcfold.data.dataset as dataset_module
from arcfold.data.dataset import ImageDataset, read_image


def _rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_16bit_greyscale_keeps_the_top_byte(tmp_path, caplog) -> None:
    values = np.array([[0, 255, 256, 4095], [32768, 65535, 1000, 50000]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)  # PIL mode I;16
    assert Image.open(path).mode == "I;16"
    image = read_image(str(path))
    expected = np.array([[0, 0, 1, 15], [128, 255, 3, 195]], dtype=np.uint8)  # value >> 8, e.g. 50000 // 256 = 195
    assert image.dtype == np.uint8 and image.shape == (2, 4, 3)
    assert (image == expected[..., None]).all()
    assert "4095" not in caplog.text  # a value above 4095: no 12-bit hint


def test_16bit_image_within_12_bits_is_kept_dark_and_hinted_once(tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(dataset_module, "_warned_low_16bit", False)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"x{i}.png")
        Image.fromarray(np.array([[0, 16, 2048, 4095]], dtype=np.uint16)).save(paths[-1])
    with caplog.at_level(logging.WARNING, logger="arcfold"):
        images = [read_image(str(p)) for p in paths]
    assert (images[0][..., 0] == [[0, 0, 8, 15]]).all()  # the PNG rule, not a rescale by the image's max
    hints = [r.getMessage() for r in caplog.records if "no value above 4095" in r.getMessage()]
    assert len(hints) == 1 and str(paths[0]) in hints[0]


@pytest.mark.parametrize("ink", [0, 255])
def test_strokes_only_in_the_alpha_decode_black_on_white(tmp_path, ink) -> None:
    alpha = np.array([[0, 255, 128], [255, 0, 64]], dtype=np.uint8)
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = ink
    rgba[..., 3] = alpha
    rgba[0, 0, :3] = 0 if ink else 255  # a fully transparent pixel of another colour does not count
    path = tmp_path / "strokes.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert (_rgb(path) == (ink if ink else 0)).sum() >= 5  # OpenCV's colour decode: (almost) one flat colour
    image = read_image(str(path))
    expected = np.array([[255, 0, 127], [0, 255, 191]], dtype=np.uint8)  # 255 - alpha
    assert (image == expected[..., None]).all()


def test_grey_alpha_and_palette_transparency_decode_the_same_strokes(tmp_path) -> None:
    alpha = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    Image.fromarray(np.dstack([np.zeros_like(alpha), alpha]), "LA").save(tmp_path / "la.png")
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([255, 255, 255, 255, 255, 255])  # white ink; index 0 transparent (tRNS)
    palette.save(tmp_path / "p.png", transparency=0)
    for name in ("la.png", "p.png"):
        assert (read_image(str(tmp_path / name)) == np.array([[255, 0], [0, 255]], np.uint8)[..., None]).all(), name


def test_colour_with_transparency_is_composited_over_white(tmp_path) -> None:
    rgba = np.array([[[200, 100, 0, 128], [10, 20, 30, 255], [7, 7, 7, 0]]], dtype=np.uint8)
    path = tmp_path / "c.png"
    Image.fromarray(rgba, "RGBA").save(path)
    # c * a / 255 + 255 * (255 - a) / 255: 200 * 128 / 255 + 127 = 227.4, 100 * 128 / 255 + 127 = 177.2, 0 + 127
    assert read_image(str(path)).tolist() == [[[227, 177, 127], [10, 20, 30], [255, 255, 255]]]


def test_opaque_rgba_and_plain_files_decode_as_opencv_does(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((5, 7), 255, np.uint8)]), "RGBA").save(tmp_path / "opaque.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=90)
    assert (read_image(str(tmp_path / "opaque.png")) == rgb).all()
    for name in ("rgb.png", "rgb.jpg"):
        assert (read_image(str(tmp_path / name)) == _rgb(tmp_path / name)).all(), name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_a_transparent_png_is_applied_as_opencv_applies_it(tmp_path, orientation) -> None:
    rgb = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "rgb.png", exif=exif)
    Image.fromarray(np.dstack([rgb, np.full((5, 7), 255, np.uint8)]), "RGBA").save(tmp_path / "rgba.png", exif=exif)
    assert np.array_equal(read_image(str(tmp_path / "rgba.png")), _rgb(tmp_path / "rgb.png"))


def test_a_constant_image_is_reported_once_by_name(tmp_path, caplog) -> None:
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((4, 4, 3), (9, 8, 7), np.uint8)).save(path)
    Image.fromarray(np.eye(4, dtype=np.uint8) * 255).save(tmp_path / "ok.png")
    with caplog.at_level(logging.WARNING, logger="arcfold"):
        ImageDataset([str(path), str(tmp_path / "ok.png")], [0, 1], size=2, progress=False, cache=True)
        read_image(str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "(9, 8, 7)" in warnings[0]
