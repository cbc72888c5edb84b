"""Shared fixtures: tiny configs whose every output lands under a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_SOURCE = REPO.parent / "shared" / "data" / "omniglot"


def tmp_path_overrides(root: Path) -> list[str]:
    """Overrides that send data, folds, OOF and weights under ``root``."""
    return [
        f"data.input_dir={root / 'input'}",
        f"paths.folds_dir={root / 'folds'}",
        f"paths.oof_dir={root / 'oof'}",
        f"paths.models_dir={root / 'models'}",
    ]


TINY = [
    "model.backbone=resnet10t",
    "model.embedding_size=64",
    "data.image_size=32",
    "train.batch_size=32",
    "train.eval_batch_size=128",
    "train.progress=false",
]


@pytest.fixture(scope="session")
def glyphs_input(tmp_path_factory) -> Path:
    """The default glyph data set, generated once per test session; returns the input/ folder."""
    from arcfold.datasets.glyphs import generate_glyphs

    root = tmp_path_factory.mktemp("glyphs_input")
    generate_glyphs(root / "glyphs", seed=0, progress=False)
    return root


def write_mini_dataset(
    input_dir: Path, n_groups: int = 4, classes_per_group: int = 5, images_per_class: int = 6, size: int = 32
) -> Path:
    """A tiny data set ``<input_dir>/mini/`` (train.csv + PNGs) made in milliseconds: a class is a bar at its own
    angle; each image draws it in random colours, offset and noise (nuisances a few training steps learn to
    ignore, so validation scores move from epoch to epoch). For tests of the machinery. Returns the folder."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    root = input_dir / "mini"
    rng = np.random.default_rng(0)
    rows = []
    n_classes = n_groups * classes_per_group
    for g in range(n_groups):
        for c in range(classes_per_group):
            angle = np.pi * (c * n_groups + g) / n_classes  # a group's classes spread over all angles
            for i in range(images_per_class):
                yy, xx = np.mgrid[:size, :size] - size / 2 - rng.uniform(-4, 4, 2)[:, None, None]
                bar = np.abs(xx * np.sin(angle) - yy * np.cos(angle)) < size / 10  # (size, size)
                background, colour = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
                image = np.where(bar[..., None], colour, background) + rng.normal(0, 30, (size, size, 3))
                rel = f"images/g{g}/c{c}_{i}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / rel)
                rows.append({"image": rel, "label": f"g{g}c{c}", "group": f"g{g}"})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def mini_overrides(root: Path) -> list[str]:
    """A tiny deterministic CPU training on :func:`write_mini_dataset` under ``root``: 4 folds (one group each),
    3 epochs of 3 batches, augmentation, dropout and an m-per-class sampler (so every RNG is exercised)."""
    return [
        *tmp_path_overrides(root),
        *TINY,
        "name=mini",
        "data.dataset=mini",
        "folds.n_splits=4",
        "model.embedding_size=32",
        "model.drop_rate=0.1",
        "train.batch_size=16",
        "train.eval_batch_size=64",
        "sampler.m_per_class=4",
        "train.epochs=3",
        "train.limit_train_batches=3",
        "train.device=cpu",
        "train.amp=off",
    ]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): the same
    arithmetic in every run, and no thread contention on a busy machine (5x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
