"""Folds stage: ``folds/<dataset>.csv`` = the validated training rows plus a ``fold`` column.

scikit-learn's StratifiedGroupKFold assigns whole groups to folds, so no group (the super-class by
default, else the class) appears in two folds and a fold's classes are never seen in training:
the retrieval protocol of SOP/CUB/Cars, and what stops near-duplicate images of one object from
leaking between train and validation.

Stratification: every class lives inside one group, so the class label itself cannot be balanced
across folds. By default the strata are class-size bins (quantiles of images per class), which gives
every fold a similar mix of big and small classes. Any column can be named instead.

``folds.seed`` feeds StratifiedGroupKFold's shuffle, which only reorders groups whose stratum
distributions tie: with many similar groups (grouping by class) another seed gives other folds, with
a handful of distinct super-classes the assignment is mostly fixed by the balancing itself.

A JSON sidecar (``folds/<dataset>.json``) records the parameters, per-fold counts and a hash of the
CSV; experiments store that hash, so OOF scores made on different folds are never compared.

Test split (the "seed protocol" of Musgrave et al., "A Metric Learning Reality Check", ECCV 2020):
``folds.test_fraction`` holds out that fraction of the groups (drawn with ``folds.seed`` by scikit-learn's
GroupShuffleSplit; ``ceil(fraction * n_groups)`` groups), or ``folds.test_groups`` names the group values to hold
out. Their rows get ``fold = -1``: no fold ever trains or validates on them, OOF files never contain them, and
only the test stage (``python -m arcfold test``, :mod:`arcfold.evaluate`) reads them. The other groups are split
into ``folds.n_splits`` folds as above. The JSON records ``"test": {"groups", "n_images", "n_classes"}`` (null
without a test split); the test split must hold a query too.

Verified fold files (:func:`verify_fold_file`, called by the train, score and test stages): the CSV must be the
one the folds stage wrote (its sha256 is recorded in the JSON), every fold number must be one of
``0..n_splits-1`` (and -1 only when the JSON records a test split), and no group and no class may be in two folds
(the test split counts as one). A hand-edited file is refused with the way to remake it.

Checks: every fold must hold at least one query (a class with two images in it), else validation
could not score it; a reused fold file must match the data it claims to split (same ids with the same
image, label and group, and every kept row of ``train.csv`` present), else the error lists the rows
that differ. The fold file is written once under a lock (``folds/.<dataset>.csv.lock``), so several
``train_fold.sh`` started together make it once and all use that one.

CLI::

    python -m arcfold folds --config configs/glyphs_arcface.yaml [key=value ...] [--force]
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from arcfold.config import ExperimentConfig, FoldsConfig
from arcfold.data.table import FOLD, GROUP, ID, IMAGE, LABEL, load_train_table, read_csv
from arcfold.errors import DataValidationError
from arcfold.io import atomic_path, file_lock, load_json, save_json

log = logging.getLogger(__name__)

__all__ = [
    "TEST_FOLD",
    "check_folds_match_data",
    "ensure_folds",
    "file_sha256",
    "load_folds",
    "load_test_rows",
    "make_folds",
    "verify_fold_file",
    "write_folds",
]

SIZE_STRATA = "class_size_bin"
TEST_FOLD = -1  # the fold number of the held-out test split's rows
REMAKE = "Remake it with `python -m arcfold folds -c CONFIG --force`"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _column(df: pd.DataFrame, name: str | None, data_cfg_columns: dict[str, str], default: str) -> str:
    """Map a user column name (or None) to the column of the standard frame that holds it."""
    if not name:
        return default
    if name in data_cfg_columns:
        return data_cfg_columns[name]
    if name in df:
        return name
    raise DataValidationError(f"folds: column '{name}' not found; available: {', '.join(df.columns)}")


def make_folds(
    df: pd.DataFrame,
    cfg: FoldsConfig,
    group_col: str = GROUP,
    stratify_col: str | None = None,
) -> pd.DataFrame:
    """Filter rare classes, then assign a ``fold`` to every row (whole groups per fold).

    ``df`` is a standard frame (``label``/``group`` columns); returns a copy with ``fold`` added.
    """
    counts = df[LABEL].map(df[LABEL].value_counts())
    keep = counts >= cfg.min_class_size
    n_dropped_classes = df.loc[~keep, LABEL].nunique()
    if n_dropped_classes:
        log.info(
            "folds: dropping %d classes (%d images) with fewer than %d images",
            n_dropped_classes,
            int((~keep).sum()),
            cfg.min_class_size,
        )
    df = df.loc[keep].reset_index(drop=True)
    if df.empty:
        raise DataValidationError(f"folds: no class has at least folds.min_class_size={cfg.min_class_size} images")

    # a class spread over several groups would put the same object in two folds
    groups_per_class = df.groupby(LABEL)[group_col].nunique()
    spread = groups_per_class[groups_per_class > 1]
    if len(spread):
        examples = ", ".join(map(repr, spread.index[:5].tolist()))
        raise DataValidationError(
            f"folds: {len(spread)} classes appear in more than one group of column '{group_col}' "
            f"(e.g. {examples}); grouping by it would leak those classes across folds. "
            "Fix the group column or set folds.group_column to the label column."
        )

    fold = np.full(len(df), TEST_FOLD, dtype=np.int64)
    in_test = _test_rows(df, cfg, group_col)
    dev = df.loc[~in_test].reset_index(drop=True)  # the rows the folds split: everything but the test split
    n_groups = dev[group_col].nunique()
    if n_groups < cfg.n_splits:
        held_out = f" ({df[group_col].nunique() - n_groups} more held out as the test split)" if in_test.any() else ""
        raise DataValidationError(
            f"folds: only {n_groups} distinct groups in column '{group_col}'{held_out}, "
            f"fewer than folds.n_splits={cfg.n_splits}"
        )

    if stratify_col is None:
        sizes = dev[LABEL].map(dev[LABEL].value_counts())
        n_bins = int(min(5, sizes.nunique()))
        y = pd.qcut(sizes.rank(method="first"), q=n_bins, labels=False) if n_bins > 1 else np.zeros(len(dev), int)
    else:
        y = pd.factorize(dev[stratify_col])[0]
    splitter = StratifiedGroupKFold(n_splits=cfg.n_splits, shuffle=True, random_state=cfg.seed)
    dev_fold = np.full(len(dev), -1, dtype=np.int64)
    groups = pd.factorize(dev[group_col])[0]
    with warnings.catch_warnings():
        # "The least populated class in y has only N members": expected when strata are small
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(dev)), np.asarray(y), groups)):
            dev_fold[val_idx] = k
    assert (dev_fold >= 0).all()
    fold[~in_test] = dev_fold
    out = df.copy()
    out.insert(4, FOLD, fold)
    check_every_fold_has_queries(out)
    return out


def _test_rows(df: pd.DataFrame, cfg: FoldsConfig, group_col: str) -> np.ndarray:
    """Boolean mask of the rows held out as the test split: ``cfg.test_groups``, or ``cfg.test_fraction`` of the
    groups drawn with ``cfg.seed`` (GroupShuffleSplit: ``ceil(fraction * n_groups)`` whole groups)."""
    groups = df[group_col].astype(str)
    if cfg.test_groups:
        known = set(groups)
        unknown = [g for g in cfg.test_groups if str(g) not in known]
        if unknown:
            listed = ", ".join(map(repr, sorted(known)[:50])) + (" ..." if len(known) > 50 else "")
            raise DataValidationError(
                f"folds.test_groups: {', '.join(map(repr, unknown))} not among the values of column '{group_col}' "
                f"(after dropping classes under folds.min_class_size); known: {listed}"
            )
        return groups.isin([str(g) for g in cfg.test_groups]).to_numpy()
    if cfg.test_fraction > 0:
        splitter = GroupShuffleSplit(n_splits=1, test_size=cfg.test_fraction, random_state=cfg.seed)
        try:
            _, test_idx = next(splitter.split(np.zeros(len(df)), groups=pd.factorize(groups)[0]))
        except ValueError as e:  # e.g. every group drawn: "the resulting train set will be empty"
            raise DataValidationError(
                f"folds.test_fraction={cfg.test_fraction} of the {groups.nunique()} groups of column "
                f"'{group_col}' leaves none to split into folds ({e})"
            ) from None
        mask = np.zeros(len(df), dtype=bool)
        mask[test_idx] = True
        return mask
    return np.zeros(len(df), dtype=bool)


def check_every_fold_has_queries(folds_df: pd.DataFrame, source: str | Path = "folds") -> None:
    """Every fold (and the test split, fold -1) needs a class with 2+ images in it: singletons are never queries."""
    class_size = folds_df.groupby([FOLD, LABEL])[LABEL].transform("size")
    queries = (class_size >= 2).groupby(folds_df[FOLD]).sum()
    empty = [int(k) for k, n in queries.items() if n == 0]
    if empty:
        detail = ", ".join(
            f"{'the test split' if k == TEST_FOLD else f'fold {k}'} "
            f"({int((folds_df[FOLD] == k).sum())} images, all in one-image classes)"
            for k in empty
        )
        raise DataValidationError(
            f"{source}: {detail}: no query to validate on. Raise folds.min_class_size to 2 or more, "
            "or give those classes more images"
        )


def fold_summary(folds_df: pd.DataFrame) -> list[dict]:
    rows = []
    for k, part in folds_df[folds_df[FOLD] != TEST_FOLD].groupby(FOLD):
        rows.append(
            {
                "fold": int(k),
                "n_images": len(part),
                "n_classes": int(part[LABEL].nunique()),
                "n_groups": int(part[GROUP].nunique()),
            }
        )
    return rows


def test_summary(folds_df: pd.DataFrame, group_col: str = GROUP) -> dict | None:
    """``{"groups", "n_images", "n_classes"}`` of the test split (fold -1), or None when there is none."""
    test = folds_df[folds_df[FOLD] == TEST_FOLD]
    if test.empty:
        return None
    return {
        "groups": sorted(test[group_col].astype(str).unique().tolist()),
        "n_images": len(test),
        "n_classes": int(test[LABEL].nunique()),
    }


def write_folds(folds_df: pd.DataFrame, path: Path, params: dict, group_col: str = GROUP) -> dict:
    """Write the fold CSV, then its JSON: parameters, the CSV's sha256, per-fold counts, the test split and the
    column that groups (what :func:`verify_fold_file` checks)."""
    with atomic_path(path) as tmp:
        folds_df.to_csv(tmp, index=False)
    meta = {
        "params": params,
        "sha256": file_sha256(path),
        "group_column": group_col,  # the fold CSV's column no two folds share
        "folds": fold_summary(folds_df),
        "test": test_summary(folds_df, group_col),
    }
    save_json(path.with_suffix(".json"), meta)
    return meta


def _params(cfg: ExperimentConfig) -> dict:
    return {
        "dataset": cfg.data.dataset,
        "csv": cfg.data.csv,
        "n_splits": cfg.folds.n_splits,
        "group_column": cfg.folds.group_column or cfg.data.group_column or cfg.data.label_column,
        "stratify_column": cfg.folds.stratify_column or SIZE_STRATA,
        "min_class_size": cfg.folds.min_class_size,
        "seed": cfg.folds.seed,
        "test_fraction": cfg.folds.test_fraction,
        "test_groups": [str(g) for g in cfg.folds.test_groups],
    }


# parameters added after fold files were first written: an older JSON without them made no test split
_PARAM_DEFAULTS = {"test_fraction": 0.0, "test_groups": []}


def build_folds(cfg: ExperimentConfig) -> tuple[pd.DataFrame, str]:
    """The fold frame and the name of its column that groups."""
    df = load_train_table(cfg.data)
    columns = {cfg.data.label_column: LABEL}
    if cfg.data.group_column:
        columns[cfg.data.group_column] = GROUP
    group_col = _column(df, cfg.folds.group_column, columns, GROUP)
    stratify_col = _column(df, cfg.folds.stratify_column, columns, "") or None
    return make_folds(df, cfg.folds, group_col=group_col, stratify_col=stratify_col), group_col


def ensure_folds(cfg: ExperimentConfig, force: bool = False) -> Path:
    """Write the fold CSV if absent (or ``force``); reuse it if made with the same parameters and the same data.

    Runs under a lock, so processes started together write the file once and then all reuse it.
    """
    path = cfg.folds_path
    with file_lock(path.parent / f".{path.name}.lock", what=f"fold file {path}"):
        return _ensure_folds(cfg, path, force)


def _ensure_folds(cfg: ExperimentConfig, path: Path, force: bool) -> Path:
    params = _params(cfg)
    meta_path = path.with_suffix(".json")
    if path.exists() and not force:
        if meta_path.exists():
            stored = {**_PARAM_DEFAULTS, **load_json(meta_path, hint="Remake the folds with --force.")["params"]}
            if stored != params:
                diff = {k: (stored.get(k), v) for k, v in params.items() if stored.get(k) != v}
                raise DataValidationError(
                    f"{path} was made with other fold parameters {diff} (stored, asked). "
                    "Use another folds.path for these folds, or --force to remake them "
                    "(experiments trained on the old folds can then no longer be compared)."
                )
        data_df = load_train_table(cfg.data, check_images="none")
        folds_df = verify_fold_file(path) if meta_path.exists() else load_folds(path)
        check_folds_match_data(folds_df, data_df, cfg.folds.min_class_size, path, cfg.data_dir / cfg.data.csv)
        log.info("folds: reusing %s", path)
        return path
    folds_df, group_col = build_folds(cfg)
    meta = write_folds(folds_df, path, params, group_col)
    for row in meta["folds"]:
        log.info("fold %(fold)d: %(n_images)d images, %(n_classes)d classes, %(n_groups)d groups", row)
    if meta["test"]:
        log.info(
            "test split (fold -1): %d images, %d classes, groups %s",
            meta["test"]["n_images"],
            meta["test"]["n_classes"],
            ", ".join(meta["test"]["groups"]),
        )
    log.info("folds: wrote %s", path)
    return path


def check_folds_match_data(
    folds_df: pd.DataFrame,
    data_df: pd.DataFrame,
    min_class_size: int,
    folds_path: str | Path,
    data_path: str | Path,
) -> None:
    """Refuse a fold file made from other data: each of its rows must be a row of the data (same id, image,
    label, group), and every data row of a class with ``min_class_size`` images must be in it.

    ``folds_df`` as :func:`load_folds` returns it, ``data_df`` the standard frame of ``load_train_table``.
    """
    problems = []
    data = data_df.set_index(ID)[[IMAGE, LABEL, GROUP]]
    known = folds_df[ID].isin(data.index).to_numpy()
    for i in np.flatnonzero(~known):
        problems.append(f"row {i} (line {i + 2}): id {folds_df[ID].iat[i]!r} is not in {data_path}")
    ours = folds_df.loc[known]
    theirs = data.loc[ours[ID]]
    for column in (IMAGE, LABEL, GROUP):
        differ = np.flatnonzero(ours[column].to_numpy() != theirs[column].to_numpy())
        for j in differ:
            i = int(np.flatnonzero(known)[j])
            problems.append(
                f"row {i} (line {i + 2}), column '{column}': {ours[column].iat[j]!r} here, "
                f"{theirs[column].iat[j]!r} in {data_path} (id {ours[ID].iat[j]!r})"
            )
    sizes = data_df[LABEL].map(data_df[LABEL].value_counts())
    absent = data_df.loc[(sizes >= min_class_size) & ~data_df[ID].isin(folds_df[ID]), ID]
    if len(absent):
        examples = ", ".join(map(repr, absent.iloc[:3].tolist()))
        problems.append(f"{len(absent)} row(s) of {data_path} are missing from it (ids {examples}...)")
    if problems:
        listed = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise DataValidationError(
            f"{folds_path} does not match the data it splits ({data_path}): {len(problems)} difference(s):\n  "
            + "\n  ".join(listed)
            + "\nThe fold file was made from other data. Remake it with `python -m arcfold folds -c CONFIG --force` "
            "(experiments trained on the old folds can then no longer be compared), or set folds.path to the "
            "fold file of this data."
        )


def load_folds(path: str | Path) -> pd.DataFrame:
    """Read a fold file; missing columns and fold values that are not integers are errors naming the row."""
    df = read_csv(Path(path))
    missing = [c for c in (ID, IMAGE, LABEL, GROUP, FOLD) if c not in df]
    if missing:
        raise DataValidationError(f"{path}: not a fold file, missing columns {missing}; remake it with the folds stage")
    if df.empty:
        raise DataValidationError(f"{path}: no data rows; remake it with the folds stage")
    fold = pd.to_numeric(df[FOLD].str.strip(), errors="coerce")
    bad = np.flatnonzero((fold.isna() | (fold < TEST_FOLD) | (fold != fold.round())).to_numpy())
    if len(bad):
        shown = "; ".join(f"row {i} (line {i + 2}): {df[FOLD].iat[i]!r}" for i in bad[:5])
        raise DataValidationError(
            f"{path}: column '{FOLD}' must hold fold numbers 0, 1, ... (or -1, the test split); {len(bad)} row(s) "
            f"do not: {shown}. Remake the file with the folds stage (--force)."
        )
    df[FOLD] = fold.astype(int)
    return df


def _rows(positions: np.ndarray) -> str:
    """``rows 3 (line 5), 4 (line 6), 9 (line 11) and 2 more``"""
    shown = ", ".join(f"{i} (line {i + 2})" for i in positions[:3])
    more = f" and {len(positions) - 3} more" if len(positions) > 3 else ""
    return f"row{'s' if len(positions) > 1 else ''} {shown}{more}"


def verify_fold_file(path: str | Path) -> pd.DataFrame:
    """Check a fold CSV against the JSON the folds stage wrote beside it; return it (as :func:`load_folds` does).

    Refused, in one line that says what is wrong and how to remake the file: a missing JSON; fold numbers
    outside ``0..n_splits-1`` (-1 allowed only when the JSON records a test split); a group (the JSON's
    ``group_column``) or a class in two folds (the test split counts as one); a CSV whose sha256 is not the
    one the folds stage recorded (edited since). Raises :class:`DataValidationError`.
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise DataValidationError(f"{path}: no {meta_path.name} beside it (the folds stage writes one). {REMAKE}")
    meta = load_json(meta_path, hint=f"{REMAKE}.")
    folds_df = load_folds(path)
    n_splits = int(meta["params"]["n_splits"])
    has_test = bool(meta.get("test"))
    problems = []
    fold = folds_df[FOLD].to_numpy()
    allowed = (fold >= 0) & (fold < n_splits) | (has_test & (fold == TEST_FOLD))
    for value in sorted(set(fold[~allowed].tolist())):
        rows = np.flatnonzero(fold == value)
        what = "-1 (a test split) but the JSON records none" if value == TEST_FOLD else f"{value}"
        problems.append(f"fold {what} ({_rows(rows)}; folds are 0..{n_splits - 1})")
    # a class never spans folds either; JSONs older than the "group_column" key: the class only
    for column in dict.fromkeys([meta.get("group_column", LABEL), LABEL]):
        if column not in folds_df:
            problems.append(f"column '{column}' (the one the folds were grouped by) is missing")
            continue
        n_folds = folds_df.groupby(column)[FOLD].nunique()
        for value in n_folds.index[n_folds > 1][:3]:
            in_folds = folds_df.loc[folds_df[column] == value, FOLD]
            minority = in_folds.value_counts().index[-1]  # the fold fewest of its rows are in: likely the edit
            rows = np.flatnonzero((folds_df[column] == value).to_numpy() & (fold == minority))
            listed = ", ".join(map(str, sorted(in_folds.unique())))
            problems.append(f"{column} {value!r} is in folds {listed} ({_rows(rows)} in fold {minority})")
        if (n_folds > 1).sum() > 3:
            problems.append(f"{int((n_folds > 1).sum()) - 3} more {column} value(s) in several folds")
    sha = file_sha256(path)
    if sha != meta.get("sha256"):
        problems.append(f"its sha256 {sha[:12]} is not the {str(meta.get('sha256'))[:12]} recorded in {meta_path.name}")
    if problems:
        raise DataValidationError(
            f"{path} is not the fold file the folds stage wrote (edited by hand?): {'; '.join(problems)}. "
            f"{REMAKE} (experiments trained on the old folds can then no longer be compared)"
        )
    return folds_df


