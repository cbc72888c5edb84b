"""Plots stage: the pictures people look at, one experiment (and one fold) at a time, as PNG files.

The CLI of :mod:`arcfold.experiments.plots`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", "-e", required=True)
    parser.add_argument("--fold", "-f", type=int, default=None, help="fold to draw (default: the first finished)")
    parser.add_argument("--oof-dir", default="oof")
    parser.add_argument("--input-dir", default=None, help="data.input_dir to read the images from")
    parser.add_argument("--models-dir", default=None, help="where models/<exp>/fold<K>/history.csv are")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--queries", type=int, default=8, help="rows per retrieval grid")
    parser.add_argument("--max-points", type=int, default=3000, help="t-SNE subsample")
    args = parser.parse_args(argv)
    from arcfold.experiments.plots import make_plots

    setup_logging()
    try:
        listing = make_plots(
            args.experiment,
            args.oof_dir,
            args.fold,
            input_dir=args.input_dir,
            models_dir=args.models_dir,
            k=args.top_k,
            n_queries=args.queries,
            max_points=args.max_points,
        )
    except ValueError as e:  # --top-k too large, a corrupt OOF file: one line, not a traceback
        parser.error(str(e))
    exp_dir = Path(args.oof_dir) / args.experiment
    print("\n".join(str(exp_dir / p) for p in listing["plots"].values()))
