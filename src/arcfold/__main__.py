"""``python -m arcfold <stage> ...``: prepare, folds, train, score, test, leaderboard, blend, tune, plots, rerank,
holdout."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "prepare": "arcfold.prepare",
    "folds": "arcfold.folds",
    "train": "arcfold.train",
    "score": "arcfold.score",
    "test": "arcfold.evaluate",
    "leaderboard": "arcfold.leaderboard",
    "blend": "arcfold.blend",
    "tune": "arcfold.tune",
    "plots": "arcfold.plots",
    "rerank": "arcfold.rerank",
    "holdout": "arcfold.holdout",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: python -m arcfold {" + ",".join(STAGES) + "} [options]  (each stage has --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from arcfold.cli import run_cli

    module = importlib.import_module(STAGES[argv[0]])
    return run_cli(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
