"""``python -m arcfold <stage> ...``: prepare, folds, train, score, test, leaderboard, blend, tune, plots, rerank,
holdout."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "prepare": "arcfold.stages.prepare",
    "folds": "arcfold.stages.folds",
    "train": "arcfold.stages.train",
    "score": "arcfold.stages.score",
    "test": "arcfold.stages.test",
    "leaderboard": "arcfold.stages.leaderboard",
    "blend": "arcfold.stages.blend",
    "tune": "arcfold.stages.tune",
    "plots": "arcfold.stages.plots",
    "rerank": "arcfold.stages.rerank",
    "holdout": "arcfold.stages.holdout",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: python -m arcfold {" + ",".join(STAGES) + "} [options]  (each stage has --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from arcfold.stages.cli import run_cli

    module = importlib.import_module(STAGES[argv[0]])
    return run_cli(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
