"""Leaderboard stage: every experiment under ``oof/`` in one table, sorted by a chosen metric.

Reads, for each folder ``oof/<exp>/``, the finished folds (a fold is finished when its
``fold<K>.npz`` exists, as the train stage defines it) with their ``fold<K>.json`` scores and
``fold<K>.config.yaml`` resolved configs, and the blend specs ``oof/blends/<name>.json`` written by
the blend stage (their *nested* scores: the honest estimate). Folders without finished folds
(``oof/blends``, ``oof/tune``) are not experiments and are skipped.

Columns: experiment, backbone, head/loss, image size, embedding size, epochs, the epoch the folds kept
(``train.keep``: ``last``, or ``best*``: the epoch was chosen on the validation fold, so the OOF score is
optimistic; fold JSONs from before ``train.keep`` count as ``best*``, a blend is ``best*`` when one of its members
is; a legend line says so), folds finished out of ``folds.n_splits``, mean ± std over the finished folds of
Recall@1/5/10 and MAP@R, date (the last fold's ``finished_at``, UTC), git commit (the ``git_commit`` of the fold
JSONs, ``-`` when the training run did not record one), fold-file hash and notes.

Rules
-----
* **Fold files.** Scores are comparable only between experiments validated on the same folds, so
  rows are grouped into *sections*, one per fold-file hash (``folds_sha256`` in every fold JSON).
  Ranks restart in each section and a warning is printed when there is more than one section: an
  experiment on another fold file is flagged, never ranked as an equal. An experiment whose own
  folds were made from different fold files goes into a section ``mixed`` of its own, unranked.
* **Incomplete experiments** (fewer finished folds than ``n_splits``) are shown, marked ``!`` in the
  folds column, and ranked after the complete ones of their section: their means cover other folds.
* **Sorting** is by the mean of ``--sort`` (any metric of the fold JSONs: ``recall@1``, ``recall@5``,
  ``recall@10``, ``map@r``, ...), best first, within those groups.
* The standard deviation is over folds (``ddof=0``, as the score stage); with one fold it is empty.
* **Test split.** When ``oof/<exp>/test.json`` exists (the test stage, :mod:`arcfold.evaluate`; for a blend
  ``oof/blends/<name>.test.json``), the columns ``test R@1`` / ``test MAP@R`` (the concatenated fold ensemble,
  what inference submits) and ``test sep. R@1`` (mean ± std of the fold models alone) sit beside the OOF ones
  (CSV: ``test_recall@1``, ``test_map@r``, ``test_separate_recall@1_mean`` / ``_std``); ``--sort test_recall@1``
  sorts by them. A test run on other folds than the finished ones is noted: run the test stage again. The
  full-data fit (``models/<exp>/full.pt``) has no OOF and no row of its own; a test run with it as a member
  (``arcfold test --folds 0..4,full``) is noted the same way.

Writes ``oof/leaderboard.csv`` (one row per experiment, numbers in separate mean and std columns)
and ``oof/leaderboard.md`` (one markdown table per section), atomically, and prints the table. The
command reads and writes under a lock (``oof/.leaderboard.lock``), so two runs at once never leave
a CSV and a markdown file of different moments, nor an older table over a newer one.

CLI::

    python -m arcfold leaderboard [--oof-dir oof] [--sort recall@1] [--exclude 'STUDY_t[0-9]*'] [--no-blends]

``--exclude`` takes shell patterns (:mod:`fnmatch`) of experiment names, e.g. ``'glyphs_arcface_t[0-9]*'`` for the
trials of the tune study ``glyphs_arcface`` (trial experiments are ``<study>_t<N>``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from arcfold.artifacts import finished_folds
from arcfold.io import load_json, save_text
from arcfold.models.heads import HEADS_WITH_MARGIN

log = logging.getLogger(__name__)

__all__ = [
    "SHOWN_METRICS",
    "build_leaderboard",
    "read_experiment",
    "render_markdown",
    "render_text",
    "write_leaderboard",
]

SHOWN_METRICS = ("recall@1", "recall@5", "recall@10", "map@r")
MIXED = "mixed"  # section of experiments whose folds were made from different fold files
UNKNOWN = "unknown"  # fold JSONs without a folds_sha256
_LABELS = {"recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10", "map@r": "MAP@R"}
KEEP_BEST_LEGEND = "kept best* = epoch chosen on the validation fold (train.keep=best): its OOF score is optimistic"


def _get(mapping: dict | None, dotted: str, default: Any = None) -> Any:
    node: Any = mapping or {}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _head_label(config: dict) -> str:
    """``arcface (s=30, m=0.3)``; the focal loss and a miner when used; scale and margin only for margin heads."""
    name = str(_get(config, "head.name", "?"))
    details = []
    scale, margin = _get(config, "head.scale"), _get(config, "head.margin")
    if name in HEADS_WITH_MARGIN or name == "norm_softmax":
        details.append(f"s={scale:g}" if isinstance(scale, (int, float)) else "")
    if name in HEADS_WITH_MARGIN:
        details.append(f"m={margin:g}" if isinstance(margin, (int, float)) else "")
    if _get(config, "head.loss", "ce") not in ("ce", None):
        details.append(str(_get(config, "head.loss")))
    if _get(config, "head.miner", "none") not in ("none", None):
        details.append(f"miner={_get(config, 'head.miner')}")
    details = [d for d in details if d]
    return f"{name} ({', '.join(details)})" if details else name


def _short_commit(commit: str) -> str:
    """A full 40-hex sha is cut to 10 characters; ``git describe`` output (``3bd3470-dirty``) is kept whole."""
    commit = str(commit)
    return commit[:10] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit


def _short_date(iso: str | None) -> str:
    return iso[:16].replace("T", " ") if iso else "-"


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], float)
    if len(arr) == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=0)) if len(arr) > 1 else math.nan


def _test_columns(path: Path, folds: list[int] | None, notes: list[str]) -> dict[str, Any]:
    """The test stage's figures for a leaderboard row (nothing when it has not run)."""
    if not path.is_file():
        return {}
    result = load_json(path, hint="Run the test stage again with --force.")
    columns = {f"test_{m}": result["concatenated"].get(m, math.nan) for m in ("recall@1", "map@r")}
    if "separate" in result:
        columns["test_separate_recall@1_mean"] = result["separate"]["mean"].get("recall@1", math.nan)
        columns["test_separate_recall@1_std"] = result["separate"]["std"].get("recall@1", math.nan)
    if folds is not None and sorted(map(str, result["folds"])) != sorted(map(str, folds)):  # "full": the full fit
        notes.append(f"test scored folds {','.join(map(str, result['folds']))}: rerun `arcfold test --force`")
    return columns


