"""Holdout stage: the test split's rows (fold -1 of the fold CSV) made into query/gallery/truth files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from arcfold.data.folds import file_sha256, write_folds
from arcfold.errors import DataValidationError
from arcfold.experiments.holdout import make_holdout
from arcfold.stages.holdout import main

EXP = "exp"


def _experiment_with_a_test_split(root: Path) -> pd.DataFrame:
    """A hand-made fold CSV (12 classes of 4 images: 4 classes in fold 0, 4 in fold 1, 4 in the test split) and the
    two fold JSONs and configs a finished experiment leaves in oof/<exp>/."""
    rows = []
    for c in range(12):
        fold = (0, 1, -1)[c % 3]
        rows += [{"id": f"c{c}_{i}", "image": f"img/c{c}_{i}.png", "label": f"c{c}", "group": f"c{c}", "fold": fold}
                 for i in range(4)]  # fmt: skip
    folds_df = pd.DataFrame(rows)
    folds_path = root / "folds" / "toy.csv"
    folds_path.parent.mkdir(parents=True)
    write_folds(folds_df, folds_path, {"n_splits": 2})  # the CSV and its JSON, as the folds stage writes them
    exp_dir = root / "oof" / EXP
    exp_dir.mkdir(parents=True)
    for k in (0, 1):
        record = {"experiment": EXP, "fold": k, "folds_path": str(folds_path), "folds_sha256": file_sha256(folds_path)}
        (exp_dir / f"fold{k}.json").write_text(json.dumps(record))
        config = {"data": {"input_dir": str(root / "input"), "dataset": "toy", "image_dir": ""}}
        (exp_dir / f"fold{k}.config.yaml").write_text(yaml.safe_dump(config))
    return folds_df


def test_test_split_holdout_holds_exactly_the_fold_minus_one_rows(tmp_path) -> None:
    folds_df = _experiment_with_a_test_split(tmp_path)
    out = tmp_path / "holdout"
    info = make_holdout(tmp_path / "oof", EXP, None, out, new_fraction=0.25, new_label="new", seed=0, split="test")
    query, gallery = pd.read_csv(out / "query.csv", dtype=str), pd.read_csv(out / "gallery.csv", dtype=str)
    truth = pd.read_csv(out / "truth.csv", dtype=str)
    test_rows = folds_df[folds_df["fold"] == -1]
    # every test row once, as a query or in the gallery; no row of a fold
    assert sorted([*query["id"], *gallery["id"]]) == sorted(test_rows["id"])
    assert truth["id"].tolist() == query["id"].tolist()
    # the split rules of --fold K: of 4 test classes, round(0.25 * 4) = 1 is new (its 4 images are queries with
    # truth "new"); each of the other 3 has 4 // 2 = 2 queries and 2 gallery images
    assert info["n_new_queries"] == 4 and (truth["label"] == "new").sum() == 4
    assert len(query) == 4 + 3 * 2 and len(gallery) == 3 * 2
    known = truth[truth["label"] != "new"]
    assert set(known["label"]) == set(gallery["label"]) and len(set(gallery["label"])) == 3
    label_of = dict(zip(test_rows["id"], test_rows["label"], strict=True))
    assert all(label_of[i] == lab for i, lab in zip(known["id"], known["label"], strict=True))
    assert all(label_of[i] == lab for i, lab in zip(gallery["id"], gallery["label"], strict=True))
    recorded = json.loads((out / "holdout.json").read_text())
    assert recorded["split"] == "test" and recorded["fold"] is None
    assert recorded["folds_sha256"] == file_sha256(tmp_path / "folds" / "toy.csv")
    assert recorded["image_root"] == str((tmp_path / "input" / "toy").resolve())


def test_test_split_holdout_cli_and_its_errors(tmp_path) -> None:
    folds_df = _experiment_with_a_test_split(tmp_path)
    oof = str(tmp_path / "oof")
    main(["make", "--experiment", EXP, "--split", "test", "--out", str(tmp_path / "h"), "--oof-dir", oof])
    assert json.loads((tmp_path / "h" / "holdout.json").read_text())["split"] == "test"
    with pytest.raises(SystemExit):  # --fold and --split test exclude each other
        main(["make", "--experiment", EXP, "--split", "test", "--fold", "0", "--out", str(tmp_path / "x")])

    folds_path = tmp_path / "folds" / "toy.csv"
    folds_df.assign(fold=folds_df["fold"].clip(lower=0)).to_csv(folds_path, index=False)
    with pytest.raises(DataValidationError, match=r"toy\.csv is not the fold file the folds stage wrote"):
        make_holdout(oof, EXP, None, tmp_path / "y", new_fraction=0.2, new_label="new", seed=0, split="test")
    write_folds(folds_df.assign(fold=folds_df["fold"].clip(lower=0)), folds_path, {"n_splits": 2})  # no test split
    for k in (0, 1):  # a fold file without a test split, which the experiment did train on
        record = json.loads((tmp_path / "oof" / EXP / f"fold{k}.json").read_text())
        record["folds_sha256"] = file_sha256(folds_path)
        (tmp_path / "oof" / EXP / f"fold{k}.json").write_text(json.dumps(record))
    with pytest.raises(DataValidationError, match=r"toy\.csv has no test split \(fold -1\)"):
        make_holdout(oof, EXP, None, tmp_path / "y", new_fraction=0.2, new_label="new", seed=0, split="test")
    with pytest.raises(FileNotFoundError, match="no finished fold"):
        make_holdout(oof, "other", None, tmp_path / "y", new_fraction=0.2, new_label="new", seed=0, split="test")
