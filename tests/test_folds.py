import json

import numpy as np
import pandas as pd
import pytest

from arcfold.config import FoldsConfig, load_config
from arcfold.data.table import DataValidationError
from arcfold.folds import ensure_folds, load_folds, make_folds

from .conftest import tmp_path_overrides


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