def read_experiment(exp_dir: str | Path) -> dict[str, Any] | None:
    """One leaderboard row for ``oof/<exp>/``, or None when it has no finished fold."""
    exp_dir = Path(exp_dir)
    folds = finished_folds(exp_dir)
    if not folds:
        return None
    hint = "Retrain that fold with train.force=true, or hide the experiment with --exclude."
    scores = {k: load_json(exp_dir / f"fold{k}.json", hint=hint) for k in folds}
    configs = {}
    for k in folds:
        path = exp_dir / f"fold{k}.config.yaml"
        configs[k] = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config = configs[folds[0]]
    notes = []

    shas = {scores[k].get("folds_sha256") for k in folds}
    if len(shas) > 1:
        section = MIXED
        notes.append(f"folds made from {len(shas)} different fold files")
    else:
        section = shas.pop() or UNKNOWN
    # the columns shown must describe every fold, else the row is a mix of experiments
    described = ("model.backbone", "head.name", "data.image_size", "model.embedding_size", "train.epochs")
    differing = [key for key in described if len({repr(_get(configs[k], key)) for k in folds}) > 1]
    if differing:
        notes.append(f"folds differ in {', '.join(differing)}")

    n_splits = _get(config, "folds.n_splits")
    complete = n_splits is not None and set(range(int(n_splits))) <= set(folds)
    if not complete:
        missing = sorted(set(range(int(n_splits))) - set(folds)) if n_splits is not None else []
        notes.append("incomplete: missing fold " + ",".join(map(str, missing)) if missing else "incomplete")

    commits = sorted(
        {_short_commit(scores[k]["git_commit"]) for k in folds if scores[k].get("git_commit") not in (None, "", "-")}
    )
    dates = [scores[k].get("finished_at") for k in folds if scores[k].get("finished_at")]
    row: dict[str, Any] = {
        "section": section,
        "experiment": exp_dir.name,
        "kind": "experiment",
        "backbone": _get(config, "model.backbone", "?"),
        "head": _head_label(config),
        "image_size": _get(config, "data.image_size"),
        "embedding_size": _get(config, "model.embedding_size"),
        "epochs": _get(config, "train.epochs", scores[folds[0]].get("epochs")),
        "keep": _keep_of(scores.values()),
        "finished_folds": " ".join(map(str, folds)),
        "n_folds": len(folds),
        "n_splits": n_splits,
        "complete": complete,
    }
    for metric in _metric_names(scores.values()):
        mean, std = _mean_std([scores[k].get(metric, math.nan) for k in folds])
        row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
    row.update(_test_columns(exp_dir / "test.json", folds, notes))
    row.update(
        {
            "date": _short_date(max(dates) if dates else None),
            "git_commit": ",".join(commits) if commits else "-",
            "folds_sha256": ",".join(sorted(s for s in {scores[k].get("folds_sha256") for k in folds} if s)) or "-",
            "folds_path": scores[folds[0]].get("folds_path", "-"),
            "notes": "; ".join(notes),
        }
    )
    return row


