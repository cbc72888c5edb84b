"""train.keep: a fold keeps its last epoch (the schedule decides) or its best validation epoch, and its JSON
records both the kept and the last epoch's scores."""

from __future__ import annotations

import pytest

import arcfold.training.fold
from arcfold.config import load_config
from arcfold.io import load_json, load_npz, load_torch
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import mini_overrides, write_mini_dataset

SCRIPTED_RECALL = [0.9, 0.7]  # validation Recall@1 of epochs 0 and 1: the best epoch is 0, the last 1


@pytest.mark.parametrize("keep, kept_epoch", [("last", 1), ("best", 0)])
def test_the_fold_keeps_the_last_or_the_best_epoch_and_records_both(tmp_path, monkeypatch, keep, kept_epoch):
    write_mini_dataset(tmp_path / "input")
    real_metrics, seen = arcfold.training.fold.retrieval_metrics, []

    def scripted(*args, **kwargs):  # the real metrics, with the Recall@1 that picks the best epoch scripted
        seen.append({**real_metrics(*args, **kwargs), "recall@1": SCRIPTED_RECALL[len(seen)]})
        return seen[-1]

    monkeypatch.setattr(arcfold.training.fold, "retrieval_metrics", scripted)
    cfg = load_config(
        None, [*mini_overrides(tmp_path), "train.epochs=2", "train.limit_train_batches=2", f"train.keep={keep}"]
    )
    scores = train_fold(cfg, 0)
    paths = FoldPaths(cfg, 0)

    assert len(seen) == 2 and seen[0]["map@r"] != seen[1]["map@r"]  # the two epochs can be told apart
    epochs = (scores["kept_epoch"], scores["best_epoch"], scores["last_epoch"])
    assert scores["keep"] == keep and epochs == (kept_epoch, kept_epoch, 1)
    assert {k: scores[k] for k in seen[kept_epoch]} == seen[kept_epoch]  # top level: the kept epoch's scores
    assert scores["last"] == {k: v for k, v in seen[1].items() if k.startswith(("recall@", "map@"))}
    assert load_json(paths.scores) == scores
    # the weights and the OOF embeddings are the kept epoch's too
    assert load_torch(paths.weights)["epoch"] == kept_epoch
    oof = load_npz(paths.oof)
    assert real_metrics(oof["embeddings"], oof["labels"])["map@r"] == pytest.approx(seen[kept_epoch]["map@r"], abs=1e-9)
    assert not list(paths.work.glob("best_*")) and not paths.last.exists()
