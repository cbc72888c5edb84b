"""Tests of the embedded glyphs data set: counts, layout, determinism, fonts, confusables, hardness."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.ft2font import FT2Font
from PIL import Image

from arcfold.datasets import glyphs
from arcfold.datasets.glyphs import (
    CONFUSABLE_MAX_UNMATCHED,
    REFERENCE_FONTS,
    ensure_glyphs,
    font_dir,
    generate_glyphs,
    main,
    render_image,
    select_classes,
)

IMAGES_PER_CLASS = 10  # fewer than the default 16 to keep the module fast; the generator is the same
IMAGE_SIZE = 64

# Known homoglyph pairs (the first is kept when present, the second must then be absent).
HOMOGLYPHS = [
    (0x0061, 0x0430),  # a / Cyrillic a
    (0x006F, 0x03BF),  # o / Greek omicron
    (0x006F, 0x043E),  # o / Cyrillic o
    (0x006F, 0x0585),  # o / Armenian oh
    (0x0070, 0x0440),  # p / Cyrillic er
    (0x0070, 0x03C1),  # p / Greek rho
    (0x0063, 0x0441),  # c / Cyrillic es
    (0x0065, 0x0435),  # e / Cyrillic ie
    (0x0078, 0x0445),  # x / Cyrillic ha
    (0x0079, 0x0443),  # y / Cyrillic u
    (0x006C, 0x04CF),  # l / Cyrillic palochka
    (0x006C, 0x0627),  # l / Arabic alef
    (0x006C, 0x05D5),  # l / Hebrew vav
    (0x0075, 0x057D),  # u / Armenian seh
    (0x006E, 0x0578),  # n / Armenian vo
    (0x03BA, 0x043A),  # Greek kappa / Cyrillic ka
]


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glyphs") / "glyphs"
    train = generate_glyphs(out, seed=0, images_per_class=IMAGES_PER_CLASS, image_size=IMAGE_SIZE, progress=False)
    assert len(train) == len(pd.read_csv(out / "train.csv"))
    return out


@pytest.fixture(scope="module")
def train(dataset: Path) -> pd.DataFrame:
    return pd.read_csv(dataset / "train.csv")


@pytest.fixture(scope="module")
def classes(dataset: Path) -> pd.DataFrame:
    return pd.read_csv(dataset / "classes.csv", encoding="utf-8")


def test_counts_and_layout(dataset: Path, train: pd.DataFrame, classes: pd.DataFrame) -> None:
    assert list(train.columns) == ["image", "label", "group"]
    n_classes, n_groups = train["label"].nunique(), train["group"].nunique()
    print(f"glyphs: {n_classes} classes in {n_groups} groups, {len(train)} images")
    assert n_classes >= 200
    assert n_groups >= 6
    per_class = train.groupby("label").size()
    assert per_class.min() >= 10 and (per_class == IMAGES_PER_CLASS).all()
    # groups reasonably balanced: no script holds more than a quarter of the classes
    share = classes.groupby("group").size() / len(classes)
    assert share.max() <= 0.25, share.sort_values().tail(3)
    # one row per image, sorted by label then image, relative paths, label = group + code point
    assert not train["image"].duplicated().any()
    assert train.equals(train.sort_values(["label", "image"]).reset_index(drop=True))
    assert not any(os.path.isabs(p) for p in train["image"])
    assert (train["label"].str.rsplit("_", n=1).str[0] == train["group"]).all()
    assert set(train["label"]) == set(classes["label"])
    assert (dataset / "README.md").read_text(encoding="utf-8").count(f"{n_classes} classes") == 1


def test_every_image_exists_with_the_right_size(dataset: Path, train: pd.DataFrame) -> None:
    for rel in train["image"]:
        with Image.open(dataset / rel) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (IMAGE_SIZE, IMAGE_SIZE), rel
    # nothing else lies in images/ (no stray files from an earlier or interrupted run)
    assert sum(1 for p in (dataset / "images").rglob("*.png")) == len(train)


def test_classes_csv(classes: pd.DataFrame) -> None:
    assert list(classes.columns) == ["label", "group", "char", "codepoint", "unicode_name", "n_fonts", "fonts"]
    for row in classes.itertuples():
        cp = int(row.codepoint.removeprefix("U+"), 16)
        assert row.char == chr(cp) and row.label == f"{row.group}_{cp:04x}"
        fonts = row.fonts.split(";")
        assert row.n_fonts == len(fonts) >= 2
        assert REFERENCE_FONTS[0] in fonts


def test_fonts_are_real_and_never_last_resort(classes: pd.DataFrame) -> None:
    used = {f for fonts in classes["fonts"] for f in fonts.split(";")}
    assert not any("LastResort" in f for f in used)
    assert not any(f.startswith(("STIXSiz", "cmex", "cmsy")) for f in used)
    assert {"DejaVuSans.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf", "cmr10.ttf"} <= used
    cmaps = {f: FT2Font(str(font_dir() / f)).get_charmap() for f in used}
    for row in classes.itertuples():
        cp = ord(row.char)
        for f in row.fonts.split(";"):
            assert cmaps[f].get(cp, 0) != 0, f"{row.label} is not in the cmap of {f}"


def test_images_are_not_placeholder_boxes(dataset: Path, train: pd.DataFrame) -> None:
    """Different classes must look different: the class means of no two classes are near-identical."""
    x = np.stack([np.asarray(Image.open(dataset / p), dtype=np.float32) for p in train["image"]])
    codes, labels = pd.factorize(train["label"])
    means = np.stack([x[codes == k].mean(0) for k in range(len(labels))])
    means -= means.mean((1, 2), keepdims=True)
    flat = means.reshape(len(means), -1)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    sim = flat @ flat.T
    np.fill_diagonal(sim, -1)
    assert sim.max() < 0.97, f"class means too alike: {sim.max():.3f}"


def test_no_known_homoglyph_pair_survives(classes: pd.DataFrame) -> None:
    present = {ord(c) for c in classes["char"]}
    assert {0x61, 0x6F, 0x70, 0x6C} <= present  # Latin is processed first and keeps its letters
    both = [(hex(a), hex(b)) for a, b in HOMOGLYPHS if a in present and b in present]
    assert not both, f"homoglyph pairs present as two classes: {both}"
    # one letter case only: no uppercase letter anywhere
    assert not any(c.isupper() for c in classes["char"])


@pytest.mark.parametrize(
    ("a", "b", "font", "same"),
    [
        ("a", "\u0430", "DejaVuSans.ttf", True),  # Latin / Cyrillic a
        ("o", "\u03bf", "DejaVuSerif.ttf", True),  # Latin o / Greek omicron
        ("p", "\u0440", "DejaVuSans.ttf", True),  # Latin p / Cyrillic er
        ("x", "\u0445", "DejaVuSerif.ttf", True),  # Latin x / Cyrillic ha
        ("l", "\u04cf", "DejaVuSans.ttf", True),  # Latin l / Cyrillic palochka
        ("l", "\u05df", "DejaVuSans.ttf", True),  # Latin l / Hebrew final nun (different height)
        ("i", "l", "DejaVuSans.ttf", False),  # the dot
        ("\u0628", "\u062a", "DejaVuSans.ttf", False),  # Arabic beh / teh: dots
        ("\u0435", "\u0451", "DejaVuSerif.ttf", False),  # Cyrillic ie / io: diaeresis
        ("n", "\u043f", "DejaVuSans.ttf", False),  # Latin n / Cyrillic pe: arch vs flat top
        ("\u0438", "\u0439", "DejaVuSans.ttf", False),  # Cyrillic i / short i: breve
    ],
)
def test_confusable_measure(a: str, b: str, font: str, same: bool) -> None:
    """The automatic rule (not the hand list) separates homoglyphs from letters that differ by a mark."""
    cache = glyphs._CanonCache()
    assert cache.add(a, font) and cache.add(b, font)
    score = cache.fine(a, b, font)
    assert (score <= CONFUSABLE_MAX_UNMATCHED) == same, f"{a!r} vs {b!r} in {font}: {score}"


def test_hand_list_is_only_a_safety_net() -> None:
    """Most drops come from the measurement; the hand list catches the few it cannot."""
    sel = select_classes(IMAGE_SIZE)
    measured = [d for d in sel.dropped_confusables if d[2]]
    by_hand = [d for d in sel.dropped_confusables if not d[2]]
    assert len(measured) >= 15 and len(by_hand) <= 4, sel.dropped_confusables
    # italic serif fonts draw Cyrillic т like m: that style is removed from the class, the class stays
    assert any(lab == "cyrillic_0442" and "Italic" in f for lab, f, _ in sel.dropped_fonts)
    assert "cyrillic_0442" in {c.label for c in sel.classes}


def test_same_seed_is_byte_identical(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_glyphs(again, seed=0, images_per_class=IMAGES_PER_CLASS, image_size=IMAGE_SIZE, progress=False)
    first, second = _hash_tree(dataset), _hash_tree(again)
    assert first.keys() == second.keys()
    assert first == second


def test_image_is_independent_of_processing_order(dataset: Path, train: pd.DataFrame) -> None:
    """Each image depends on (seed, code point, index) only: rendering a sample backwards matches."""
    by_label = {c.label: c for c in select_classes(IMAGE_SIZE).classes}
    for rel, label in list(zip(train["image"], train["label"], strict=True))[::-97]:
        index = int(Path(rel).stem.rsplit("_", 1)[1])
        buf = io.BytesIO()
        Image.fromarray(render_image(by_label[label], 0, index, IMAGE_SIZE)).save(buf, format="PNG")
        assert buf.getvalue() == (dataset / rel).read_bytes(), rel


def test_other_seed_gives_other_images(dataset: Path, train: pd.DataFrame) -> None:
    by_label = {c.label: c for c in select_classes(IMAGE_SIZE).classes}
    sample = list(zip(train["image"], train["label"], strict=True))[::53]
    changed = 0
    for rel, label in sample:
        index = int(Path(rel).stem.rsplit("_", 1)[1])
        seed0 = np.asarray(Image.open(dataset / rel), dtype=np.float32)
        seed1 = render_image(by_label[label], 1, index, IMAGE_SIZE).astype(np.float32)
        changed += np.abs(seed0 - seed1).mean() > 5.0
    assert changed == len(sample)


def test_images_of_a_class_differ(dataset: Path, train: pd.DataFrame) -> None:
    closest = []
    for label, rows in train.groupby("label"):
        x = np.stack([np.asarray(Image.open(dataset / p), dtype=np.float32) for p in rows["image"]])
        diff = np.abs(x[:, None] - x[None]).mean((2, 3))
        np.fill_diagonal(diff, np.inf)
        closest.append((float(diff.min()), label))
    closest.sort()
    print("least varied classes (min pairwise mean |diff|):", closest[:3])
    # measured minimum is about 12 grey levels; identical or near-identical images would be < 2
    assert closest[0][0] > 5.0, closest[:3]


def test_raw_pixel_nearest_neighbour_is_hard_but_above_chance(dataset: Path, train: pd.DataFrame) -> None:
    """Leave-one-out 1-NN (cosine) on 16x16 raw pixels: far from solved, far above chance."""
    x = np.stack(
        [np.asarray(Image.open(dataset / p).resize((16, 16), Image.Resampling.BOX), np.float32) for p in train["image"]]
    ).reshape(len(train), -1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    y = pd.factorize(train["label"])[0]
    r1 = float((y[sim.argmax(1)] == y).mean())
    chance = 1.0 / train["label"].nunique()
    print(f"raw-pixel 1-NN Recall@1 = {r1:.3f} (chance {chance:.4f})")
    # measured about 0.16 with 10 images per class
    assert 20 * chance < r1 < 0.6


def test_ensure_does_not_regenerate(dataset: Path) -> None:
    stamp = (dataset / "train.csv").stat().st_mtime_ns
    assert ensure_glyphs(dataset, seed=123) == dataset / "train.csv"
    assert (dataset / "train.csv").stat().st_mtime_ns == stamp


def test_interrupted_generation_leaves_old_set_intact(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "set"
    generate_glyphs(out, seed=0, images_per_class=1, image_size=IMAGE_SIZE, progress=False)
    before = _hash_tree(out)
    calls = {"n": 0}
    real = glyphs.render_image

    def failing(*args: object, **kwargs: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 50:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(glyphs, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_glyphs(out, seed=1, images_per_class=2, image_size=IMAGE_SIZE, progress=False)
    assert _hash_tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp directory left behind
    # a fresh target that never completed does not appear at all
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        generate_glyphs(tmp_path / "fresh", seed=0, images_per_class=2, image_size=IMAGE_SIZE, progress=False)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_cli_replaces_existing_set(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    (out / "images").mkdir(parents=True)
    (out / "images" / "stale.png").write_bytes(b"old")
    assert main(["--out", str(out), "--seed", "0", "--images-per-class", "1", "--no-progress"]) == 0
    train = pd.read_csv(out / "train.csv")
    assert len(train) == train["label"].nunique() >= 200
    assert not (out / "images" / "stale.png").exists()
    assert ensure_glyphs(out) == out / "train.csv"
