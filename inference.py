#!/usr/bin/env python
"""Offline inference: embed query and gallery images, search, re-rank, write ``submissions/<name>.csv``.

A thin entry point for :mod:`arcfold.stages.infer` (read :mod:`arcfold.inference.run`'s docstring for what runs,
and ``--help``). It needs no install step: it puts its own ``src/`` first on ``sys.path``, so in an internet-less
Kaggle notebook::

    !python /kaggle/input/arcfold-code/inference.py -c /kaggle/input/arcfold-code/configs/inference/glyphs.yaml \\
        models_dir=/kaggle/input/arcfold-models query.csv=... gallery.csv=...

works from any working directory, with the code and the weights attached as read-only data sets.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from arcfold.stages.cli import run_cli  # noqa: E402
from arcfold.stages.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
