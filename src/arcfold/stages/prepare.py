"""Prepare stage: make sure ``input/<dataset>/train.csv`` exists.

The CLI of :mod:`arcfold.datasets.prepare`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)

# arcfold.datasets.prepare.BUILTIN, restated: importing it loads pandas before --help
# (tests/stages/test_cli_help.py checks they agree)
BUILTIN = ("glyphs", "omniglot")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=BUILTIN)
    parser.add_argument("--out", default=None, help="output folder (default input/<dataset>)")
    parser.add_argument(
        "--source", default=None, help="omniglot: folder of images_background_small{1,2}.zip (brendenlake/omniglot)"
    )
    parser.add_argument("--seed", type=int, default=0, help="glyphs: generator seed")
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out or f"input/{args.dataset}")
    if args.dataset == "glyphs":
        from arcfold.datasets.glyphs import ensure_glyphs, generate_glyphs

        generate_glyphs(out, seed=args.seed) if args.force else ensure_glyphs(out, seed=args.seed)
    else:
        from arcfold.datasets.omniglot import DEFAULT_OMNIGLOT_SOURCE, ensure_omniglot, prepare_omniglot

        source = args.source or DEFAULT_OMNIGLOT_SOURCE
        prepare_omniglot(source, out) if args.force else ensure_omniglot(out, source)
