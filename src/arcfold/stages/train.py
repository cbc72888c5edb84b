"""Train stage: one fold of one experiment, validated every epoch; the last (or the best) epoch kept.

The CLI of :mod:`arcfold.training.fold` (whose docstring lists the files, the resume rules and the multi-process run)::

    python -m arcfold train --config configs/glyphs_arcface.yaml --fold 0 [key=value ...]
    python -m arcfold train --config configs/glyphs_arcface.yaml --fold 0..4,full    # the folds, then the full fit
    torchrun --standalone --nproc_per_node 2 -m arcfold train --config ... --fold 0 [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from arcfold.artifacts import parse_folds
from arcfold.logs import setup_logging
from arcfold.stages.cli import add_config_args, config_from_args

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", "-f", required=True, help="fold index, A..B or A,B,C; full: the full-data fit")
    add_config_args(parser)
    args = parser.parse_intermixed_args(argv)  # key=value overrides before, between and after options
    from arcfold.errors import CorruptFileError, NonFiniteLossError
    from arcfold.training.fold import train_fold
    from arcfold.training.paths import FoldPaths, check_fold_index

    setup_logging()
    try:
        folds = parse_folds(args.fold)
    except ValueError as e:
        parser.error(str(e))
    cfg = config_from_args(args)
    for fold in folds:  # every fold of the spec exists, before the first one trains
        check_fold_index(cfg, fold)
    for fold in folds:
        started, skipped = time.time(), FoldPaths(cfg, fold).done.exists() and not cfg.train.force
        try:
            train_fold(cfg, fold)
        except (NonFiniteLossError, CorruptFileError) as e:  # one line (the checkpoint kept, the file): exit 2
            log.error("%s", e)
            raise SystemExit(2) from None
        _report(fold, "skipped" if skipped else "trained", time.time() - started)


def _report(fold: int | str, status: str, seconds: float) -> None:
    """One line per fold for ``train_fold.sh``'s whole-run ETA, appended to the file ``$ARCFOLD_RUN_REPORT`` when set
    (rank 0 only under torchrun): ``<fold> <trained|skipped> <seconds>``."""
    path = os.environ.get("ARCFOLD_RUN_REPORT")
    if path and os.environ.get("RANK", "0") == "0":
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{fold} {status} {seconds:.0f}\n")
