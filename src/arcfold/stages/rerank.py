"""Rerank stage: choose post-processing on OOF embeddings, with an honest (nested) estimate of what it gains.

The CLI of :mod:`arcfold.experiments.rerank`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)

# arcfold.experiments.rerank's, restated: importing them loads torch before --help
# (tests/stages/test_cli_help.py checks they agree)
METHODS = ("none", "dba", "qe", "kr", "dba+qe", "dba+kr", "qe+kr", "dba+qe+kr")
DEFAULT_NEW_LABEL = "new_individual"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold rerank", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", "-e", help="experiment name (oof/<name>/fold*.npz)")
    source.add_argument("--blend", help="blend spec, e.g. oof/blends/NAME.json")
    parser.add_argument("--oof-dir", default="oof")
    parser.add_argument("--task", choices=("retrieval", "recognition"), default="retrieval")
    parser.add_argument("--metric", default=None, help="selection metric (default map@r; map@5 for recognition)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--new-fraction", type=float, default=0.2, help="recognition: share of classes made 'new'")
    parser.add_argument("--new-label", default=DEFAULT_NEW_LABEL)
    parser.add_argument("--min-gain", type=float, default=0.0, help="switch a method on only above this nested gain")
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="finished folds to use (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing rerank spec")
    args = parser.parse_args(argv)
    from arcfold.experiments.rerank import render_rerank, rerank_experiment

    setup_logging()
    spec, out = rerank_experiment(
        Path(args.oof_dir),
        args.task,
        experiment=args.experiment,
        blend=args.blend,
        force=args.force,
        folds=args.folds,
        metric=args.metric,
        methods=args.methods,
        new_fraction=args.new_fraction,
        new_label=args.new_label,
        min_gain=args.min_gain,
        seed=args.seed,
    )
    print(render_rerank(spec))
    log.info("wrote %s", out)
