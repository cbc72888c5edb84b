"""Holdout stage: a local test set made from one fold, to run ``inference.py`` end to end and score its submission.

The CLI of :mod:`arcfold.experiments.holdout`.
"""

from __future__ import annotations

import argparse
import json
import logging

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)

# the keys of arcfold.retrieval.submission.DEFAULT_HEADERS, restated: importing it loads pandas before --help
# (tests/stages/test_cli_help.py checks they agree)
FORMATS = ("retrieval", "recognition", "top5")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold holdout", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write query/gallery/truth CSVs from one fold's or the test split's images")
    make.add_argument("--experiment", "-e", required=True)
    which = make.add_mutually_exclusive_group(required=True)
    which.add_argument("--fold", type=int, help="the rows of oof/<exp>/fold<K>.npz (use folds=[K] at inference)")
    which.add_argument("--split", choices=["test"], help="the fold CSV's test split (fold -1): every fold may be used")
    make.add_argument("--out", required=True)
    make.add_argument("--oof-dir", default="oof")
    make.add_argument("--new-fraction", type=float, default=0.2)
    make.add_argument("--new-label", default="new_individual")
    make.add_argument("--seed", type=int, default=0)
    score = sub.add_parser("score", help="score a submission against a holdout's truth")
    score.add_argument("--submission", required=True)
    score.add_argument("--holdout", required=True, help="the folder 'make' wrote")
    score.add_argument("--format", required=True, choices=FORMATS)
    args = parser.parse_args(argv)
    from arcfold.experiments.holdout import make_holdout, score_holdout

    setup_logging()
    if args.command == "make":
        info = make_holdout(
            args.oof_dir,
            args.experiment,
            args.fold,
            args.out,
            new_fraction=args.new_fraction,
            new_label=args.new_label,
            seed=args.seed,
            split=args.split or "fold",
        )
        log.info(
            "wrote %s: %d queries (%d new), %d gallery images; images are under %s; at inference use %s",
            args.out,
            info["n_query"],
            info["n_new_queries"],
            info["n_gallery"],
            info["image_root"],
            "every fold (no fold model saw the test split)" if args.split else f"folds=[{args.fold}] only",
        )
    else:
        scores = score_holdout(args.submission, args.holdout, args.format)
        print(json.dumps(scores, indent=2))
