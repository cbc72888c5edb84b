"""``python -m arcfold <stage> ...``: prepare, folds, train, score, test, leaderboard, blend, tune, plots, rerank,
holdout. Without a stage, or with an unknown one, it lists the stages (one line each) and exits 2; ``--help`` lists
them and exits 0. Nothing heavy is imported here: the stage's module is imported only once its name is known."""

from __future__ import annotations

import difflib
import importlib
import sys

# stage -> (its module, what it does: the line the stage list shows)
STAGES = {
    "prepare": ("arcfold.stages.prepare", "make input/<dataset>/ (the glyph generator, Omniglot from its zips)"),
    "folds": ("arcfold.stages.folds", "split the training CSV into grouped folds: folds/<dataset>.csv"),
    "train": ("arcfold.stages.train", "train folds (--fold 0, 0..4, full) and write their OOF embeddings and scores"),
    "score": ("arcfold.stages.score", "per-fold and mean Recall@K / MAP@R of an experiment: oof/<exp>/scores.csv"),
    "test": ("arcfold.stages.test", "embed and score the held-out test split with every fold model"),
    "leaderboard": ("arcfold.stages.leaderboard", "every experiment under oof/ in one table, sorted by a metric"),
    "blend": ("arcfold.stages.blend", "weight several experiments' embeddings on OOF: oof/blends/<name>.json"),
    "tune": ("arcfold.stages.tune", "optuna search over config keys, each trial a real training run"),
    "plots": ("arcfold.stages.plots", "PNG pictures of an experiment: curves, retrieval grids, t-SNE"),
    "rerank": ("arcfold.stages.rerank", "choose post-processing (DBA, QE, k-reciprocal, vote) on OOF embeddings"),
    "holdout": ("arcfold.stages.holdout", "a local test set from one fold, to run inference.py end to end and score"),
}


def usage() -> str:
    """The usage line and the list of stages, one line each."""
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in STAGES.items()]
    return (
        "usage: python -m arcfold STAGE [options]   (python -m arcfold STAGE --help: the stage's options)\n\n"
        "stages:\n" + "\n".join(lines) + "\n\ninference: python inference.py -c CONFIG [key=value ...]"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in STAGES:
        if argv:
            close = difflib.get_close_matches(argv[0], STAGES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            print(f"python -m arcfold: unknown stage '{argv[0]}'{hint}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    from arcfold.stages.cli import run_cli

    module = importlib.import_module(STAGES[argv[0]][0])
    return run_cli(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
