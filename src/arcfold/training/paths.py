"""Where one fold's (or the full fit's) files live, and whether a run of it may start, resume or must be refused."""

from __future__ import annotations

from pathlib import Path

from arcfold.artifacts import FULL_FIT, fold_name
from arcfold.config import ExperimentConfig
from arcfold.errors import ArtifactExistsError, ConfigError, RunInterrupted

__all__ = ["FoldPaths", "check_fold_index", "check_fold_state", "remove_work_files"]


class FoldPaths:
    """Where one fold's artifacts live (see the module docstring); ``fold="full"``: the full-data fit's."""

    def __init__(self, cfg: ExperimentConfig, fold: int | str) -> None:
        self.cfg, self.fold = cfg, fold
        self.full = fold == FULL_FIT
        self.name = fold_name(fold)  # fold<K> | full
        self.what = "the full fit" if self.full else f"fold {fold}"
        self.work = cfg.models_dir / self.name
        self.weights = cfg.models_dir / f"{self.name}.pt"
        self.oof = cfg.oof_dir / f"{self.name}.npz"  # folds only: the full fit has no OOF
        # the full fit's JSON and config sit beside its weights (oof/<exp>/ holds only what has OOF embeddings)
        self.scores = (cfg.models_dir if self.full else cfg.oof_dir) / f"{self.name}.json"
        self.config = (cfg.models_dir if self.full else cfg.oof_dir) / f"{self.name}.config.yaml"
        self.done = self.scores if self.full else self.oof  # written last: marks the run finished
        self.last = self.work / "last.pt"
        self.history = self.work / "history.csv"
        self.log_file = self.work / "train.log"
        self.lock = cfg.models_dir / f".{self.name}.lock"

    # The kept epoch's files carry its number: a run killed after writing them but before its resume
    # point (last.pt) leaves files that last.pt does not name, and they are never mistaken for the kept ones.
    def best(self, epoch: int) -> Path:
        return self.work / f"best_e{epoch}.pt"

    def best_oof(self, epoch: int) -> Path:
        return self.work / f"best_oof_e{epoch}.npz"

    def interrupted(self, last_finished: int | None) -> RunInterrupted:
        """Ctrl-C's one line: the resume point (written atomically) holds ``last_finished``, the run continues there."""
        done = last_finished
        when = "before the first epoch finished" if done is None else f"after epoch {done} (the last finished)"
        return RunInterrupted(f"{self.what} of '{self.cfg.name}' interrupted {when}; continue with train.resume=true")

    def remove_best_except(self, epoch: int) -> None:
        keep = {self.best(epoch).name, self.best_oof(epoch).name}
        for p in [*self.work.glob("best_e*.pt"), *self.work.glob("best_oof_e*.npz")]:
            if p.name not in keep:
                p.unlink(missing_ok=True)


def check_fold_index(cfg: ExperimentConfig, fold: int | str) -> None:
    """Refuse a fold that the experiment cannot have (``folds.n_splits`` makes folds 0..n_splits-1), before any of
    its files (lock, log) or the data are made; the fold file's real fold count is checked again once it is read."""
    n_splits = cfg.folds.n_splits
    if fold != FULL_FIT and not 0 <= int(fold) < n_splits:
        raise ConfigError(
            f"fold {fold} does not exist: experiment '{cfg.name}' has folds 0..{n_splits - 1} "
            f"(folds.n_splits={n_splits}); train them with --fold 0..{n_splits - 1}, the full-data fit with --fold full"
        )


def check_fold_state(paths: FoldPaths, resume: bool, force: bool) -> str:
    """'done' (finished: skipped, so ``train_fold.sh 0..4`` after fold 0 trains folds 1..4), 'resume', or 'fresh'
    (``force`` retrains a finished fold). Refuses to lose work silently: an unfinished run needs resume or force."""
    if paths.done.exists():
        return "fresh" if force else "done"
    if paths.last.exists():
        if resume:
            return "resume"
        if not force:
            raise ArtifactExistsError(
                f"an unfinished run of {paths.what} exists ({paths.last}); "
                "pass train.resume=true to continue it or train.force=true to start over"
            )
    return "fresh"


def remove_work_files(paths: FoldPaths) -> None:
    """Delete the resume point and the best-epoch files once the fold's outputs are written (history and log stay)."""
    for p in [paths.last, *paths.work.glob("best_e*.pt"), *paths.work.glob("best_oof_e*.npz")]:
        p.unlink(missing_ok=True)
