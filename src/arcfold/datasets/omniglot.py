"""Omniglot (Lake et al., Science 2015; MIT licence) -> ``input/omniglot/train.csv`` + images.

The reduced background sets ``images_background_small1.zip`` and ``images_background_small2.zip``
share two alphabets (Greek, Latin) byte for byte; each drawing is kept once, so the union is
8 alphabets, 242 characters, 4,840 images. ``label`` = ``<alphabet>/<character>`` (an instance
class), ``group`` = ``<alphabet>`` (the super-class, as SOP's ``super_class_id``).

The two zips are ``python/images_background_small1.zip`` and ``python/images_background_small2.zip`` of the public
repository https://github.com/brendenlake/omniglot (MIT licence); ``python -m arcfold prepare omniglot --source DIR``
unpacks them from ``DIR`` (default ``../shared/data/omniglot``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import zipfile
from pathlib import Path

import pandas as pd

from arcfold.io import file_lock

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OMNIGLOT_SOURCE", "ensure_omniglot", "prepare_omniglot"]

DEFAULT_OMNIGLOT_SOURCE = Path("../shared/data/omniglot")
ZIPS = ("images_background_small1.zip", "images_background_small2.zip")


def prepare_omniglot(source: str | Path = DEFAULT_OMNIGLOT_SOURCE, out_dir: str | Path = "input/omniglot") -> Path:
    source, out_dir = Path(source), Path(out_dir)
    missing = [z for z in ZIPS if not (source / z).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Omniglot zips not found in {source}: {', '.join(missing)}. They are python/{ZIPS[0]} and "
            f"python/{ZIPS[1]} of https://github.com/brendenlake/omniglot (MIT licence): download them into a "
            "folder and run python -m arcfold prepare omniglot --source FOLDER"
        )
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rows, seen = [], {}
    for name in ZIPS:
        with zipfile.ZipFile(source / name) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                parts = Path(info.filename).parts  # images_background_smallN/<Alphabet>/<character>/<file>.png
                if info.is_dir() or len(parts) != 4 or not parts[-1].endswith(".png"):
                    continue
                alphabet, character, file = parts[1:]
                key = (alphabet, character, file)
                data = zf.read(info)
                if key in seen:
                    if seen[key] != len(data):
                        raise ValueError(f"{name}: {'/'.join(key)} differs from the copy in the other zip")
                    continue
                seen[key] = len(data)
                rel = Path("images") / alphabet / character / file
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
                rows.append({"image": rel.as_posix(), "label": f"{alphabet}/{character}", "group": alphabet})
    df = pd.DataFrame(rows).sort_values("image").reset_index(drop=True)
    df.to_csv(tmp / "train.csv", index=False)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # the folder appears whole or not at all
    log.info(
        "omniglot: %d images, %d characters, %d alphabets -> %s",
        len(df),
        df["label"].nunique(),
        df["group"].nunique(),
        out_dir,
    )
    return out_dir / "train.csv"


def ensure_omniglot(out_dir: str | Path = "input/omniglot", source: str | Path = DEFAULT_OMNIGLOT_SOURCE) -> Path:
    """Unpack the data set unless ``out_dir/train.csv`` exists; under a lock, so concurrent runs unpack it once."""

    out_dir = Path(out_dir)
    csv = out_dir / "train.csv"
    if csv.is_file():
        return csv
    with file_lock(out_dir.parent / f".{out_dir.name}.lock", what=f"data set {out_dir}"):
        return csv if csv.is_file() else prepare_omniglot(source, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_OMNIGLOT_SOURCE))
    parser.add_argument("--out", default="input/omniglot")
    args = parser.parse_args(argv)
    prepare_omniglot(args.source, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
