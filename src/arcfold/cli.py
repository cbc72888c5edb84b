"""Shared command-line plumbing: ``--config`` + ``key=value`` overrides, logging set-up."""

from __future__ import annotations

import argparse
import logging
import sys

from arcfold.config import ConfigError, ExperimentConfig, load_config

__all__ = ["add_config_args", "config_from_args", "run_cli", "setup_logging"]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config (may 'base:' another); default: built-ins")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run a stage's ``main``; user errors (bad config, bad data, refused overwrite) exit 2 with one clear line."""
    from arcfold.blend import BlendError
    from arcfold.data.table import DataValidationError
    from arcfold.io import ArtifactExistsError, CorruptFileError
    from arcfold.rerank import RerankError
    from arcfold.submission import SubmissionError

    user_errors = (ConfigError, DataValidationError, ArtifactExistsError, FileNotFoundError, CorruptFileError)
    try:
        main(argv)
    # FloatingPointError: arcfold.train.NonFiniteLossError (a diverged run), without importing train here
    except (*user_errors, BlendError, RerankError, SubmissionError, FloatingPointError) as e:
        logging.getLogger("arcfold").error("%s", e)
        return 2
    return 0
