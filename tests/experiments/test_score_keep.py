"""Score stage: folds that kept their best validation epoch (``train.keep=best``) are flagged in scores.csv,
scores.json and the printed table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from arcfold.__main__ import main as arcfold_main
from arcfold.experiments.score import score_experiment

from .test_leaderboard import clustered_embeddings, fold_rows, write_experiment


def _experiment(root, name, keeps):
    """Folds 0 and 1 of ``name``, fold k written with ``train.keep=keeps[k]`` (None: a file from before the key)."""
    rng = np.random.default_rng(0)
    for k, keep in enumerate(keeps):
        rows = {k: fold_rows(k)}
        emb = {k: clustered_embeddings(rows[k]["labels"], 16, 1.0, rng)}
        write_experiment(root, name, emb, rows, n_splits=len(keeps), keep=keep)
    return root / "oof" / name


def test_scores_say_which_epoch_each_fold_kept(tmp_path, capsys):
    honest = _experiment(tmp_path, "honest", ["last", "last"])
    summary = score_experiment(honest)
    assert summary["keep"].to_dict() == {"0": "last", "1": "last", "mean": "last", "std": "last"}
    stored = json.loads((honest / "scores.json").read_text())
    assert stored["keep"] == "last" and stored["epoch_chosen_on_validation"] is False
    assert set(stored["mean"]) == set(stored["per_fold"]["0"])  # metrics only, no keep column in the means

    chosen = _experiment(tmp_path, "chosen", ["best", "last"])
    summary = score_experiment(chosen)
    assert summary["keep"].to_dict() == {"0": "best", "1": "last", "mean": "best", "std": "best"}
    csv = pd.read_csv(chosen / "scores.csv", index_col=0)
    assert csv.loc["mean", "keep"] == "best" and csv.loc["mean", "recall@1"] == summary.loc["mean", "recall@1"]
    stored = json.loads((chosen / "scores.json").read_text())
    assert stored["keep"] == "best" and stored["epoch_chosen_on_validation"] is True

    older = _experiment(tmp_path, "older", [None, None])  # written before train.keep: it kept the best epoch
    assert score_experiment(older, recompute=True)["keep"].tolist() == ["best"] * 4

    legend = "keep=best: epoch chosen on the validation fold"
    assert arcfold_main(["score", "--experiment", "chosen", "--oof-dir", str(tmp_path / "oof")]) == 0
    assert legend in capsys.readouterr().out
    assert arcfold_main(["score", "--experiment", "honest", "--oof-dir", str(tmp_path / "oof")]) == 0
    assert legend not in capsys.readouterr().out