def _keep_of(score_dicts) -> str:
    """``best`` when any fold kept its best validation epoch (fold JSONs without ``keep`` did), else ``last``."""
    return "best" if any(scores.get("keep", "best") == "best" for scores in score_dicts) else "last"


def _metric_names(score_dicts) -> list[str]:
    names: list[str] = []
    for scores in score_dicts:
        for key, value in scores.items():
            if key.startswith(("recall@", "map@")) and isinstance(value, (int, float)) and key not in names:
                names.append(key)
    return names


def read_blend(path: str | Path) -> dict[str, Any] | None:
    """A leaderboard row for a blend spec (``oof/blends/<name>.json``): its nested per-fold scores."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("skipping %s: not a readable blend spec (%s)", path, e)
        return None
    if not str(spec.get("format", "")).startswith("arcfold.blend/"):
        return None
    nested = spec["scores"]["nested"] or spec["scores"]["in_sample"]
    per_fold = nested["per_fold"]
    weights = ", ".join(f"{e}:{w:.2f}" for e, w in zip(spec["experiments"], spec["weights"], strict=True))
    row: dict[str, Any] = {
        "section": spec.get("folds_sha256") or UNKNOWN,
        "experiment": f"blend:{spec['name']}",
        "kind": "blend",
        "backbone": " + ".join(spec["experiments"]),
        "head": "blend",
        "image_size": None,
        "embedding_size": spec.get("embedding_size"),
        "epochs": None,
        "keep": _blend_keep(path.parent.parent, spec["experiments"], spec["folds"]),
        "finished_folds": " ".join(str(k) for k in spec["folds"]),
        "n_folds": len(spec["folds"]),
        "n_splits": spec.get("n_splits"),
        "complete": spec.get("n_splits") is not None and len(spec["folds"]) >= spec["n_splits"],
    }
    for metric in _metric_names(per_fold.values()):
        row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([s.get(metric, math.nan) for s in per_fold.values()])
    row.update(_test_columns(path.with_suffix(".test.json"), None, []))
    estimate = "nested" if spec["scores"]["nested"] else "in-sample (weights were not searched)"
    row.update(
        {
            "date": _short_date(spec.get("created_at")),
            "git_commit": "-",
            "folds_sha256": spec.get("folds_sha256") or "-",
            "folds_path": "-",
            "notes": f"blend ({estimate} scores), weights {weights}",
        }
    )
    if not row["complete"]:
        row["notes"] += "; incomplete"
    return row


def _blend_keep(oof_dir: Path, experiments: list[str], folds: list[int]) -> str:
    """A blend's members' ``train.keep`` (its spec lives in ``oof/blends/``): ``best`` when any member's fold did,
    ``-`` when a member's fold JSON is gone."""
    paths = [oof_dir / exp / f"fold{k}.json" for exp in experiments for k in folds]
    if not all(p.is_file() for p in paths):
        return "-"
    return _keep_of(load_json(p) for p in paths)


