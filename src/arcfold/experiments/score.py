"""Score stage: per-fold and mean Recall@K / MAP@R of an experiment, from its ``oof/<exp>/fold<K>.json``.

Writes ``oof/<exp>/scores.csv`` (one row per fold plus ``mean`` and ``std`` rows) and
``oof/<exp>/scores.json``, and prints the table. Listing the finished folds and writing both files
happen under a lock (``oof/<exp>/.scores.lock``): when two ``train_fold.sh`` on different folds score
at once, the one that writes last has seen every fold the other saw.

With ``--recompute`` the scores are recomputed from the OOF embeddings (``fold<K>.npz``) instead of
read from the JSON written at training time, e.g. after changing the metric code.

Column ``keep`` says which epoch each fold kept (``train.keep``: ``last``, or ``best``; fold files written before
``train.keep`` existed count as ``best``, which they kept); the ``mean`` and ``std`` rows show ``best`` when any
fold did. ``best`` means the epoch was chosen on the validation fold itself, so its OOF score is optimistic:
``scores.json`` says so (``keep``, ``epoch_chosen_on_validation``) and the printed table ends with that legend.
Fold files: the finished folds must all have been trained from one fold file (the ``folds_sha256`` of their
JSONs), else the experiment is refused, naming the folds of each file: their validation sets need not partition
the data, so their mean means nothing. The fold file they recorded (``folds_path``) is verified when it is there
(:func:`arcfold.data.folds.verify_fold_file`: a hand-edited file is an error); one remade since is a warning.

CLI::

    python -m arcfold score --config configs/glyphs_arcface.yaml      # or: --experiment NAME
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from arcfold.artifacts import finished_folds
from arcfold.data.folds import file_sha256, verify_fold_file
from arcfold.errors import CorruptFileError, DataValidationError
from arcfold.io import file_lock, load_json, load_npz, save_json, save_text
from arcfold.retrieval.metrics import DEFAULT_KS, retrieval_metrics

log = logging.getLogger(__name__)

__all__ = ["check_fold_files", "score_experiment"]

METRIC_COLUMNS = [f"recall@{k}" for k in DEFAULT_KS] + ["map@r"]
KEEP_BEST_LEGEND = "keep=best: epoch chosen on the validation fold (the OOF score selects on itself: optimistic)"
RECOMPUTE_HINT = "Score with --recompute (from the OOF embeddings), or retrain the fold with train.force=true."


def check_fold_files(oof_dir: str | Path, folds: list[int], strict: bool = True) -> str | None:
    """Refuse folds trained from different fold files; verify the one they used. Returns its sha256 (or None).

    Reads ``fold<K>.json``'s ``folds_sha256`` and ``folds_path``; with ``strict=False`` an unreadable JSON is
    skipped (``--recompute`` scores from the ``.npz`` alone). Raises :class:`DataValidationError`.
    """
    oof_dir = Path(oof_dir)
    recorded: dict[int, tuple[str | None, str | None]] = {}
    for k in folds:
        try:
            stored = load_json(oof_dir / f"fold{k}.json", hint=RECOMPUTE_HINT)
        except CorruptFileError:
            if strict:
                raise
            continue
        recorded[k] = (stored.get("folds_sha256"), stored.get("folds_path"))
    shas = sorted({sha or "(none)" for sha, _ in recorded.values()})
    if len(shas) > 1:
        by_sha = {sha: [str(k) for k, (s, _) in recorded.items() if (s or "(none)") == sha] for sha in shas}
        listing = "; ".join(f"fold {', '.join(ks)} from {sha[:12]}" for sha, ks in by_sha.items())
        raise DataValidationError(
            f"{oof_dir}: the finished folds were trained from different fold files ({listing}; folds_sha256 of "
            "their fold JSONs), so their validation sets do not split one data set and cannot be averaged. "
            "Retrain the folds of the old fold file with train.force=true"
        )
    if not recorded:
        return None
    sha, folds_path = next(iter(recorded.values()))
    if folds_path and Path(folds_path).is_file():
        verify_fold_file(folds_path)
        if sha and file_sha256(folds_path) != sha:
            log.warning(
                "%s was remade since %s was trained (sha256 %s then, %s now): these are scores of the old folds",
                folds_path,
                oof_dir.name,
                sha[:12],
                file_sha256(folds_path)[:12],
            )
    elif folds_path:
        log.warning("%s: the fold file %s is not here; not verified", oof_dir, folds_path)
    return sha


def score_experiment(oof_dir: str | Path, recompute: bool = False) -> pd.DataFrame:
    """Table of per-fold scores with ``mean`` and ``std`` rows; written beside the OOF files."""
    oof_dir = Path(oof_dir)
    if not oof_dir.is_dir():
        raise FileNotFoundError(f"no finished folds in {oof_dir} (the folder does not exist)")
    with file_lock(oof_dir / ".scores.lock", what=f"scores of {oof_dir}"):
        return _score_experiment(oof_dir, recompute)


def _score_experiment(oof_dir: Path, recompute: bool) -> pd.DataFrame:
    folds = finished_folds(oof_dir)
    if not folds:
        raise FileNotFoundError(f"no finished folds in {oof_dir} (expected fold<K>.npz)")
    check_fold_files(oof_dir, folds, strict=not recompute)
    rows, keeps = [], []
    for fold in folds:
        npz = oof_dir / f"fold{fold}.npz"
        if recompute:
            arrays = load_npz(npz, hint=f"Retrain fold {fold} with train.force=true.")
            metrics = retrieval_metrics(arrays["embeddings"], arrays["labels"], ks=DEFAULT_KS)
            row = {"fold": fold, **metrics}
            keeps.append(_kept_by(npz.with_suffix(".json")))
        else:
            stored = load_json(npz.with_suffix(".json"), hint=RECOMPUTE_HINT)
            row = {"fold": fold, **{k: stored[k] for k in (*METRIC_COLUMNS, "n_queries", "best_epoch")}}
            keeps.append(str(stored.get("keep", "best")))
        rows.append(row)
    table = pd.DataFrame(rows).set_index("fold")
    per_fold = table[METRIC_COLUMNS]
    summary = pd.concat([per_fold, per_fold.mean().to_frame("mean").T, per_fold.std(ddof=0).to_frame("std").T])
    summary.index = summary.index.astype(str)
    summary.index.name = "fold"
    chosen_on_validation = "best" in keeps
    summary["keep"] = [*keeps, *["best" if chosen_on_validation else "last"] * 2]
    save_text(oof_dir / "scores.csv", summary.to_csv(float_format="%.6f"))
    save_json(
        oof_dir / "scores.json",
        {
            "experiment": oof_dir.name,
            "folds": [int(f) for f in table.index],
            "keep": "best" if chosen_on_validation else "last",
            "epoch_chosen_on_validation": chosen_on_validation,
            "mean": summary.loc["mean", METRIC_COLUMNS].to_dict(),
            "std": summary.loc["std", METRIC_COLUMNS].to_dict(),
            "per_fold": {str(k): v for k, v in per_fold.to_dict(orient="index").items()},
        },
    )
    return summary


def _kept_by(json_path: Path) -> str:
    """``train.keep`` of a finished fold for ``--recompute``: ``last`` or ``best`` (also for a fold JSON from before
    the key, which kept the best epoch, and for an unreadable one: an epoch not known to be the last)."""
    try:
        return str(load_json(json_path).get("keep", "best"))
    except CorruptFileError:
        return "best"
