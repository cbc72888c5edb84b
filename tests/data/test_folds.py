import json
import math

import numpy as np
import pandas as pd
import pytest

from arcfold.config import FoldsConfig, load_config
from arcfold.data.folds import ensure_folds, load_folds, make_folds
from arcfold.errors import ConfigError, DataValidationError

from ..conftest import tmp_path_overrides


def _frame(n_groups=12, classes_per_group=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        for c in range(classes_per_group):
            for i in range(int(rng.integers(1, 9))):  # class sizes 1..8: some singletons
                label = f"g{g}c{c}"
                rows.append({"id": f"{label}_{i}", "image": f"{label}_{i}.png", "label": label, "group": f"g{g}"})
    return pd.DataFrame(rows)


def test_no_group_in_two_folds_and_every_fold_used():
    df = _frame()
    folds = make_folds(df, FoldsConfig(n_splits=5, min_class_size=2, seed=1))
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert (folds.groupby("label")["fold"].nunique() == 1).all()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    # rare classes dropped, everything else kept exactly once
    sizes = df["label"].value_counts()
    assert set(folds["label"]) == set(sizes[sizes >= 2].index)
    assert len(folds) == int(sizes[sizes >= 2].sum())
    assert folds["id"].is_unique


def test_grouping_by_class_when_there_is_no_super_class():
    df = _frame(n_groups=3)
    df["group"] = df["label"]
    folds = make_folds(df, FoldsConfig(n_splits=4, min_class_size=3))
    assert (folds.groupby("label")["fold"].nunique() == 1).all()
    assert folds["label"].map(folds["label"].value_counts()).min() >= 3


def test_same_seed_same_folds_other_seed_other_folds():
    # StratifiedGroupKFold's shuffle only reorders groups with the same stratum distribution, so the
    # seed shows when there are many similar groups (grouping by class), hardly with a few super-classes
    df = _frame(n_groups=4, classes_per_group=20)
    df["group"] = df["label"]
    a = make_folds(df, FoldsConfig(seed=3))
    b = make_folds(df, FoldsConfig(seed=3))
    c = make_folds(df, FoldsConfig(seed=4))
    assert a.equals(b)
    assert not a["fold"].equals(c["fold"])


def test_too_few_groups_and_classes_spread_over_groups_are_errors():
    with pytest.raises(DataValidationError, match="only 3 distinct groups"):
        make_folds(_frame(n_groups=3), FoldsConfig(n_splits=5))
    df = _frame()
    df.loc[df.index[0], "group"] = "g11"  # one image of class g0c0 filed under another group
    with pytest.raises(DataValidationError, match="appear in more than one group"):
        make_folds(df, FoldsConfig(n_splits=5))


def test_ensure_folds_writes_reuses_and_refuses_other_parameters(tmp_path, glyphs_input):
    overrides = [*tmp_path_overrides(tmp_path), f"data.input_dir={glyphs_input}", "data.check_images=exists"]
    cfg = load_config(None, overrides)
    path = ensure_folds(cfg)
    folds = load_folds(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["params"]["n_splits"] == 5 and len(meta["folds"]) == 5
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    mtime = path.stat().st_mtime_ns
    assert ensure_folds(cfg) == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    with pytest.raises(DataValidationError, match="other fold parameters"):
        ensure_folds(load_config(None, [*overrides, "folds.n_splits=4"]))


# --------------------------------------------------------------------------------------------
# the MLRC test split: whole groups held out as fold -1


def test_test_fraction_holds_out_whole_groups_drawn_by_the_seed():
    df = _frame()  # 12 groups
    folds = make_folds(df, FoldsConfig(n_splits=4, test_fraction=0.25, seed=1))
    test_groups = set(folds.loc[folds["fold"] == -1, "group"])
    assert len(test_groups) == 3  # ceil(0.25 * 12) whole groups, as GroupShuffleSplit draws them
    assert not test_groups & set(folds.loc[folds["fold"] >= 0, "group"])
    assert sorted(folds["fold"].unique()) == [-1, 0, 1, 2, 3]
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    # the other 9 groups are split as before: the same folds as a fold file made from those rows alone
    rest = make_folds(df[~df["group"].isin(test_groups)], FoldsConfig(n_splits=4, seed=1))
    assert folds.loc[folds["fold"] >= 0, ["id", "fold"]].reset_index(drop=True).equals(rest[["id", "fold"]])
    again = make_folds(df, FoldsConfig(n_splits=4, test_fraction=0.25, seed=1))
    other = make_folds(df, FoldsConfig(n_splits=4, test_fraction=0.25, seed=2))
    assert again.equals(folds)
    assert set(other.loc[other["fold"] == -1, "group"]) != test_groups


def test_test_groups_by_name_and_their_errors():
    df = _frame(n_groups=6)
    folds = make_folds(df, FoldsConfig(n_splits=2, test_groups=["g1", "g4"]))
    assert set(folds.loc[folds["fold"] == -1, "group"]) == {"g1", "g4"}
    assert set(folds.loc[folds["fold"] >= 0, "group"]) == {"g0", "g2", "g3", "g5"}
    with pytest.raises(DataValidationError, match=r"test_groups: 'g9' not among .*known: 'g0', 'g1', 'g2'"):
        make_folds(df, FoldsConfig(n_splits=2, test_groups=["g1", "g9"]))
    with pytest.raises(DataValidationError, match=r"only 2 distinct groups .* \(4 more held out as the test split\)"):
        make_folds(df, FoldsConfig(n_splits=3, test_groups=["g0", "g1", "g2", "g3"]))
    with pytest.raises(DataValidationError, match=r"test_fraction=0.9 of the 6 groups .* leaves none to split"):
        make_folds(df, FoldsConfig(n_splits=2, test_fraction=0.9))
    with pytest.raises(ConfigError, match="test_fraction and folds.test_groups both set"):
        load_config(None, ["folds.test_fraction=0.2", "folds.test_groups=[g1]"])
    with pytest.raises(ConfigError, match=r"folds.test_fraction is a fraction of the groups in \[0, 1\)"):
        load_config(None, ["folds.test_fraction=1.0"])


def test_a_test_split_without_a_query_is_an_error():
    rows = [{"id": f"{g}{c}_{i}", "image": f"{g}{c}_{i}.png", "label": f"{g}{c}", "group": g} for g in "abc" for c in
            range(3) for i in range(3)]  # fmt: skip
    rows += [{"id": f"s{c}", "image": f"s{c}.png", "label": f"s{c}", "group": "s"} for c in range(4)]
    with pytest.raises(DataValidationError, match=r"the test split \(4 images, all in one-image classes\): no query"):
        make_folds(pd.DataFrame(rows), FoldsConfig(n_splits=2, min_class_size=1, test_groups=["s"]))


def test_fold_file_records_the_test_split_and_refuses_another_one(tmp_path, glyphs_input):
    overrides = [*tmp_path_overrides(tmp_path), f"data.input_dir={glyphs_input}", "data.check_images=exists"]
    cfg = load_config(None, [*overrides, "folds.n_splits=3", "folds.test_fraction=0.25"])
    path = ensure_folds(cfg)
    folds = load_folds(path)  # fold -1 is a fold number load_folds accepts
    meta = json.loads(path.with_suffix(".json").read_text())
    test = folds[folds["fold"] == -1]
    assert meta["params"]["test_fraction"] == 0.25 and meta["params"]["test_groups"] == []
    assert meta["test"] == {
        "groups": sorted(test["group"].unique()),
        "n_images": len(test),
        "n_classes": test["label"].nunique(),
    }
    assert len(meta["test"]["groups"]) == math.ceil(0.25 * folds["group"].nunique())
    assert [f["fold"] for f in meta["folds"]] == [0, 1, 2]  # the real folds only
    assert sum(f["n_images"] for f in meta["folds"]) + len(test) == len(folds)
    with pytest.raises(DataValidationError, match=r"other fold parameters \{'test_fraction': \(0.25, 0.0\)\}"):
        ensure_folds(load_config(None, [*overrides, "folds.n_splits=3"]))


def test_a_fold_file_of_before_the_test_split_is_still_reused(tmp_path, glyphs_input):
    # fold JSONs written before test_fraction/test_groups existed made no test split: same parameters
    cfg = load_config(
        None, [*tmp_path_overrides(tmp_path), f"data.input_dir={glyphs_input}", "data.check_images=exists"]
    )
    path = ensure_folds(cfg)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    for key in ("test_fraction", "test_groups"):
        del meta["params"][key]
    del meta["test"], meta["group_column"]
    meta_path.write_text(json.dumps(meta))
    assert ensure_folds(cfg) == path
    from arcfold.data.folds import verify_fold_file

    assert (verify_fold_file(path)["fold"] >= 0).all()
