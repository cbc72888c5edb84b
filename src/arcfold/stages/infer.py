"""Inference stage: embed query and gallery images with fold/experiment ensembles, search, re-rank, write a submission.

The CLI of :mod:`arcfold.inference.run`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default=None, help="inference YAML (may 'base:' another)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. query.csv=test.csv tta.hflip=true")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before, between and after options
    from arcfold.inference.config import load_inference_config
    from arcfold.inference.run import run_inference

    setup_logging()
    import arcfold

    log.info("arcfold from %s", Path(arcfold.__file__).parent)
    cfg = load_inference_config(args.config, args.overrides)
    run_inference(cfg)