def build_leaderboard(
    oof_dir: str | Path = "oof",
    sort: str = "recall@1",
    exclude: tuple[str, ...] | list[str] = (),
    include_blends: bool = True,
) -> pd.DataFrame:
    """All experiments (and blends) under ``oof_dir``, ordered by section, completeness, then ``sort``.

    Adds ``section_index`` (1 = the fold file most experiments used) and ``rank`` (within a section;
    0 for the unranked ``mixed`` section).
    """
    oof_dir = Path(oof_dir)
    if not oof_dir.is_dir():
        raise FileNotFoundError(f"no OOF folder {oof_dir}")
    rows = []
    for exp_dir in sorted(p for p in oof_dir.iterdir() if p.is_dir()):
        if any(fnmatch.fnmatch(exp_dir.name, pattern) for pattern in exclude):
            continue
        row = read_experiment(exp_dir)
        if row is not None:
            rows.append(row)
    if include_blends and (oof_dir / "blends").is_dir():
        for path in sorted((oof_dir / "blends").glob("*.json")):
            row = read_blend(path)
            if row is not None and not any(fnmatch.fnmatch(row["experiment"], p) for p in exclude):
                rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no finished experiment under {oof_dir} (expected {oof_dir}/<exp>/fold<K>.npz)")
    table = pd.DataFrame(rows)
    key = f"{sort}_mean" if f"{sort}_mean" in table or not sort.startswith("test_") else sort
    if key not in table:
        known = sorted(c[: -len("_mean")] for c in table.columns if c.endswith("_mean"))
        known += sorted(c for c in table.columns if c.startswith("test_") and not c.endswith(("_mean", "_std")))
        raise ValueError(f"unknown sort metric {sort!r}; the fold scores have: {', '.join(known)}")
    for metric in SHOWN_METRICS:
        for stat in ("mean", "std"):
            if f"{metric}_{stat}" not in table:
                table[f"{metric}_{stat}"] = math.nan

    # the fold file most experiments used comes first; mixed last
    sizes = table["section"].value_counts()
    order = sorted(sizes.index, key=lambda s: (s == MIXED, s == UNKNOWN, -sizes[s], s))
    table["section_index"] = table["section"].map({s: i + 1 for i, s in enumerate(order)})
    table["_score"] = table[key].fillna(-math.inf)
    table = table.sort_values(
        ["section_index", "complete", "_score", "experiment"], ascending=[True, False, False, True], kind="mergesort"
    ).drop(columns="_score")
    table["rank"] = table.groupby("section_index").cumcount() + 1
    table.loc[table["section"] == MIXED, "rank"] = 0
    first = ["section_index", "rank", "experiment"]
    return table[first + [c for c in table.columns if c not in first]].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# rendering


