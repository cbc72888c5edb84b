"""Shared command-line plumbing of the stages: ``--config`` + ``key=value`` overrides, and the runner that turns a
user error into one line and exit 2."""

from __future__ import annotations

import argparse
import logging

from arcfold.config import ExperimentConfig, load_config
from arcfold.errors import USER_ERRORS

__all__ = ["add_config_args", "config_from_args", "run_cli"]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config (may 'base:' another); default: built-ins")
    # anywhere on the line: the stages parse with parse_intermixed_args
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run a stage's ``main``; user errors (bad config, bad data, refused overwrite) exit 2 with one clear line, and
    Ctrl-C exits 130 with one line (a training run's says which epoch it continues from) instead of a traceback."""
    try:
        main(argv)
    except USER_ERRORS as e:
        logging.getLogger("arcfold").error("%s", e)
        return 2
    except KeyboardInterrupt as e:
        logging.getLogger("arcfold").error("%s", str(e) or "interrupted (Ctrl-C)")
        return 130
    return 0
