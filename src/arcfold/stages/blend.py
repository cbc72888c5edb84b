"""Blend stage: a weighted concatenation of experiments' embeddings, scored and weighted on OOF.

The CLI of :mod:`arcfold.experiments.blend`.
"""

from __future__ import annotations

import argparse
import logging

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)

# arcfold.experiments.blend.DEFAULT_GRID, restated: importing it loads torch before --help
# (tests/stages/test_cli_help.py checks they agree)
DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold blend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", "-e", nargs="+", required=True, help="member experiments (oof/<exp>/)")
    parser.add_argument("--weights", "-w", nargs="+", type=float, default=None, help="fixed weights (no search)")
    parser.add_argument("--name", "-n", required=True, help="blend name: oof/blends/<name>.json")
    parser.add_argument("--metric", default="recall@1", help="search objective (recall@1, map@r, ...)")
    parser.add_argument("--folds", nargs="+", type=int, default=None, help="blend only these folds")
    parser.add_argument("--grid", nargs="+", type=float, default=list(DEFAULT_GRID), help="weight values to try")
    parser.add_argument("--oof-dir", default="oof")
    parser.add_argument("--force", action="store_true", help="overwrite an existing spec of that name")
    args = parser.parse_args(argv)
    from arcfold.errors import BlendError
    from arcfold.experiments.blend import blend_experiments, render_blend

    setup_logging()
    try:
        spec = blend_experiments(
            args.oof_dir, args.experiments, args.name, args.weights, args.metric, args.folds, args.grid, args.force
        )
    except BlendError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    print("\n" + render_blend(spec) + "\n")