def _fmt_metric(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if std is None or math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _display_frame(section: pd.DataFrame) -> pd.DataFrame:
    def size(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(int(value))

    out = pd.DataFrame(
        {
            "#": ["-" if r == 0 else str(r) for r in section["rank"]],
            "experiment": section["experiment"],
            "backbone": section["backbone"],
            "head/loss": section["head"],
            "img": section["image_size"].map(size),
            "emb": section["embedding_size"].map(size),
            "epochs": section["epochs"].map(size),
            "kept": section["keep"].map({"best": "best*"}).fillna(section["keep"]),
            "folds": [
                f"{n}/{size(s)}" + ("" if c else " !")
                for n, s, c in zip(section["n_folds"], section["n_splits"], section["complete"], strict=True)
            ],
        }
    )
    for metric in SHOWN_METRICS:
        out[_LABELS[metric]] = [
            _fmt_metric(m, s) for m, s in zip(section[f"{metric}_mean"], section[f"{metric}_std"], strict=True)
        ]
    if "test_recall@1" in section:  # some experiment has a test.json
        out["test R@1"] = [_fmt_metric(m, math.nan) for m in section["test_recall@1"]]
        out["test MAP@R"] = [_fmt_metric(m, math.nan) for m in section["test_map@r"]]
        separate = section.get("test_separate_recall@1_mean", pd.Series(math.nan, index=section.index))
        spread = section.get("test_separate_recall@1_std", pd.Series(math.nan, index=section.index))
        out["test sep. R@1"] = [_fmt_metric(m, s) for m, s in zip(separate, spread, strict=True)]
    out["date"] = section["date"].to_numpy()
    out["commit"] = section["git_commit"].to_numpy()
    out["notes"] = section["notes"].to_numpy()
    return out.reset_index(drop=True)


def _section_title(section: pd.DataFrame) -> str:
    name = section["section"].iloc[0]
    n = len(section)
    if name == MIXED:
        return f"Experiments whose folds come from different fold files ({n}; not ranked)"
    paths = sorted({p for p in section["folds_path"] if p and p != "-"})
    where = f" ({', '.join(paths)})" if paths else ""
    return f"Fold file {name[:12]}{where}: {n} experiment(s)"


def _sections(table: pd.DataFrame) -> list[pd.DataFrame]:
    return [group for _, group in table.groupby("section_index", sort=True)]


def _warning(table: pd.DataFrame) -> str:
    n = table.loc[table["section"] != MIXED, "section"].nunique()
    lines = []
    if n > 1:
        lines.append(
            f"WARNING: experiments were validated on {n} different fold files; "
            "scores are comparable only within a section, ranks restart in each"
        )
    if (table["section"] == MIXED).any():
        lines.append("WARNING: some experiments mix folds made from different fold files; they are not ranked")
    return "\n".join(lines)


def render_text(table: pd.DataFrame, sort: str = "recall@1") -> str:
    parts = [f"Leaderboard (sorted by mean {sort}; mean ± std over finished folds; ! = incomplete)"]
    if (table["keep"] == "best").any():
        parts.append(KEEP_BEST_LEGEND)
    warning = _warning(table)
    if warning:
        parts.append(warning)
    for section in _sections(table):
        parts.append(f"\n{_section_title(section)}\n{_display_frame(section).to_string(index=False)}")
    return "\n".join(parts) + "\n"


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(table: pd.DataFrame, sort: str = "recall@1") -> str:
    parts = [
        "# Leaderboard",
        "",
        f"Sorted by mean {sort}, best first; mean ± std over finished folds; `!` = incomplete (ranked after the "
        "complete experiments of its section). Ranks restart in each fold-file section.",
    ]
    if (table["keep"] == "best").any():
        parts += ["", KEEP_BEST_LEGEND + "."]
    warning = _warning(table)
    if warning:
        parts += ["", *(f"> **{line}**" for line in warning.splitlines())]
    for section in _sections(table):
        parts += ["", f"## {_section_title(section)}", "", _markdown_table(_display_frame(section))]
    return "\n".join(parts) + "\n"


def write_leaderboard(table: pd.DataFrame, oof_dir: str | Path, sort: str = "recall@1") -> tuple[Path, Path]:
    oof_dir = Path(oof_dir)
    csv_path, md_path = oof_dir / "leaderboard.csv", oof_dir / "leaderboard.md"
    save_text(csv_path, table.to_csv(index=False, float_format="%.6f"))
    save_text(md_path, render_markdown(table, sort))
    return csv_path, md_path
