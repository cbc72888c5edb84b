"""Holdout stage: a local test set made from one fold, to run ``inference.py`` end to end and score its submission.

``make`` splits the held-out images of a fold (the rows of ``oof/<exp>/fold<K>.npz``) the way
:func:`arcfold.experiments.rerank.recognition_split` does: a fraction of the classes is "new" (queries only, truth
``--new-label``); of every other class half of the images are queries and the rest the labelled gallery.
Only that fold's own model never saw these images, so an honest local score uses ``folds=[K]`` at inference
(the other folds' models trained on them).

``make --split test`` splits the same way the rows of the held-out test split instead (``fold == -1`` in the fold
CSV named by ``folds_path`` in the experiment's ``oof/<exp>/fold<K>.json``; "A Metric Learning Reality Check"'s
seed protocol, made by ``folds.test_fraction`` / ``folds.test_groups``). No fold model trained or validated on
them, so inference may use every fold (the default) and the score is that of the submitted fold ensemble. The
fold CSV must be the one the experiment's folds were trained on (its sha256 is checked against the fold JSONs).
Files written to ``--out``:

``query.csv``    ``id,image``                 (what a competition's test CSV gives)
``gallery.csv``  ``id,image,label``           (the index / train images with their labels)
``truth.csv``    ``id,label,is_new``          (the answers, for ``score``)

Image paths are as in the training CSV, relative to the data set's image folder, which is printed
(pass it as ``query.image_root`` and ``gallery.image_root``).

``score`` reads a submission and the truth and prints the metric of the format: Recall@1/5/10 and mAP@K
(retrieval; queries whose class is not in the gallery are skipped), GAP (recognition), MAP@5 (top5).

CLI::

    python -m arcfold holdout make --experiment NAME --fold 0 --out holdout/NAME [--new-fraction 0.2]
    python -m arcfold holdout make --experiment NAME --split test --out holdout/NAME_test
    python -m arcfold holdout score --submission submissions/NAME.csv --holdout holdout/NAME --format top5
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from arcfold.data.folds import load_test_rows
from arcfold.data.table import ID, IMAGE, LABEL, read_csv
from arcfold.experiments.rerank import recognition_split
from arcfold.io import load_npz, save_json, save_text
from arcfold.retrieval.submission import (
    global_average_precision,
    map_at_k,
    read_submission,
    retrieval_scores,
    validate_submission,
)

log = logging.getLogger(__name__)

__all__ = ["make_holdout", "score_holdout"]


def _test_split_rows(exp_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """ids, images, labels of the test split (fold -1) of the fold file the experiment's folds were trained from
    (checked by :func:`arcfold.data.folds.load_test_rows`), and where they came from."""

    folds = sorted(int(p.stem[4:]) for p in exp_dir.glob("fold*.json") if p.stem[4:].isdigit())
    if not folds:
        raise FileNotFoundError(f"no finished fold in {exp_dir} (fold<K>.json): train one, it names the fold file")
    test, info = load_test_rows(exp_dir, folds)
    source = {"folds_path": info["folds_path"], "folds_sha256": info["folds_sha256"]}
    return test[ID].to_numpy(str), test[IMAGE].to_numpy(str), test[LABEL].to_numpy(str), source


def make_holdout(
    oof_dir: str | Path,
    experiment: str,
    fold: int | None,
    out: str | Path,
    *,
    new_fraction: float,
    new_label: str,
    seed: int,
    split: str = "fold",
) -> dict[str, Any]:
    """Write query/gallery/truth CSVs from fold ``fold``'s OOF rows, or (``split="test"``, ``fold=None``) from the
    fold CSV's test split; returns what ``holdout.json`` records."""

    exp_dir = Path(oof_dir) / experiment
    source: dict[str, Any] = {}
    if split == "test":
        if fold is not None:
            raise ValueError("split='test' takes no fold: the test split is no fold's")
        ids, images, labels, source = _test_split_rows(exp_dir)
        config_path = min(exp_dir.glob("fold*.config.yaml"), default=exp_dir / "fold<K>.config.yaml")
        q, g, is_new = recognition_split(labels, new_fraction, seed)
    elif split == "fold":
        if fold is None:
            raise ValueError("split='fold' needs a fold number")
        arrays = load_npz(exp_dir / f"fold{fold}.npz")
        config_path = exp_dir / f"fold{fold}.config.yaml"
        ids, images, labels = arrays["ids"].astype(str), arrays["images"].astype(str), arrays["labels"].astype(str)
        q, g, is_new = recognition_split(labels, new_fraction, seed + fold)
    else:
        raise ValueError(f"split must be 'fold' or 'test', got {split!r}")
    data = yaml.safe_load(config_path.read_text(encoding="utf-8"))["data"]
    image_root = (Path(data["input_dir"]) / data["dataset"] / data["image_dir"]).resolve()
    out = Path(out)
    save_text(out / "query.csv", pd.DataFrame({"id": ids[q], "image": images[q]}).to_csv(index=False))
    save_text(
        out / "gallery.csv", pd.DataFrame({"id": ids[g], "image": images[g], "label": labels[g]}).to_csv(index=False)
    )
    truth = pd.DataFrame({"id": ids[q], "label": np.where(is_new, new_label, labels[q]), "is_new": is_new})
    save_text(out / "truth.csv", truth.to_csv(index=False))
    info = {
        "experiment": experiment,
        "split": split,
        "fold": fold,
        **source,
        "image_root": str(image_root),
        "n_query": int(len(q)),
        "n_gallery": int(len(g)),
        "n_new_queries": int(is_new.sum()),
        "new_label": new_label,
        "seed": seed,
    }
    save_json(out / "holdout.json", info)
    return info


def score_holdout(submission: str | Path, holdout: str | Path, fmt: str) -> dict[str, float]:
    holdout = Path(holdout)
    info = json.loads((holdout / "holdout.json").read_text(encoding="utf-8"))
    truth, gallery = read_csv(holdout / "truth.csv"), read_csv(holdout / "gallery.csv")
    frame = read_submission(submission)
    validate_submission(
        frame,
        fmt,
        truth["id"],
        gallery_ids=gallery["id"],
        labels=gallery["label"],
        new_label=info["new_label"],
        id_header=frame.columns[0],
        prediction_header=frame.columns[1],
    )
    id_header, pred_header = frame.columns[0], frame.columns[1]
    predictions = frame.set_index(id_header)[pred_header].reindex(truth["id"]).fillna("").str.split()
    out: dict[str, float] = {"n_queries": float(len(truth))}
    if fmt == "retrieval":
        label_of = dict(zip(gallery["id"], gallery["label"], strict=True))
        counts = gallery["label"].value_counts()
        n_relevant = truth["label"].map(counts).fillna(0).astype(int).to_numpy()
        keep = n_relevant > 0
        rows = [[label_of[g] for g in p] for p in predictions[keep]]
        out.update(retrieval_scores(rows, truth["label"][keep].tolist(), n_relevant[keep], ks=(1, 5, 10)))
    elif fmt == "recognition":
        first = [p[0] if p else None for p in predictions]
        conf = [float(p[1]) if p else float("nan") for p in predictions]
        out["gap"] = global_average_precision(first, conf, truth["label"].tolist(), known=set(gallery["label"]))
    else:
        out["map@5"] = map_at_k(list(predictions), truth["label"].tolist(), k=5)
    return out
