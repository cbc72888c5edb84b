"""Leaderboard stage: every experiment under ``oof/`` in one table, sorted by a chosen metric.

The CLI of :mod:`arcfold.experiments.leaderboard`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--oof-dir", default="oof", help="folder of experiments (default: oof)")
    parser.add_argument(
        "--sort", default="recall@1", help="metric to sort by: recall@1, map@r, ..., test_recall@1, test_map@r"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="hide experiments matching (repeatable)"
    )
    parser.add_argument("--no-blends", action="store_true", help="leave out oof/blends/*.json")
    args = parser.parse_args(argv)
    import pandas as pd

    from arcfold.experiments.leaderboard import build_leaderboard, render_text, write_leaderboard
    from arcfold.io import file_lock

    setup_logging()
    if not Path(args.oof_dir).is_dir():
        raise FileNotFoundError(f"no OOF folder {args.oof_dir}")
    with file_lock(Path(args.oof_dir) / ".leaderboard.lock", what="the leaderboard"):
        try:
            table = build_leaderboard(args.oof_dir, args.sort, exclude=args.exclude, include_blends=not args.no_blends)
        except ValueError as e:  # an unknown --sort metric
            parser.error(str(e))
        csv_path, md_path = write_leaderboard(table, args.oof_dir, args.sort)
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_colwidth", 60):
        print(render_text(table, args.sort))
    log.info("wrote %s and %s", csv_path, md_path)
