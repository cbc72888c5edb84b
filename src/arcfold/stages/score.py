"""Score stage: per-fold and mean Recall@K / MAP@R of an experiment, from its ``oof/<exp>/fold<K>.json``.

The CLI of :mod:`arcfold.experiments.score`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default=None, help="experiment config (its name picks oof/<name>/)")
    parser.add_argument("--experiment", "-e", default=None, help="experiment name (instead of --config)")
    parser.add_argument("--oof-dir", default="oof")
    parser.add_argument("--recompute", action="store_true", help="recompute from the OOF embeddings")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before, between and after options
    import pandas as pd

    from arcfold.config import load_config
    from arcfold.errors import CorruptFileError
    from arcfold.experiments.score import KEEP_BEST_LEGEND, score_experiment

    setup_logging()
    if args.experiment:
        oof_dir = Path(args.oof_dir) / args.experiment
    else:
        cfg = load_config(args.config, args.overrides)
        oof_dir = cfg.oof_dir
    try:
        summary = score_experiment(oof_dir, recompute=args.recompute)
    except CorruptFileError as e:  # a truncated fold file: one line naming it, not a traceback
        log.error("%s", e)
        raise SystemExit(2) from None
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160):
        print(f"\n{oof_dir.name}: leave-one-out retrieval on each held-out fold\n{summary}\n")
    if (summary["keep"] == "best").any():
        print(KEEP_BEST_LEGEND + "\n")
    log.info("wrote %s", oof_dir / "scores.csv")
