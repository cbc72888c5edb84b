"""The names of an experiment's artifacts: fold stems, the full-data fit, fold specs, which folds are finished.

The layout itself (``oof/<exp>/fold<K>.npz`` ...) is described in the README; every layer that reads or writes it
names folds through these functions.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FULL_FIT", "finished_folds", "fold_name", "parse_folds"]

# the "fold" of the full-data fit: one model trained on every row of every fold (never the test split), no
# validation; its checkpoint is models/<experiment>/full.pt, in the format of fold<K>.pt with "fold": "full"
FULL_FIT = "full"


def fold_name(fold: int | str) -> str:
    """The file stem of a fold's artifacts: ``fold<K>`` for fold K, ``full`` for the full-data fit.

    >>> fold_name(2), fold_name(FULL_FIT)
    ('fold2', 'full')
    """
    return FULL_FIT if fold == FULL_FIT else f"fold{int(fold)}"


def finished_folds(exp_dir: str | Path) -> list[int]:
    """Sorted indices K of the finished folds in ``oof/<exp>/``: those with ``fold<K>.npz`` and ``fold<K>.json``.

    The train stage writes the OOF ``.npz`` last, so its presence marks a fold finished.
    """
    exp_dir = Path(exp_dir)
    return sorted(
        int(p.stem[4:]) for p in exp_dir.glob("fold*.npz") if p.stem[4:].isdigit() and p.with_suffix(".json").is_file()
    )


def parse_folds(spec: str) -> list[int | str]:
    """'0' -> [0]; '0..4' -> [0, 1, 2, 3, 4]; '0,2' -> [0, 2]; 'full' (the full-data fit) alone or in a list, always
    last (with train.keep=best its epoch count is read from the finished folds).

    >>> parse_folds("full,0..2")
    [0, 1, 2, 'full']
    """
    folds: list[int] = []
    full = False
    try:
        for part in spec.split(","):
            part = part.strip()
            if part == FULL_FIT:
                full = True
            elif ".." in part:
                lo, hi = part.split("..")
                folds += list(range(int(lo), int(hi) + 1))
            elif part:
                folds.append(int(part))
    except ValueError:
        folds = []
    if (not folds and not full) or (folds and min(folds) < 0):
        raise ValueError(f"bad fold spec {spec!r}: use K, A..B, A,B,C or full (alone or in a list: 0..4,full)")
    return [*folds, *([FULL_FIT] if full else [])]