def load_test_rows(
    exp_dir: str | Path, folds: Sequence[int | str], json_paths: Mapping[int | str, Path] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The test split (fold -1) of the fold file the given folds of ``oof/<exp>/`` were trained from.

    Each fold's record is ``json_paths[k]`` when given (the full fit's: ``models/<exp>/full.json``), else
    ``oof/<exp>/fold<K>.json``. Refused (:class:`DataValidationError`, one line): folds trained from different fold
    files, a fold file that is gone, edited (:func:`arcfold.data.folds.verify_fold_file`) or remade since (another
    sha256), or one without a test split. Returns the rows (fold-file order) and ``{"folds_path", "folds_sha256",
    "test"}``.
    """
    exp_dir = Path(exp_dir)
    hint = "Retrain the fold with train.force=true."
    json_paths = json_paths or {}
    recorded = {k: load_json(json_paths.get(k, exp_dir / f"fold{k}.json"), hint=hint) for k in folds}
    shas = {k: s.get("folds_sha256") for k, s in recorded.items()}
    if len(set(shas.values())) > 1:
        listing = ", ".join(f"fold {k}: {str(s)[:12]}" for k, s in shas.items())
        raise DataValidationError(
            f"{exp_dir}: the fold models were trained from different fold files ({listing}); "
            "retrain the folds of the old fold file with train.force=true"
        )
    sha, folds_path = shas[folds[0]], recorded[folds[0]].get("folds_path")
    if not folds_path or not Path(folds_path).is_file():
        raise DataValidationError(f"{exp_dir}: the fold file its folds were trained from ({folds_path}) is not here")
    folds_df = verify_fold_file(folds_path)
    now = file_sha256(folds_path)
    if now != sha:
        raise DataValidationError(
            f"{exp_dir}: its fold models were trained from another fold file than {folds_path} is now (sha256 "
            f"{str(sha)[:12]} then, {now[:12]} now: remade since?); retrain the folds on it (train.force=true)"
        )
    meta = load_json(Path(folds_path).with_suffix(".json"))
    test_df = folds_df[folds_df[FOLD] == TEST_FOLD].reset_index(drop=True)
    if test_df.empty or not meta.get("test"):
        raise DataValidationError(
            f"{folds_path} has no test split (fold -1). Set folds.test_fraction (e.g. 0.2) or folds.test_groups, "
            "remake the folds (`python -m arcfold folds -c CONFIG --force`) and retrain the folds on them"
        )
    return test_df, {"folds_path": str(folds_path), "folds_sha256": sha, "test": meta["test"]}
