"""Tune stage: an optuna search over any config keys, each trial a real training run on chosen folds.

The CLI of :mod:`arcfold.training.tune`.
"""

from __future__ import annotations

import argparse
import logging

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)

# arcfold.training.tune.DEFAULT_GRACE_PERIOD, restated: importing it loads torch and optuna before --help
# (tests/stages/test_cli_help.py checks they agree)
DEFAULT_GRACE_PERIOD = 300


def main(argv: list[str] | None = None) -> None:
    from arcfold.artifacts import parse_folds

    parser = argparse.ArgumentParser(prog="arcfold tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", required=True, help="experiment config the trials start from")
    parser.add_argument("--space", "-s", required=True, help="search space YAML (configs/tune/*.yaml)")
    parser.add_argument("--trials", "-n", type=int, required=True, help="finished trials the study should have")
    parser.add_argument("--folds", "-f", default="0", help="folds each trial trains: K, A..B or A,B (default 0)")
    parser.add_argument("--metric", default="recall@1", help="objective, maximised: recall@1, map@r, ...")
    parser.add_argument("--study", default=None, help="study name (default: the space file's stem)")
    parser.add_argument("--out", default=None, help="best config (default: configs/tuned/<study>_best.yaml)")
    parser.add_argument("--no-prune", action="store_true", help="train every trial to the end")
    parser.add_argument(
        "--grace-period", type=int, default=DEFAULT_GRACE_PERIOD, help="seconds before a silent trial counts as killed"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="fixed config overrides for every trial")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before, between and after options
    from arcfold.training.tune import render_study, tune

    setup_logging()
    study = tune(
        args.config,
        args.space,
        args.trials,
        folds=parse_folds(args.folds),
        metric=args.metric,
        study_name=args.study,
        overrides=args.overrides,
        prune=not args.no_prune,
        out_path=args.out,
        grace_period=args.grace_period,
        seed=args.seed,
    )
    print("\n" + render_study(study) + "\n")
