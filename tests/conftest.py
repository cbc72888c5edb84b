"""Shared fixtures: tiny configs whose every output lands under a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    from arcfold.data.glyphs import generate_glyphs

    root = tmp_path_factory.mktemp("glyphs_input")
    generate_glyphs(root / "glyphs", seed=0, progress=False)
    return root
