"""Prepare stage: make sure ``input/<dataset>/train.csv`` exists.

* ``glyphs``: the embedded default data set, generated deterministically (seconds) when absent.
* ``omniglot``: unpacked from the Omniglot zips (``--source``, default ``../shared/data/omniglot``).
* anything else is the user's own data: nothing is generated, a missing CSV is a clear error.

CLI::

    python -m arcfold prepare glyphs|omniglot [--out DIR] [--source DIR] [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from arcfold.config import ExperimentConfig
from arcfold.data.table import DataValidationError

__all__ = ["ensure_dataset"]

BUILTIN = ("glyphs", "omniglot")


def ensure_dataset(cfg: ExperimentConfig) -> Path:
    csv = cfg.data_dir / cfg.data.csv
    if csv.is_file():
        return csv
    if cfg.data.dataset == "glyphs" and cfg.data.csv == "train.csv":
        from arcfold.data.glyphs import ensure_glyphs

        return ensure_glyphs(cfg.data_dir)
    if cfg.data.dataset == "omniglot" and cfg.data.csv == "train.csv":
        from arcfold.data.omniglot import ensure_omniglot

        return ensure_omniglot(cfg.data_dir)
    raise DataValidationError(
        f"{csv}: file not found. Put your data set under {cfg.data_dir}/ (a CSV with image paths and labels, "
        "see README 'Bring your own data'), or use data.dataset=glyphs for the built-in one."
    )


def main(argv: list[str] | None = None) -> None:
    from arcfold.cli import setup_logging

    parser = argparse.ArgumentParser(prog="arcfold prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=BUILTIN)
    parser.add_argument("--out", default=None, help="output folder (default input/<dataset>)")
    parser.add_argument("--source", default=None, help="omniglot: folder holding the two zips")
    parser.add_argument("--seed", type=int, default=0, help="glyphs: generator seed")
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out or f"input/{args.dataset}")
    if args.dataset == "glyphs":
        from arcfold.data.glyphs import ensure_glyphs, generate_glyphs

        generate_glyphs(out, seed=args.seed) if args.force else ensure_glyphs(out, seed=args.seed)
    else:
        from arcfold.data.omniglot import DEFAULT_OMNIGLOT_SOURCE, ensure_omniglot, prepare_omniglot

        source = args.source or DEFAULT_OMNIGLOT_SOURCE
        prepare_omniglot(source, out) if args.force else ensure_omniglot(out, source)
