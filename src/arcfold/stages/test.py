"""Test stage: the held-out test split (fold -1 of the fold file) embedded by every finished fold model, and scored.

The CLI of :mod:`arcfold.experiments.evaluate`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from arcfold.logs import setup_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arcfold test", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", "-c", help="experiment config (its name and paths pick the experiment)")
    source.add_argument("--experiment", "-e", help="experiment name (oof/<name>/, models/<name>/)")
    source.add_argument("--blend", help="blend spec, e.g. oof/blends/B.json")
    parser.add_argument("--oof-dir", default=None, help="default: paths.oof_dir of --config, else oof")
    parser.add_argument("--models-dir", default=None, help="default: paths.models_dir of --config, else models")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: train.device of --config)")
    members = "members: K, A..B, A,B,C, full (the full-data fit) or 0..4,full; default: the finished folds"
    parser.add_argument("--folds", default=None, help=members + " (not with --blend)")
    parser.add_argument("--force", action="store_true", help="embed and score again, overwriting the outputs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before, between and after options
    from arcfold.artifacts import parse_folds
    from arcfold.config import load_config
    from arcfold.experiments.evaluate import evaluate_blend, evaluate_experiment, render_test

    setup_logging()
    if args.overrides and not args.config:
        parser.error("key=value overrides need --config")
    if args.folds and args.blend:
        parser.error("--folds is for one experiment; a blend scores the folds of its spec")
    try:
        folds = parse_folds(args.folds) if args.folds else None
    except ValueError as e:
        parser.error(str(e))
    cfg = load_config(args.config, args.overrides) if args.config else None
    oof_dir = args.oof_dir or (cfg.paths.oof_dir if cfg else "oof")
    models_dir = args.models_dir or (cfg.paths.models_dir if cfg else "models")
    device = args.device or (cfg.train.device if cfg else "auto")
    data_cfg = cfg.data if cfg else None
    if args.blend:
        result = evaluate_blend(args.blend, oof_dir, models_dir, device, data_cfg, args.force)
        out = Path(args.blend).with_suffix(".test.json")
    else:
        name = args.experiment or cfg.name  # type: ignore[union-attr]
        result = evaluate_experiment(name, oof_dir, models_dir, device, data_cfg, args.force, folds=folds)
        out = Path(oof_dir) / name / "test.json"
    print(f"\n{render_test(result)}\n")
    log.info("wrote %s", out)
