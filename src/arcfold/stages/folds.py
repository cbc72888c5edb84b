"""Folds stage: ``folds/<dataset>.csv`` = the validated training rows plus a ``fold`` column.

The CLI of :mod:`arcfold.data.folds`.
"""

from __future__ import annotations

import argparse
import logging

from arcfold.logs import setup_logging
from arcfold.stages.cli import add_config_args, config_from_args

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold folds", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--force", action="store_true", help="remake the fold file even if it exists")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before, between and after options
    from arcfold.data.folds import ensure_folds

    setup_logging()
    cfg = config_from_args(args)
    from arcfold.datasets.prepare import ensure_dataset

    ensure_dataset(cfg)
    ensure_folds(cfg, force=args.force)
