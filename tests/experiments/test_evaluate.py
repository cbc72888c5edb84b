"""Test stage (``python -m arcfold test``): the held-out test split embedded by every fold model and scored
separately, concatenated (the ensemble inference submits) and averaged (the old inference, for comparison)."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import ortho_group

from arcfold.__main__ import main as arcfold_main
from arcfold.config import load_config
from arcfold.data.folds import ensure_folds, file_sha256
from arcfold.errors import DataValidationError
from arcfold.io import load_npz
from arcfold.retrieval.ensemble import blend_embeddings
from arcfold.retrieval.metrics import DEFAULT_KS, retrieval_metrics

from ..conftest import mini_overrides, write_mini_dataset
from .test_leaderboard import SHA_A, SHA_B, clustered_embeddings, simple_experiment

METRICS = [f"recall@{k}" for k in DEFAULT_KS] + ["map@r"]


def _scores(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    computed = retrieval_metrics(embeddings, labels, ks=DEFAULT_KS)
    return {m: computed[m] for m in METRICS}


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_model_and_its_rotated_copy_concatenate_to_the_model_but_do_not_average_to_it():
    from arcfold.experiments.evaluate import score_test_embeddings

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), 5)  # (200,)
    emb = clustered_embeddings(labels, 16, 0.8, rng)  # (200, 16), unit rows
    rotation = ortho_group.rvs(16, random_state=1)  # another fold's basis: same cosines, other coordinates
    scores = score_test_embeddings({0: emb, 1: (emb @ rotation).astype(np.float32)}, labels)
    alone = _scores(emb, labels)
    assert scores["separate"]["per_fold"]["0"] == alone
    assert scores["separate"]["per_fold"]["1"] == pytest.approx(alone, abs=1e-12)
    assert scores["concatenated"] == pytest.approx(alone, abs=1e-12)  # mean of equal cosines: the model itself
    averaged = _scores(_l2(emb + emb @ rotation), labels)
    assert scores["mean_of_folds"] == pytest.approx(averaged, abs=1e-12)
    assert scores["mean_of_folds"]["map@r"] < alone["map@r"] - 0.05  # unaligned bases averaged: a worse model
    assert scores["mean_of_folds"]["recall@1"] < alone["recall@1"]


@pytest.mark.slow
def test_test_stage_end_to_end_through_the_cli(tmp_path, caplog):
    write_mini_dataset(tmp_path / "input")  # 4 groups of 5 classes of 6 images
    config = tmp_path / "mini.yaml"
    config.write_text("folds:\n  n_splits: 2\n  test_fraction: 0.25\n")  # 1 group held out, 3 split into 2 folds
    overrides = [*mini_overrides(tmp_path), "train.epochs=1", "train.limit_train_batches=1"]
    overrides = [o for o in overrides if not o.startswith("folds.n_splits")]
    cfg = load_config(config, overrides)
    with caplog.at_level(logging.INFO, logger="arcfold"):
        assert arcfold_main(["train", "--fold", "0..1", "-c", str(config), *overrides]) == 0
    folds = pd.read_csv(cfg.folds_path, dtype=str, keep_default_na=False)
    test_rows = folds[folds["fold"] == "-1"]
    assert test_rows["group"].nunique() == 1 and len(test_rows) == 30
    # fold 0 trained on fold 1's rows only: never on the test split
    trained = [int(n) for n in re.findall(r"fold 0: train (\d+) images", caplog.text)]
    assert trained == [int((folds["fold"] == "1").sum())]

    assert arcfold_main(["test", "-c", str(config), *overrides]) == 0
    result = json.loads((cfg.oof_dir / "test.json").read_text())
    arrays = load_npz(cfg.oof_dir / "test.npz")
    assert arrays["ids"].tolist() == test_rows["id"].tolist()  # fold -1 of the fold file, in its order
    assert arrays["labels"].tolist() == test_rows["label"].tolist()
    labels = arrays["labels"]
    for k in (0, 1):
        oof = load_npz(cfg.oof_dir / f"fold{k}.npz")
        assert not set(oof["ids"]) & set(arrays["ids"])  # OOF files never hold test rows
        assert result["separate"]["per_fold"][str(k)] == pytest.approx(_scores(arrays[f"fold{k}"], labels), abs=1e-12)
    per_fold = [arrays["fold0"], arrays["fold1"]]
    assert result["concatenated"] == pytest.approx(_scores(blend_embeddings(per_fold, [1, 1]), labels), abs=1e-12)
    assert result["mean_of_folds"] == pytest.approx(_scores(_l2(np.mean(per_fold, axis=0)), labels), abs=1e-6)
    assert result["separate"]["mean"]["recall@1"] == pytest.approx(
        np.mean([result["separate"]["per_fold"][k]["recall@1"] for k in ("0", "1")])
    )
    assert (result["folds"], result["n_images"], result["n_classes"], result["n_queries"]) == ([0, 1], 30, 5, 30)
    assert result["folds_sha256"] == file_sha256(cfg.folds_path) and result["test_groups"] == [
        test_rows["group"].iat[0]
    ]

    # the test rows go through OOF validation's preprocessing: fold 0's own rows give its OOF embeddings back
    from arcfold.experiments.evaluate import embed_test_rows

    val_rows = folds[folds["fold"] == "0"].reset_index(drop=True)
    again = embed_test_rows(cfg.models_dir, [0], val_rows, torch.device("cpu"), progress=False)[0]
    np.testing.assert_allclose(again, load_npz(cfg.oof_dir / "fold0.npz")["embeddings"], atol=1e-6)

    # a finished test is kept unless --force
    caplog.clear()
    assert arcfold_main(["test", "-c", str(config), *overrides]) == 2
    assert "test.json and " in caplog.text and "--force" in caplog.text

    # the leaderboard shows it and sorts by it
    oof_root = str(cfg.oof_dir.parent)
    assert arcfold_main(["leaderboard", "--oof-dir", oof_root, "--sort", "test_recall@1"]) == 0
    board = pd.read_csv(cfg.oof_dir.parent / "leaderboard.csv")
    assert board.loc[0, "test_recall@1"] == pytest.approx(result["concatenated"]["recall@1"], abs=1e-6)
    assert board.loc[0, "test_map@r"] == pytest.approx(result["concatenated"]["map@r"], abs=1e-6)

    # a blend: each member's folds concatenated, then the members weighted (a copy of the experiment as member 2)
    for kind in ("oof", "models"):
        shutil.copytree(tmp_path / kind / "mini", tmp_path / kind / "mini2")
    (tmp_path / "oof" / "mini2" / "test.json").unlink()
    blend = ["blend", "-e", "mini", "mini2", "-w", "0.7", "0.3", "-n", "pair", "--oof-dir", oof_root]
    assert arcfold_main(blend) == 0
    spec = cfg.oof_dir.parent / "blends" / "pair.json"
    assert (
        arcfold_main(["test", "--blend", str(spec), "--oof-dir", oof_root, "--models-dir", str(cfg.models_dir.parent)])
        == 0
    )
    blended = json.loads(spec.with_suffix(".test.json").read_text())
    member = blend_embeddings(per_fold, [1, 1])
    expected = _scores(blend_embeddings([member, member], [0.7, 0.3]), labels)
    assert blended["concatenated"] == pytest.approx(expected, abs=1e-6)
    assert blended["members"]["mini"]["concatenated"] == pytest.approx(result["concatenated"], abs=1e-6)


@pytest.fixture
def fold_file(tmp_path):
    """The mini data set's fold file where write_experiment's fold JSONs say it is (folds/fake.csv); no test split."""
    write_mini_dataset(tmp_path / "input")
    cfg = load_config(None, [*mini_overrides(tmp_path), f"folds.path={tmp_path / 'folds' / 'fake.csv'}"])
    return ensure_folds(cfg)


def test_test_stage_errors_name_the_cause(tmp_path, fold_file):
    from arcfold.data.folds import load_test_rows
    from arcfold.experiments.evaluate import evaluate_experiment

    oof = simple_experiment(tmp_path, "exp", [0, 1], 2, noise=0.5, folds_sha256=file_sha256(fold_file))
    with pytest.raises(
        DataValidationError, match=r"fake\.csv has no test split \(fold -1\)\. Set folds\.test_fraction"
    ):
        load_test_rows(oof, [0, 1])
    old = simple_experiment(tmp_path, "old", [0, 1], 2, noise=0.5, folds_sha256=SHA_A)
    with pytest.raises(DataValidationError, match=r"trained from another fold file than .*fake\.csv is now"):
        load_test_rows(old, [0, 1])
    mixed = simple_experiment(tmp_path, "mixed", [0, 1], 2, noise=0.5, folds_sha256={0: SHA_A, 1: SHA_B})
    with pytest.raises(DataValidationError, match=r"different fold files \(fold 0: aaaaaaaaaaaa, fold 1: bbbbbbbb"):
        load_test_rows(mixed, [0, 1])
    with pytest.raises(FileNotFoundError, match=r"experiment 'nothing' has no finished fold"):
        evaluate_experiment("nothing", tmp_path / "oof", tmp_path / "models")
