"""Plots stage: the pictures people look at, one experiment (and one fold) at a time, as PNG files.

1. ``fold<K>_embedding_map.png``: a t-SNE map (scikit-learn; PCA to 50 dimensions first) of the
   fold's OOF embeddings, at most ``--max-points`` (3000) of them, coloured by group (super-class);
   a few classes (taken in turn from each group, largest first) are drawn large, outlined and
   labelled, so one can see whether a class forms one tight cluster.
2. ``fold<K>_retrieval_random.png`` and ``fold<K>_retrieval_worst.png``: query images (blue border)
   followed by their top-k neighbours, best first, with a green border when the neighbour has the
   query's label and red when not; random queries, and the queries with the lowest AP@R (ties: the
   one whose first correct neighbour comes later, then row order). Neighbours are leave-one-out in
   the held-out fold, as in the metrics. Images are read from the data folder of the experiment's config
   (``arcfold.data.table.image_root``); ``--input-dir`` points elsewhere.
3. ``training_curves.png``: training loss, learning rate and validation Recall@1 / MAP@R per epoch
   from ``models/<exp>/fold<K>/history.csv``, one colour per fold, best epoch starred.

Everything is written under ``oof/<exp>/plots/`` (atomically), and ``oof/<exp>/plots.json`` lists
the files (paths relative to ``oof/<exp>/``)::

    {"experiment": "...", "fold": 0, "created_at": "...",
     "plots": {"embedding_map": "plots/fold0_embedding_map.png", "retrieval_random": "...",
               "retrieval_worst": "...", "training_curves": "plots/training_curves.png"}}

Figure sizes are fixed (no tight bounding box), so a PNG's size in pixels is its figure size in
inches times ``DPI``.

CLI::

    python -m arcfold plots --experiment NAME [--fold K] [--oof-dir oof] [--input-dir DIR]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from arcfold.config import config_from_dict
from arcfold.data.table import image_root
from arcfold.retrieval.metrics import average_precision_at_r, knn

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from arcfold.artifacts import finished_folds  # noqa: E402
from arcfold.io import atomic_path, load_npz, save_json  # noqa: E402

log = logging.getLogger(__name__)

__all__ = [
    "DPI",
    "embedding_map",
    "make_plots",
    "query_table",
    "retrieval_grid",
    "training_curves",
]

DPI = 100
MAP_INCHES = (9.0, 8.0)
CELL_INCHES = 1.5  # one thumbnail of the retrieval grid
ROW_TITLE_INCHES = 0.3  # room for the two caption lines above each image
CURVES_INCHES = (15.0, 4.5)
THUMB_PX = 96
BORDER_PX = 6
QUERY_RGB = (40, 90, 220)
MATCH_RGB = (0, 170, 0)
MISS_RGB = (220, 0, 0)


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# 1. embedding map


def _pick_classes(labels: np.ndarray, groups: np.ndarray, n: int) -> list[str]:
    """``n`` classes spread over the groups: round-robin over groups (largest group first), largest class first."""
    frame = pd.DataFrame({"label": labels, "group": groups})
    sizes = frame.groupby(["group", "label"]).size().rename("n").reset_index()
    sizes["group_size"] = sizes.groupby("group")["n"].transform("sum")
    sizes = sizes.sort_values(["n", "label"], ascending=[False, True], kind="mergesort")
    sizes["turn"] = sizes.groupby("group").cumcount()  # 0 = the group's largest class
    sizes = sizes.sort_values(["turn", "group_size", "group"], ascending=[True, False, True], kind="mergesort")
    return [str(c) for c in sizes["label"].drop_duplicates().head(n)]


def embedding_map(
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    out_path: str | Path,
    *,
    max_points: int = 3000,
    n_highlight: int = 5,
    seed: int = 0,
    title: str = "",
) -> dict[str, Any]:
    """t-SNE map coloured by group; returns ``{"path", "rows" (subsample), "xy" (n, 2), "highlighted"}``."""

    labels, groups = np.asarray(labels).astype(str), np.asarray(groups).astype(str)
    rng = np.random.default_rng(seed)
    highlighted = _pick_classes(labels, groups, n_highlight)
    # every row of a highlighted class, then random others up to max_points
    must = np.flatnonzero(np.isin(labels, highlighted))[:max_points]
    others = np.setdiff1d(np.arange(len(labels)), must)
    n_more = max(0, min(len(others), max_points - len(must)))
    rows = np.sort(np.concatenate([must, rng.choice(others, n_more, replace=False)]))
    x = np.asarray(embeddings, dtype=np.float32)[rows]  # (n, D)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)  # (n, 2)

    fig, ax = plt.subplots(figsize=MAP_INCHES, dpi=DPI)
    sub_labels, sub_groups = labels[rows], groups[rows]
    group_names = sorted(set(sub_groups))
    cmap = plt.get_cmap("tab20" if len(group_names) > 10 else "tab10")
    for i, g in enumerate(group_names):
        mask = sub_groups == g
        ax.scatter(xy[mask, 0], xy[mask, 1], s=8, alpha=0.45, color=cmap(i % cmap.N), label=g, linewidths=0)
    markers = "o^sDPX*v<>"
    dark = plt.get_cmap("Dark2")
    for i, c in enumerate(highlighted):
        mask = sub_labels == c
        if not mask.any():
            continue
        colour = dark(i % dark.N)
        ax.scatter(
            xy[mask, 0],
            xy[mask, 1],
            s=70,
            marker=markers[i % len(markers)],
            color=colour,
            edgecolors="black",
            linewidths=1.0,
            zorder=3,
        )
        cx, cy = xy[mask].mean(axis=0)
        ax.annotate(
            c,
            (cx, cy),
            fontsize=9,
            weight="bold",
            zorder=4,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.8},
        )
    if len(group_names) <= 20:
        ax.legend(title="group", loc="upper right", fontsize=8, markerscale=2, framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        title
        or f"t-SNE of {len(rows)} OOF embeddings\ncoloured by group; large outlined markers: {len(highlighted)} classes"
    )
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92)
    return {"path": _save(fig, Path(out_path)), "rows": rows, "xy": xy, "highlighted": highlighted}


# --------------------------------------------------------------------------------------------
# 2. retrieval grids


def query_table(embeddings: np.ndarray, labels: np.ndarray, k: int) -> pd.DataFrame:
    """Per query (an item whose class has another member): top-k neighbours, their matches, AP@R and first-hit rank.

    Leave-one-out in the given set, ranked as :func:`arcfold.retrieval.metrics.knn` ranks (ties by row order).
    """

    labels = np.asarray(labels).astype(str)
    codes = pd.factorize(labels)[0]
    n_relevant = np.bincount(codes)[codes] - 1  # (N,) R
    queries = np.flatnonzero(n_relevant >= 1)  # (Q,)
    depth = int(min(len(labels) - 1, max(k, n_relevant.max())))
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims, idx = knn(x, x, depth, exclude_self=True)  # (N, depth) each
    sims, idx = sims[queries], idx[queries]
    relevant = codes[idx] == codes[queries][:, None]  # (Q, depth)
    ap = average_precision_at_r(relevant, n_relevant[queries])
    first_hit = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, depth + 1)
    return pd.DataFrame(
        {
            "row": queries,
            "ap": ap,
            "first_hit": first_hit,
            "neighbours": list(idx[:, :k]),
            "similarities": list(sims[:, :k]),
            "matches": list(relevant[:, :k]),
        }
    )


def _thumbnail(path: Path | None, rgb: tuple[int, int, int]) -> np.ndarray:
    """(THUMB_PX, THUMB_PX, 3) uint8: the image letterboxed on white, inside a BORDER_PX frame of ``rgb``."""
    canvas = np.full((THUMB_PX, THUMB_PX, 3), 255, dtype=np.uint8)
    inner = THUMB_PX - 2 * BORDER_PX
    if path is not None and path.is_file():
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((inner, inner))
            arr = np.asarray(img)
        top, left = (inner - arr.shape[0]) // 2 + BORDER_PX, (inner - arr.shape[1]) // 2 + BORDER_PX
        canvas[top : top + arr.shape[0], left : left + arr.shape[1]] = arr
    else:  # a missing image is shown as grey, not as an error: the picture is still useful
        canvas[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = 180
    canvas[:BORDER_PX], canvas[-BORDER_PX:], canvas[:, :BORDER_PX], canvas[:, -BORDER_PX:] = rgb, rgb, rgb, rgb
    return canvas


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def grid_inches(n_rows: int, k: int) -> tuple[float, float]:
    return (k + 1) * CELL_INCHES, n_rows * (CELL_INCHES + ROW_TITLE_INCHES) + 0.5


def retrieval_grid(
    image_paths: Sequence[Path | None],
    labels: np.ndarray,
    table: pd.DataFrame,
    out_path: str | Path,
    title: str,
) -> Path:
    """One row per query of ``table`` (from :func:`query_table`): the query, then its neighbours."""
    labels = np.asarray(labels).astype(str)
    n_rows = len(table)
    k = len(table["neighbours"].iloc[0]) if n_rows else 0
    fig = plt.figure(figsize=grid_inches(n_rows, k), dpi=DPI)
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height)
    cell_h = (CELL_INCHES + ROW_TITLE_INCHES) / height
    for r, q in enumerate(table.itertuples(index=False)):
        bottom = 1 - 0.5 / height - (r + 1) * cell_h
        cells = [(q.row, QUERY_RGB, f"{_short(labels[q.row])}\nquery, AP@R {q.ap:.2f}")]
        cells += [
            (int(j), MATCH_RGB if m else MISS_RGB, f"{_short(labels[j])}\ncos {s:.2f}")
            for j, m, s in zip(q.neighbours, q.matches, q.similarities, strict=True)
        ]
        for c, (row, rgb, caption) in enumerate(cells):
            ax = fig.add_axes((c / (k + 1), bottom, 1 / (k + 1), CELL_INCHES / height))
            ax.imshow(_thumbnail(image_paths[row], rgb), interpolation="nearest")
            ax.set_axis_off()
            ax.text(0.5, 1.0, caption, transform=ax.transAxes, ha="center", va="bottom", fontsize=7, clip_on=False)
    return _save(fig, Path(out_path))


# --------------------------------------------------------------------------------------------
# 3. training curves


def training_curves(histories: dict[int, pd.DataFrame], out_path: str | Path, title: str = "") -> Path:
    """Loss, learning rate and validation metrics per epoch, one colour per fold."""
    fig, axes = plt.subplots(1, 3, figsize=CURVES_INCHES, dpi=DPI)
    cmap = plt.get_cmap("tab10")
    for i, (fold, h) in enumerate(sorted(histories.items())):
        colour = cmap(i % 10)
        if "train_loss" in h:
            axes[0].plot(h["epoch"], h["train_loss"], "-o", ms=3, color=colour, label=f"fold {fold}")
        if "lr" in h:
            axes[1].plot(h["epoch"], h["lr"], "-", color=colour, label=f"fold {fold}")
        if "recall@1" in h:
            axes[2].plot(h["epoch"], h["recall@1"], "-o", ms=3, color=colour, label=f"fold {fold} R@1")
            best = int(h["recall@1"].to_numpy().argmax())
            axes[2].plot(h["epoch"].iloc[best], h["recall@1"].iloc[best], "*", ms=14, color=colour, mec="black")
        if "map@r" in h:
            axes[2].plot(h["epoch"], h["map@r"], "--", color=colour, label=f"fold {fold} MAP@R")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="learning rate (backbone)", xlabel="epoch", yscale="log")
    axes[2].set(title="validation (held-out fold); * = best epoch", xlabel="epoch", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.85, wspace=0.25)
    return _save(fig, Path(out_path))


# --------------------------------------------------------------------------------------------
# the stage


def _experiment_config(exp_dir: Path, fold: int):

    path = exp_dir / f"fold{fold}.config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the resolved config of fold {fold} (written by the train stage)")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))


def make_plots(
    experiment: str,
    oof_dir: str | Path = "oof",
    fold: int | None = None,
    *,
    input_dir: str | Path | None = None,
    models_dir: str | Path | None = None,
    k: int = 5,
    n_queries: int = 8,
    max_points: int = 3000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the three kinds of picture for ``experiment`` (fold ``fold``, default its first) and ``plots.json``.

    A straight sequence of the plots it writes, one short block each.
    """

    exp_dir = Path(oof_dir) / experiment
    finished = finished_folds(exp_dir)
    if not finished:
        raise FileNotFoundError(f"no finished fold in {exp_dir} (expected fold<K>.npz)")
    fold = finished[0] if fold is None else fold
    if fold not in finished:
        raise FileNotFoundError(f"fold {fold} of '{experiment}' is not finished; finished: {finished}")
    cfg = _experiment_config(exp_dir, fold)
    if input_dir is not None:
        cfg.data.input_dir = str(input_dir)
    oof = load_npz(exp_dir / f"fold{fold}.npz")
    if not 1 <= k <= len(oof["labels"]) - 1:
        raise ValueError(
            f"--top-k={k}: fold {fold} of '{experiment}' has {len(oof['labels'])} images, so each query has "
            f"{len(oof['labels']) - 1} neighbours at most; use 1 <= k <= {len(oof['labels']) - 1}"
        )
    plots_dir = exp_dir / "plots"
    written: dict[str, str] = {}

    log.info("t-SNE of %d embeddings (at most %d)", len(oof["labels"]), max_points)
    result = embedding_map(
        oof["embeddings"],
        oof["labels"],
        oof["groups"],
        plots_dir / f"fold{fold}_embedding_map.png",
        max_points=max_points,
        seed=seed,
        title=f"{experiment}, fold {fold}: t-SNE of OOF embeddings ({min(len(oof['labels']), max_points)} of "
        f"{len(oof['labels'])})\ncoloured by group; large outlined markers: a few classes",
    )
    written["embedding_map"] = result["path"]

    root = image_root(cfg.data)
    paths = [root / p for p in oof["images"]]
    n_missing = sum(not p.is_file() for p in paths)
    if n_missing:
        log.warning(
            "%d of %d images not found under %s (drawn grey); --input-dir points elsewhere", n_missing, len(paths), root
        )
    table = query_table(oof["embeddings"], oof["labels"], k)
    rng = np.random.default_rng(seed)
    n = min(n_queries, len(table))
    random_rows = table.iloc[np.sort(rng.choice(len(table), n, replace=False))]
    worst_rows = table.iloc[np.lexsort((table["row"], -table["first_hit"], table["ap"]))[:n]]
    for name, rows, what in (
        ("random", random_rows, "random queries"),
        ("worst", worst_rows, "worst queries (lowest AP@R)"),
    ):
        written[f"retrieval_{name}"] = retrieval_grid(
            paths,
            oof["labels"],
            rows,
            plots_dir / f"fold{fold}_retrieval_{name}.png",
            title=f"{experiment}, fold {fold}: {what}; top-{k} neighbours, green = same label, red = other",
        )

    models_root = Path(models_dir) if models_dir is not None else Path(cfg.paths.models_dir)
    histories = {}
    for k_fold in finished:
        history = models_root / experiment / f"fold{k_fold}" / "history.csv"
        if history.is_file():
            histories[k_fold] = pd.read_csv(history)
    if histories:
        written["training_curves"] = training_curves(
            histories, plots_dir / "training_curves.png", title=f"{experiment}: training curves"
        )
    else:
        log.warning("no history.csv under %s: no training curves", models_root / experiment)

    listing = {
        "experiment": experiment,
        "fold": fold,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "plots": {name: str(Path(p).relative_to(exp_dir)) for name, p in written.items()},
    }
    save_json(exp_dir / "plots.json", listing)
    return listing
