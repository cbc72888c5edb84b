"""Prepare stage: make sure ``input/<dataset>/train.csv`` exists.

* ``glyphs``: the embedded default data set, generated deterministically (seconds) when absent.
* ``omniglot``: unpacked from the Omniglot zips (``--source``, default ``../shared/data/omniglot``).
* anything else is the user's own data: nothing is generated, a missing CSV is a clear error.

CLI::

    python -m arcfold prepare glyphs|omniglot [--out DIR] [--source DIR] [--force]
"""

from __future__ import annotations

from pathlib import Path

from arcfold.config import ExperimentConfig
from arcfold.datasets.glyphs import ensure_glyphs
from arcfold.datasets.omniglot import ensure_omniglot
from arcfold.errors import DataValidationError

__all__ = ["ensure_dataset"]

BUILTIN = ("glyphs", "omniglot")


def ensure_dataset(cfg: ExperimentConfig) -> Path:
    csv = cfg.data_dir / cfg.data.csv
    if csv.is_file():
        return csv
    if cfg.data.dataset == "glyphs" and cfg.data.csv == "train.csv":
        return ensure_glyphs(cfg.data_dir)
    if cfg.data.dataset == "omniglot" and cfg.data.csv == "train.csv":
        return ensure_omniglot(cfg.data_dir)
    raise DataValidationError(
        f"{csv}: file not found. Put your data set under {cfg.data_dir}/ (a CSV with image paths and labels, "
        "see README 'Bring your own data'), or use data.dataset=glyphs for the built-in one."
    )
