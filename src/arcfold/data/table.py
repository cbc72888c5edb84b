"""The data-frame contract: a user's ``train.csv`` mapped to arcfold's standard columns, validated.

A user's CSV keeps its own column names (SOP ``path,class_id,super_class_id``, GLR
``id,landmark_id``, Happywhale ``image,individual_id,species``); ``DataConfig`` says which is which.
:func:`load_train_table` returns a frame whose first columns are the standard ones below, followed
by the user's remaining columns unchanged:

=========  ==============================================================================
``id``     unique row id (the id column if configured, else the image path)
``image``  image path as written in the CSV, relative to ``<input_dir>/<dataset>/<image_dir>``
``label``  class label as a string (instances: product, landmark, individual)
``group``  super-class as a string, or the label itself when there is no group column
=========  ==============================================================================

Everything is validated before any training starts and all problems are reported in one error
that names the file, the row (0-based data row and the 1-based line of the CSV file) and the column:
missing columns, empty labels, duplicate ids, image paths that point outside the data directory
(absolute, or climbing out with ``..``), and image files that are missing or cannot be decoded.
Nothing is ever dropped silently: with ``data.skip_bad_images=true`` images that cannot be decoded
are reported as a warning with their count instead, and the train stage leaves them out.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from arcfold.config import DataConfig
from arcfold.errors import DataValidationError

log = logging.getLogger(__name__)

ID, IMAGE, LABEL, GROUP, FOLD = "id", "image", "label", "group", "fold"
STANDARD_COLUMNS = (ID, IMAGE, LABEL, GROUP)
MAX_LISTED_PROBLEMS = 20

__all__ = [
    "FOLD",
    "GROUP",
    "ID",
    "IMAGE",
    "LABEL",
    "STANDARD_COLUMNS",
    "check_image_files",
    "image_root",
    "load_train_table",
    "resolve_image_paths",
]


def raise_problems(source: Path | str, problems: list[str], hint: str = "") -> None:
    if not problems:
        return
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    tail = f"\n  ... and {more} more" if more > 0 else ""
    tail += f"\n{hint}" if hint else ""
    raise DataValidationError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(listed) + tail)


def row_location(row: int) -> str:
    # data row 0 is on line 2 of the file (line 1 is the header)
    return f"row {row} (line {row + 2})"


def image_root(cfg: DataConfig) -> Path:
    return Path(cfg.input_dir) / cfg.dataset / cfg.image_dir


def resolve_image_paths(df: pd.DataFrame, root: Path) -> list[str]:
    return [str(root / p) for p in df[IMAGE].tolist()]


def read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataValidationError(f"{path}: file not found")
    try:
        # keep_default_na=False: a label such as "NA" or "null" is a real label, not a missing one
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataValidationError(f"{path}: not a readable CSV file: {e}") from None


def load_train_table(cfg: DataConfig, csv_path: str | os.PathLike | None = None, check_images: str | None = None):
    """Read, map and validate the training CSV; return the standard frame (see module doc)."""
    path = Path(csv_path) if csv_path is not None else Path(cfg.input_dir) / cfg.dataset / cfg.csv
    raw = read_csv(path)
    wanted = {"image": cfg.image_column, "label": cfg.label_column}
    if cfg.group_column:
        wanted["group"] = cfg.group_column
    if cfg.id_column:
        wanted["id"] = cfg.id_column
    missing = [f"column '{col}' (data.{role}_column) is missing" for role, col in wanted.items() if col not in raw]
    if missing:
        missing.append(f"the file has columns: {', '.join(map(repr, raw.columns))}")
        raise_problems(path, missing)
    if raw.empty:
        raise DataValidationError(f"{path}: no data rows")

    problems = []
    for role, col in wanted.items():
        blank = raw[col].str.strip() == ""
        problems += [f"{row_location(i)}, column '{col}': empty {role}" for i in np.flatnonzero(blank.to_numpy())]
    id_col = cfg.id_column or cfg.image_column
    dup = raw[id_col].duplicated(keep="first") & (raw[id_col].str.strip() != "")
    problems += [
        f"{row_location(i)}, column '{id_col}': duplicate id {raw[id_col].iat[i]!r}"
        for i in np.flatnonzero(dup.to_numpy())
    ]
    raise_problems(path, problems)

    df = pd.DataFrame(
        {
            ID: raw[id_col],
            IMAGE: raw[cfg.image_column],
            LABEL: raw[cfg.label_column],
            GROUP: raw[cfg.group_column] if cfg.group_column else raw[cfg.label_column],
        }
    )
    rest = [c for c in raw.columns if c not in wanted.values() and c not in STANDARD_COLUMNS]
    df = pd.concat([df, raw[rest]], axis=1)
    check = cfg.check_images if check_images is None else check_images
    check_image_files(
        df, image_root(cfg), mode=check, source=path, column=cfg.image_column, skip_bad=cfg.skip_bad_images
    )
    return df


def _outside(path: str) -> bool:
    """True when a CSV image path is absolute or climbs out of the image root (judged on the text, not the disk).

    Symbolic links inside the data folder (Kaggle input mounts) stay allowed: only the path as written counts.
    """
    norm = os.path.normpath(path.replace("\\", "/"))  # backslashes count as separators: ..\x climbs out too
    return os.path.isabs(norm) or norm == ".." or norm.startswith("../")


def _image_problem(path: str, decode: bool) -> str | None:
    if not os.path.isfile(path):
        return "file not found"
    if not decode:
        return None
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: truncated files fail here, not in the middle of training
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return f"cannot decode image ({type(e).__name__}: {e})"
    return None


def check_image_files(
    df: pd.DataFrame,
    root: Path,
    mode: str = "decode",
    source: Path | str = "train.csv",
    column: str = IMAGE,
    progress: bool = True,
    skip_bad: bool = False,
) -> np.ndarray:
    """Check every image of ``df`` stays inside ``root`` and exists (``mode="exists"``) or also decodes (``"decode"``).

    Paths outside ``root`` are checked in every mode (even ``"none"``). Returns the positions of the rows
    whose image cannot be decoded when ``skip_bad`` (logged as a warning with their count); otherwise any
    problem raises :class:`DataValidationError`. A missing file is always an error.
    """
    images = df[IMAGE].astype(str).tolist()
    outside = [
        f"{row_location(i)}, column '{column}': path {p!r} points outside the data directory {root}"
        for i, p in enumerate(images)
        if _outside(p)
    ]
    raise_problems(source, outside)
    no_rows = np.zeros(0, dtype=np.int64)
    if mode == "none":
        return no_rows
    if mode not in ("exists", "decode"):
        raise ValueError(f"check_images must be decode, exists or none, got {mode!r}")
    paths = resolve_image_paths(df, root)
    decode = mode == "decode"
    # decoding releases the GIL in PIL's C code, so threads scale on the cores there are
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        results = list(
            tqdm(
                pool.map(lambda p: _image_problem(p, decode), paths, chunksize=64),
                total=len(paths),
                desc=f"checking images ({mode})",
                disable=not progress or len(paths) < 2000,
                leave=False,
            )
        )
    bad = no_rows
    if skip_bad:
        bad = np.array([i for i, msg in enumerate(results) if msg and msg.startswith("cannot decode")], np.int64)
        if len(bad):
            shown = "; ".join(f"{row_location(i)}: {paths[i]}" for i in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            log.warning(
                "%s: %d of %d images cannot be decoded and are skipped (data.skip_bad_images=true): %s%s",
                source,
                len(bad),
                len(paths),
                shown,
                more,
            )
        skipped = set(bad.tolist())
        results = [None if i in skipped else msg for i, msg in enumerate(results)]
    problems = [f"{row_location(i)}, column '{column}': {msg}: {paths[i]}" for i, msg in enumerate(results) if msg]
    undecodable = any(msg and msg.startswith("cannot decode") for msg in results)
    hint = "fix or remove the images that cannot be decoded, or set data.skip_bad_images=true to leave them out"
    raise_problems(source, problems, hint=hint if undecodable else "")
    return bad
