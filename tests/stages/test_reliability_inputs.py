"""Bad input: each case an error that names the culprit (file, row, line, column), before anything trains.

Cases already covered elsewhere (listed in docs/reliability.md): missing/renamed columns, empty labels and
duplicate ids, missing/undecodable images (tests/data/test_table.py); unknown keys, wrong types, impossible
values (tests/test_config.py); experiments on different folds (tests/experiments/test_blend.py).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from arcfold.config import FoldsConfig, load_config
from arcfold.data.folds import ensure_folds, file_sha256, load_folds, make_folds
from arcfold.data.table import load_train_table
from arcfold.errors import DataValidationError
from arcfold.experiments.plots import make_plots
from arcfold.retrieval.metrics import knn
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import mini_overrides, write_mini_dataset
from ..experiments.test_leaderboard import clustered_embeddings, fold_rows, write_experiment


@pytest.fixture
def mini(tmp_path):
    """(root, overrides) of the mini data set, one epoch of two batches: the tests here are about input checks."""
    data = write_mini_dataset(tmp_path / "input")
    overrides = [*mini_overrides(tmp_path), "train.epochs=1", "train.limit_train_batches=2"]
    return tmp_path, data, overrides


def _edit_csv(path, edit) -> None:
    """Rewrite a CSV through ``edit(df)``, which changes ``df`` in place or returns a new frame."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    edited = edit(df)
    (df if edited is None else edited).to_csv(path, index=False)


def test_image_paths_outside_the_data_directory_are_errors(mini):
    root, data, overrides = mini
    outside = ["../../etc/passwd", "/etc/hosts", "images/../../secret.png", "..\\..\\boot.ini"]
    original = pd.read_csv(data / "train.csv")["image"]

    def edit(df):
        df.loc[[3, 7, 8, 9], "image"] = outside

    _edit_csv(data / "train.csv", edit)
    cfg = load_config(None, overrides)
    with pytest.raises(DataValidationError) as e:
        load_train_table(cfg.data, check_images="none")  # checked even when images are not
    message = str(e.value)
    assert "train.csv: 4 problem(s)" in message
    for row, path in zip([3, 7, 8, 9], outside, strict=True):
        assert f"row {row} (line {row + 2}), column 'image': path {path!r} points outside the data directory" in message

    def restore(df):  # a path that passes through .. but stays inside is fine
        df.loc[[7, 8, 9], "image"] = original[[7, 8, 9]].to_numpy()
        df.loc[3, "image"] = original[3].replace("images/", "images/../images/")

    _edit_csv(data / "train.csv", restore)
    assert load_train_table(cfg.data)["image"][3] == "images/../images/g0/c0_3.png"


def test_a_fold_of_singletons_is_an_error_when_folds_are_made():
    rows = [{"id": f"{g}{c}_{i}", "image": f"{g}{c}_{i}.png", "label": f"{g}{c}", "group": g} for g in "ab" for c in
            range(4) for i in range(3)]  # fmt: skip
    rows += [{"id": f"s{c}", "image": f"s{c}.png", "label": f"s{c}", "group": "s"} for c in range(5)]
    with pytest.raises(DataValidationError, match=r"fold \d \(5 images, all in one-image classes\): no query"):
        make_folds(pd.DataFrame(rows), FoldsConfig(n_splits=3, min_class_size=1))
    make_folds(pd.DataFrame(rows), FoldsConfig(n_splits=2, min_class_size=2))  # singletons dropped: fine


def test_a_fold_of_singletons_in_a_hand_made_fold_file_stops_training_before_it_starts(mini):
    root, data, overrides = mini
    cfg = load_config(None, overrides)
    folds_path = ensure_folds(cfg)
    # five one-image classes, added to the data and put in a fold of their own by hand
    extra = []
    for c in range(5):
        shutil.copy(data / "images" / "g0" / f"c{c}_0.png", data / "images" / f"single{c}.png")
        extra.append({"image": f"images/single{c}.png", "label": f"single{c}", "group": "singles"})
    pd.concat([pd.read_csv(data / "train.csv"), pd.DataFrame(extra)]).to_csv(data / "train.csv", index=False)
    folds_df = load_folds(folds_path)
    extra_df = pd.DataFrame([{"id": r["image"], **r, "fold": 4} for r in extra])
    pd.concat([folds_df, extra_df[folds_df.columns]]).to_csv(folds_path, index=False)
    # ... with its JSON edited to match (5 folds, the new hash): else the edit itself is refused (test_folds_verify)
    meta = json.loads(folds_path.with_suffix(".json").read_text())
    meta["params"]["n_splits"], meta["sha256"] = 5, file_sha256(folds_path)
    folds_path.with_suffix(".json").write_text(json.dumps(meta))
    cfg = load_config(None, [*overrides, "folds.n_splits=5"])
    with pytest.raises(DataValidationError, match=r"mini\.csv: fold 4 has no query: its 5 images are all in one-image"):
        train_fold(cfg, 4)
    assert not FoldPaths(cfg, 4).history.exists()  # nothing trained


