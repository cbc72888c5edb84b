"""Fold files verified: a hand-edited fold CSV (a row or a class moved, a fold number that does not exist, a test
split the JSON does not record, or any edit at all: the sha256) stops train and score with one line saying how to
remake it, and score refuses folds trained from different fold files."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from arcfold.__main__ import main as arcfold_main
from arcfold.config import load_config
from arcfold.data.folds import ensure_folds, file_sha256
from arcfold.errors import DataValidationError
from arcfold.experiments.score import score_experiment
from arcfold.training.paths import FoldPaths

from ..conftest import mini_overrides, write_mini_dataset
from ..experiments.test_leaderboard import SHA_A, SHA_B, simple_experiment

REMAKE = "Remake it with `python -m arcfold folds -c CONFIG --force`"


@pytest.fixture
def mini_folds(tmp_path):
    """(overrides, fold file) of the mini data set: 4 folds of one group (5 classes of 6 images) each."""
    write_mini_dataset(tmp_path / "input")
    overrides = [*mini_overrides(tmp_path), "train.epochs=1", "train.limit_train_batches=1", "data.check_images=none"]
    return overrides, ensure_folds(load_config(None, overrides))


def _edit(path, edit) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(df)
    df.to_csv(path, index=False)


def _move_row(df):  # row 0 (class g0c0, group g0, fold F) into another fold
    df.loc[0, "fold"] = "1" if df.loc[0, "fold"] != "1" else "2"


def _move_class(df):  # the 6 images of class g0c0 into another fold: group g0 is then in two folds
    df.loc[df["label"] == "g0c0", "fold"] = "1" if df.loc[0, "fold"] != "1" else "2"


def _fold_7(df):
    df.loc[df["label"] == "g0c0", "fold"] = "7"


def _test_without_test_split(df):  # a class put into the test split by hand: the JSON records none
    df.loc[df["label"] == "g0c0", "fold"] = "-1"


def _move_group(df):  # two whole folds swapped: every row consistent, only the hash can tell
    df["fold"] = df["fold"].map({"0": "1", "1": "0"}).fillna(df["fold"])


EDITS = {
    "row moved": (_move_row, r"group 'g0' is in folds \d, \d \(row 0 \(line 2\) in fold \d\); label 'g0c0' is in"),
    "class moved": (_move_class, r"group 'g0' is in folds \d, \d \(rows 0 \(line 2\), 1 \(line 3\), 2 \(line 4\) and"),
    "fold 7": (_fold_7, r"fold 7 \(rows 0 \(line 2\), 1 \(line 3\), 2 \(line 4\) and 3 more; folds are 0..3\)"),
    "test split": (_test_without_test_split, r"fold -1 \(a test split\) but the JSON records none \(rows 0 \(line 2\)"),
    "folds swapped": (_move_group, r"its sha256 [0-9a-f]{12} is not the [0-9a-f]{12} recorded in mini\.json"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_train_refuses_a_hand_edited_fold_file_in_one_line(mini_folds, case, caplog):
    overrides, path = mini_folds
    edit, message = EDITS[case]
    _edit(path, edit)
    with caplog.at_level(logging.ERROR, logger="arcfold"):
        assert arcfold_main(["train", "--fold", "0", *overrides]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]  # one line, no traceback
    assert errors[0].startswith(f"{path} is not the fold file the folds stage wrote")
    assert pd.Series(errors).str.contains(message).all(), errors[0]
    assert REMAKE in errors[0]
    assert not FoldPaths(load_config(None, overrides), 0).history.exists()  # nothing trained


def test_verify_fold_file_passes_the_file_the_folds_stage_wrote(mini_folds):
    from arcfold.data.folds import verify_fold_file

    _, path = mini_folds
    folds = verify_fold_file(path)
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3]
    path.with_suffix(".json").unlink()
    with pytest.raises(DataValidationError, match=r"mini\.csv: no mini\.json beside it .*--force"):
        verify_fold_file(path)


def test_score_refuses_folds_of_different_fold_files(tmp_path):
    oof = simple_experiment(tmp_path, "exp", [0, 1, 2], 3, noise=0.5, folds_sha256={0: SHA_A, 1: SHA_B, 2: SHA_A})
    with pytest.raises(DataValidationError, match=r"fold 0, 2 from aaaaaaaaaaaa; fold 1 from bbbbbbbbbbbb") as e:
        score_experiment(oof)
    assert "cannot be averaged" in str(e.value) and "train.force=true" in str(e.value)
    with pytest.raises(DataValidationError, match=r"fold 0, 2 from aaaaaaaaaaaa; fold 1 from bbbbbbbbbbbb"):
        score_experiment(oof, recompute=True)
    assert not (oof / "scores.csv").exists()


def test_score_verifies_the_fold_file_the_folds_were_trained_from(tmp_path, caplog):
    # the fold file sits where the experiment's fold JSONs say it is (write_experiment: folds/fake.csv)
    write_mini_dataset(tmp_path / "input")
    cfg = load_config(None, [*mini_overrides(tmp_path), f"folds.path={tmp_path / 'folds' / 'fake.csv'}"])
    path = ensure_folds(cfg)
    oof = simple_experiment(tmp_path, "exp", [0, 1], 2, noise=0.5, folds_sha256=file_sha256(path))
    assert len(score_experiment(oof)) == 4  # 2 folds + mean + std
    _edit(path, _move_row)
    with pytest.raises(DataValidationError, match=r"fake\.csv is not the fold file the folds stage wrote"):
        score_experiment(oof)
    with caplog.at_level(logging.ERROR, logger="arcfold"):
        assert arcfold_main(["score", "--experiment", "exp", "--oof-dir", str(oof.parent)]) == 2
    assert REMAKE in caplog.text
