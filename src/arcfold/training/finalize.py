"""A finished run's outputs: the fold's weights, config, scores and OOF embeddings (the OOF file last: it marks the
fold finished), or the full fit's ``full.pt`` / ``full.json``; and the full fit's epoch count."""

from __future__ import annotations

import logging
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from arcfold.artifacts import FULL_FIT, finished_folds
from arcfold.config import ExperimentConfig, config_to_yaml
from arcfold.data.folds import file_sha256
from arcfold.data.table import GROUP, ID, IMAGE, LABEL
from arcfold.io import atomic_path, load_json, load_npz, save_json, save_npz, save_text
from arcfold.runtime import git_commit
from arcfold.training.paths import FoldPaths, remove_work_files

log = logging.getLogger(__name__)

__all__ = ["finalize_fold", "finalize_full", "full_fit_epochs", "run_record", "save_history"]


def save_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def run_record(history: list[dict], seconds: float, folds_path: Path) -> dict[str, Any]:
    """The fields every finished run records (fold JSON, full.json): speed, time, data, code, skipped steps."""
    return {
        "train_images_per_s": float(np.mean([h["train_images_per_s"] for h in history])),
        "seconds": round(seconds, 1),
        "folds_path": str(folds_path),
        "folds_sha256": file_sha256(folds_path),
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "skipped_batches": int(sum(h.get("skipped_batches", 0) for h in history)),
        "skipped_steps": int(sum(h.get("skipped_steps", 0) for h in history)),
    }


def finalize_fold(
    cfg, fold, paths: FoldPaths, val_df, kept, history, folds_path, seconds, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    if kept["epoch"] < 0:
        raise RuntimeError("no epoch was validated")
    embeddings = load_npz(paths.best_oof(kept["epoch"]), hint="Start the fold over with train.force=true.")[
        "embeddings"
    ]
    last = history[-1]
    scores = {
        "experiment": cfg.name,
        "fold": fold,
        "keep": cfg.train.keep,
        "kept_epoch": kept["epoch"],
        "best_epoch": kept["epoch"],  # the kept epoch's name before train.keep existed (then always the best)
        "last_epoch": int(last["epoch"]),
        "epochs": cfg.train.epochs,
        **kept["metrics"],  # the kept epoch's scores: what the OOF file holds
        "last": {k: v for k, v in last.items() if k.startswith(("recall@", "map@"))},
        **run_record(history, seconds, folds_path),
        **(extra or {}),
    }
    # weights first, OOF last: the OOF file is what marks the fold finished
    with atomic_path(paths.weights) as tmp:
        shutil.copyfile(paths.best(kept["epoch"]), tmp)
    save_text(paths.config, config_to_yaml(cfg))
    save_json(paths.scores, scores)
    save_npz(
        paths.oof,
        ids=val_df[ID].to_numpy(dtype=str),
        images=val_df[IMAGE].to_numpy(dtype=str),
        labels=val_df[LABEL].to_numpy(dtype=str),
        groups=val_df[GROUP].to_numpy(dtype=str),
        embeddings=embeddings.astype(np.float32),
    )
    remove_work_files(paths)
    log.info(
        "fold %d finished: kept epoch %d (train.keep=%s), R@1 %.4f, MAP@R %.4f -> %s, %s",
        fold,
        kept["epoch"],
        cfg.train.keep,
        scores["recall@1"],
        scores["map@r"],
        paths.oof,
        paths.weights,
    )
    return scores


def full_fit_epochs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The full fit's epoch count and the rule that gave it: ``{"epochs", "epochs_rule"[, "fold_kept_epochs"]}``.

    ``train.full_epochs > 0``: that many. Else the count the folds chose: ``train.epochs`` with ``train.keep=last``;
    with ``keep=best`` the median, rounded half up, of ``kept_epoch + 1`` over the experiment's finished fold JSONs
    (``oof/<exp>/fold<K>.json``; ``best_epoch`` in files older than ``train.keep``), and a
    :class:`FileNotFoundError` when no fold has finished.
    """
    if cfg.train.full_epochs > 0:
        return {"epochs": cfg.train.full_epochs, "epochs_rule": "train.full_epochs"}
    if cfg.train.keep == "last":
        return {"epochs": cfg.train.epochs, "epochs_rule": "train.epochs (train.keep=last)"}
    folds = finished_folds(cfg.oof_dir) if cfg.oof_dir.is_dir() else []
    if not folds:
        raise FileNotFoundError(
            f"the full fit of '{cfg.name}' trains for the median kept epoch of its finished folds (train.keep=best, "
            f"train.full_epochs=0), but {cfg.oof_dir} has no finished fold: train the folds first, or set "
            "train.full_epochs"
        )
    kept = {}
    for k in folds:
        scores = load_json(cfg.oof_dir / f"fold{k}.json", hint=f"Retrain fold {k} with train.force=true.")
        kept[str(k)] = int(scores["kept_epoch"] if "kept_epoch" in scores else scores["best_epoch"])
    median = float(np.median([e + 1 for e in kept.values()]))
    return {
        "epochs": int(math.floor(median + 0.5)),
        "epochs_rule": f"median of kept_epoch + 1 over folds {','.join(kept)} (train.keep=best), rounded half up",
        "fold_kept_epochs": kept,
    }


def finalize_full(cfg, paths: FoldPaths, kept, history, folds_path, seconds, extra: dict[str, Any]) -> dict[str, Any]:
    """The full fit's outputs: ``full.pt`` (the last epoch's weights), ``full.config.yaml``, ``full.json`` last."""
    info = {
        "experiment": cfg.name,
        "fold": FULL_FIT,
        "keep": "last",
        "kept_epoch": kept["epoch"],
        "last_epoch": int(history[-1]["epoch"]),
        **extra,  # epochs, epochs_rule, n_images, n_classes, ...
        "train_loss": float(history[-1]["train_loss"]),
        **run_record(history, seconds, folds_path),
    }
    with atomic_path(paths.weights) as tmp:
        shutil.copyfile(paths.best(kept["epoch"]), tmp)
    save_text(paths.config, config_to_yaml(cfg))
    save_json(paths.scores, info)  # last: marks the full fit finished
    remove_work_files(paths)
    log.info(
        "full fit finished: %d epochs (%s), %d images / %d classes, %.2fx a fold's training images per epoch -> %s",
        info["epochs"],
        info["epochs_rule"],
        info["n_images"],
        info["n_classes"],
        info["n_images"] / max(info["fold_train_images_mean"], 1.0),
        paths.weights,
    )
    return info