def test_a_fold_file_that_does_not_match_the_data_names_the_rows(mini):
    root, data, overrides = mini
    cfg = load_config(None, overrides)
    ensure_folds(cfg)

    def edit(df):  # relabel one image, drop another: the data changed after the folds were made
        df.loc[5, "label"] = "g0c4"
        return df.drop(index=10)

    _edit_csv(data / "train.csv", edit)
    with pytest.raises(DataValidationError) as e:
        train_fold(cfg, 0)
    message = str(e.value)
    assert "folds/mini.csv does not match the data it splits" in message and "2 difference(s)" in message
    assert "column 'label': 'g0c0' here, 'g0c4' in" in message and "(id 'images/g0/c0_5.png')" in message
    assert "id 'images/g0/c1_4.png' is not in" in message
    assert "--force" in message


def test_k_larger_than_the_gallery_is_an_error(tmp_path):
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"k=5 but only 4 gallery items are available"):
        knn(x, x, 5)
    with pytest.raises(ValueError, match=r"k=4 but only 3 gallery items are available per query"):
        knn(x, x, 4, exclude_self=True)
    rows = {0: fold_rows(0, n_classes=3, per_class=2)}
    emb = {0: clustered_embeddings(rows[0]["labels"], 8, 0.5, np.random.default_rng(0))}
    write_experiment(tmp_path, "exp", emb, rows, n_splits=2)
    with pytest.raises(ValueError, match=r"--top-k=10: fold 0 of 'exp' has 6 images.*use 1 <= k <= 5"):
        make_plots("exp", tmp_path / "oof", 0, k=10)


def _corrupt(data, rows: list[int]) -> list[str]:
    train = pd.read_csv(data / "train.csv")
    for row in rows:
        path = data / train["image"][row]
        path.write_bytes(path.read_bytes()[:60])  # a truncated PNG: the header survives, the pixels do not
    return [train["image"][row] for row in rows]


def test_corrupt_images_are_an_error_by_default_naming_row_and_the_option(mini):
    root, data, overrides = mini
    _corrupt(data, [2, 40])
    with pytest.raises(DataValidationError) as e:
        train_fold(load_config(None, overrides), 0)
    message = str(e.value)
    assert "train.csv: 2 problem(s)" in message
    assert "row 2 (line 4), column 'image': cannot decode image" in message and "row 40 (line 42)" in message
    assert "data.skip_bad_images=true" in message


def test_images_corrupted_after_the_folds_were_made_stop_training_naming_the_file(mini):
    root, data, overrides = mini
    cfg = load_config(None, overrides)
    ensure_folds(cfg)
    (name,) = _corrupt(data, [40])
    with pytest.raises(OSError, match=rf"cannot read image .*{name}.*data.skip_bad_images=true"):
        train_fold(cfg, 0)


def test_skip_bad_images_leaves_them_out_and_counts_them(mini, caplog):
    root, data, overrides = mini
    folds = load_folds(ensure_folds(load_config(None, overrides)))  # the folds, made from the good images
    val_rows = np.flatnonzero(folds["fold"] == 0)[:1].tolist()
    train_rows = np.flatnonzero(folds["fold"] != 0)[:2].tolist()
    images = folds["image"].to_numpy()
    for rel in images[val_rows + train_rows]:
        (data / rel).write_bytes((data / rel).read_bytes()[:60])
    cfg = load_config(None, [*overrides, "data.skip_bad_images=true"])
    scores = train_fold(cfg, 0)
    assert scores["skipped_images"] == {"train": 2, "validation": 1}
    assert json.loads(FoldPaths(cfg, 0).scores.read_text())["skipped_images"] == {"train": 2, "validation": 1}
    assert "3 of 120 images cannot be decoded and are skipped (data.skip_bad_images=true)" in caplog.text
    oof_images = np.load(FoldPaths(cfg, 0).oof)["images"].tolist()
    assert len(oof_images) == (folds["fold"] == 0).sum() - 1 and images[val_rows[0]] not in oof_images


def test_skip_bad_images_never_skips_missing_files(mini):
    root, data, overrides = mini
    (data / "images" / "g1" / "c0_0.png").unlink()
    with pytest.raises(DataValidationError, match=r"column 'image': file not found"):
        load_train_table(load_config(None, [*overrides, "data.skip_bad_images=true"]).data)
