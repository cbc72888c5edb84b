"""Blend stage: a weighted concatenation of experiments' embeddings, scored and weighted on OOF.

The blend (the "concatenated" ensemble of Musgrave et al.'s Metric Learning Reality Check, and what
Google Landmarks winners submitted): for each image, every member's L2-normalised embedding
``e_i`` is multiplied by ``sqrt(w_i)`` with weights summing to 1, the pieces are concatenated and
the result is L2-normalised again. Since every piece has norm ``sqrt(w_i)`` the concatenation
already has norm 1, and the inner product of two blended embeddings is the weighted sum of the
members' cosine similarities: ``<b, b'> = sum_i w_i cos(e_i, e_i')``. Weight 0 drops a member.

On OOF, within each fold, the members' ``oof/<exp>/fold<K>.npz`` rows are aligned by id and the
blend is scored with leave-one-out Recall@K / MAP@R (:func:`arcfold.retrieval.metrics.retrieval_metrics`).
"Overall" is the mean ± std over folds: every fold has its own models, so embeddings of different
folds do not share a space and are never pooled. The stage refuses, with the reason, to blend
experiments whose folds come from different fold files (``folds_sha256``), whose fold lists differ
(``--folds`` picks a common subset) or whose fold rows differ in ids or labels.

Weights (unless given with ``--weights``) are found by coordinate ascent on a grid: start from equal
weights, try every grid value for one member's weight with the others fixed, keep the best (strict
improvement only, so the result is deterministic), cycle over members until a full round changes
nothing. The objective is the mean over folds of ``--metric``. Two scores are reported:

* **in-sample**: weights searched on all folds, scored on the same folds (optimistic);
* **nested**: for each fold K, weights searched on the other folds only and scored on fold K; the
  mean over K is an honest estimate of what the search procedure gives on unseen data. The spec's
  ``weights`` are the in-sample ones (searched on every fold, the most data).

Blend spec, ``oof/blends/<name>.json`` (read by ``inference.py``; format ``arcfold.blend/1``)::

    {
      "format": "arcfold.blend/1",
      "name": "NAME",
      "created_at": "2026-01-01T12:00:00+00:00",            # UTC
      "experiments": ["exp_a", "exp_b"],                     # members, in concatenation order
      "weights": [0.6, 0.4],                                 # w_i >= 0, sum 1 (see above)
      "normalisation": "l2_weighted_concat",                 # concat(sqrt(w_i) * l2(e_i)), then l2
      "embedding_size": 1024,                                # sum of the members' sizes
      "folds": [0, 1, 2, 3], "n_splits": 4,
      "folds_sha256": "...",                                 # the fold file every member used
      "search": {"method": "coordinate_ascent" | "fixed", "metric": "recall@1", "grid": [...]},
      "scores": {
        "in_sample": {"per_fold": {"0": {"recall@1": ..., ...}, ...}, "mean": {...}, "std": {...}},
        "nested": {"per_fold": {...}, "weights": {"0": [...], ...}, "mean": {...}, "std": {...}} | null,
        "members": {"exp_a": {"per_fold": {...}, "mean": {...}, "std": {...}}, ...}
      }
    }

``nested`` is null when the weights were given (nothing was selected on OOF) or only one fold is
blended (nothing to hold out). To apply a spec at inference: embed with each member as usual
(fold ensemble, L2-normalised), then ``blend_embeddings([emb_a, emb_b], spec["weights"])``.

CLI::

    python -m arcfold blend --experiments exp_a exp_b [--weights 0.7 0.3] --name NAME [--metric recall@1]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from arcfold.artifacts import finished_folds
from arcfold.errors import ArtifactExistsError, BlendError
from arcfold.io import load_npz, save_json
from arcfold.retrieval.ensemble import (
    BLEND_FORMAT,
    NORMALISATION,
    blend_embeddings,
    l2_normalise,
    normalised_weights,
)
from arcfold.retrieval.metrics import DEFAULT_KS, retrieval_metrics

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_GRID",
    "BlendFold",
    "blend_experiments",
    "coordinate_ascent",
    "load_blend_folds",
]

DEFAULT_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
_MAX_EXAMPLES = 5


@dataclass
class BlendFold:
    """One fold's rows, aligned across members: ``members[i][j]`` is member i's embedding of ``ids[j]``."""

    fold: int
    ids: np.ndarray  # (N,)
    labels: np.ndarray  # (N,)
    members: list[np.ndarray]  # each (N, D_i) float32, L2-normalised


# --------------------------------------------------------------------------------------------
# the blend itself


# --------------------------------------------------------------------------------------------
# loading and checking the members' OOF


def _examples(values) -> str:
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:_MAX_EXAMPLES])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_EXAMPLES else "")


def load_blend_folds(
    oof_dir: str | Path, experiments: Sequence[str], folds: Sequence[int] | None = None
) -> tuple[list[BlendFold], dict[str, Any]]:
    """Load and align the members' OOF rows fold by fold; refuse anything that is not comparable.

    Returns the folds and ``{"folds_sha256", "n_splits", "embedding_sizes"}``.

    Long because each refusal (fold files, fold lists, ids, labels) is checked and explained in the order a user
    meets them.
    """
    oof_dir = Path(oof_dir)
    if len(set(experiments)) != len(experiments):
        raise BlendError(f"an experiment is listed twice: {list(experiments)}")
    finished: dict[str, list[int]] = {}
    for exp in experiments:
        exp_dir = oof_dir / exp
        finished[exp] = finished_folds(exp_dir) if exp_dir.is_dir() else []
        if not finished[exp]:
            raise BlendError(f"experiment '{exp}' has no finished fold in {exp_dir} (expected fold<K>.npz + .json)")
    if folds is None:
        fold_sets = {tuple(f) for f in finished.values()}
        if len(fold_sets) > 1:
            listing = "; ".join(f"{exp}: {' '.join(map(str, f))}" for exp, f in finished.items())
            common = sorted(set.intersection(*(set(f) for f in finished.values())))
            hint = f"; pass --folds {' '.join(map(str, common))} to blend the common ones" if common else ""
            raise BlendError(f"the experiments have different finished folds ({listing}){hint}")
        folds = list(finished[experiments[0]])
    else:
        for exp in experiments:
            missing = sorted(set(folds) - set(finished[exp]))
            if missing:
                raise BlendError(f"fold {' '.join(map(str, missing))} of experiment '{exp}' is missing (not finished)")

    shas: dict[tuple[str, int], str | None] = {}
    n_splits: set[int] = set()
    for exp in experiments:
        for k in folds:
            scores = json.loads((oof_dir / exp / f"fold{k}.json").read_text(encoding="utf-8"))
            shas[(exp, k)] = scores.get("folds_sha256")
            config_path = oof_dir / exp / f"fold{k}.config.yaml"
            if config_path.is_file():
                value = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("folds", {}).get("n_splits")
                if value is not None:
                    n_splits.add(int(value))
    distinct = sorted({s or "(none)" for s in shas.values()})
    if len(distinct) > 1:
        by_sha = {s: sorted({f"{e}/fold{k}" for (e, k), v in shas.items() if (v or "(none)") == s}) for s in distinct}
        listing = "; ".join(f"{s[:12]}: {', '.join(names)}" for s, names in by_sha.items())
        raise BlendError(
            f"the experiments were validated on different fold files (folds_sha256 differ: {listing}); "
            "their OOF rows are different images, so they cannot be blended"
        )

    blend_folds = []
    sizes: list[int] = []
    for k in folds:
        arrays = [load_npz(oof_dir / exp / f"fold{k}.npz") for exp in experiments]
        ids = arrays[0]["ids"].astype(str)
        labels = arrays[0]["labels"].astype(str)
        index = pd.Index(ids)
        if not index.is_unique:
            raise BlendError(
                f"fold {k} of '{experiments[0]}' has duplicate ids: {_examples(index[index.duplicated()])}"
            )
        members = []
        for exp, arr in zip(experiments, arrays, strict=True):
            other = arr["ids"].astype(str)
            pos = pd.Index(other).get_indexer(ids) if pd.Index(other).is_unique else None
            if pos is None:
                raise BlendError(f"fold {k} of '{exp}' has duplicate ids")
            missing, extra = ids[pos < 0], np.setdiff1d(other, ids)
            if len(missing) or len(extra):
                raise BlendError(
                    f"fold {k}: experiments '{experiments[0]}' and '{exp}' hold different images "
                    f"({len(missing)} ids only in '{experiments[0]}': {_examples(missing)}; "
                    f"{len(extra)} only in '{exp}': {_examples(extra)})"
                )
            other_labels = arr["labels"].astype(str)[pos]
            differ = np.flatnonzero(other_labels != labels)
            if len(differ):
                raise BlendError(
                    f"fold {k}: experiments '{experiments[0]}' and '{exp}' label the same ids differently "
                    f"({len(differ)} rows, e.g. id {ids[differ[0]]!r}: "
                    f"{labels[differ[0]]!r} vs {other_labels[differ[0]]!r})"
                )
            members.append(l2_normalise(arr["embeddings"][pos]))  # (N, D_i), rows in the first member's order
        sizes = [m.shape[1] for m in members]
        blend_folds.append(BlendFold(fold=int(k), ids=ids, labels=labels, members=members))
    info = {
        "folds_sha256": distinct[0] if distinct[0] != "(none)" else None,
        "n_splits": n_splits.pop() if len(n_splits) == 1 else None,
        "embedding_sizes": sizes,
    }
    return blend_folds, info


# --------------------------------------------------------------------------------------------
# scoring and weight search


class _Scorer:
    """Per-fold metrics of a weight vector, memoised: the nested and in-sample searches revisit the same points."""

    def __init__(self, folds: Sequence[BlendFold], ks: Sequence[int] = DEFAULT_KS) -> None:
        self.folds = {f.fold: f for f in folds}
        self.ks = tuple(ks)
        self.cache: dict[tuple[int, tuple[float, ...]], dict[str, float]] = {}

    @staticmethod
    def key(weights: Sequence[float]) -> tuple[float, ...]:
        w = np.asarray(weights, dtype=np.float64)
        return tuple(round(float(x), 9) for x in w / w.sum())

    def metrics(self, fold: int, weights: Sequence[float]) -> dict[str, float]:
        key = (fold, self.key(weights))
        if key not in self.cache:
            f = self.folds[fold]
            # members of weight 0 add zero columns only: leave them out, the similarities are the same
            kept = [(m, w) for m, w in zip(f.members, weights, strict=True) if w > 0]
            blended = blend_embeddings([m for m, _ in kept], [w for _, w in kept])
            self.cache[key] = retrieval_metrics(blended, f.labels, ks=self.ks)
        return self.cache[key]

    def objective(self, folds: Sequence[int], weights: Sequence[float], metric: str) -> float:
        values = [self.metrics(k, weights)[metric] for k in folds]
        return float(np.mean(values))


def coordinate_ascent(
    objective, n_members: int, grid: Sequence[float] = DEFAULT_GRID, max_rounds: int = 20
) -> tuple[np.ndarray, float]:
    """Maximise ``objective(weights)`` over ``weights in grid^n`` one coordinate at a time, from all ones.

    Only strict improvements are taken and candidates are tried in grid order, so the result is
    deterministic. All-zero candidates are skipped. Returns (weights rescaled to sum 1, best value).

    >>> coordinate_ascent(lambda w: -abs(w[0] / w.sum() - 0.75), 2, grid=(0, 1, 2, 3))
    (array([0.75, 0.25]), -0.0)
    """
    weights = np.ones(n_members)
    best = objective(weights)
    for _ in range(max_rounds):
        changed = False
        for i in range(n_members):
            for value in grid:
                candidate = weights.copy()
                candidate[i] = value
                if candidate.sum() <= 0 or np.allclose(candidate / candidate.sum(), weights / weights.sum()):
                    continue
                score = objective(candidate)
                if score > best + 1e-12:
                    best, weights, changed = score, candidate, True
        if not changed:
            break
    return weights / weights.sum(), float(best)


def _summary(per_fold: dict[int, dict[str, float]]) -> dict[str, Any]:
    frame = pd.DataFrame.from_dict(per_fold, orient="index")
    frame = frame[[c for c in frame.columns if c.startswith(("recall@", "map@"))]]
    return {
        "per_fold": {str(k): {m: float(v) for m, v in row.items()} for k, row in per_fold.items()},
        "mean": {m: float(v) for m, v in frame.mean().items()},
        "std": {m: float(v) for m, v in frame.std(ddof=0).items()},
    }


def blend_experiments(
    oof_dir: str | Path,
    experiments: Sequence[str],
    name: str,
    weights: Sequence[float] | None = None,
    metric: str = "recall@1",
    folds: Sequence[int] | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    force: bool = False,
    out_path: str | Path | None = None,
) -> dict[str, Any]:
    """Score (and unless ``weights`` are given, weight) a blend on OOF; write and return its spec."""
    oof_dir = Path(oof_dir)
    out_path = Path(out_path) if out_path is not None else oof_dir / "blends" / f"{name}.json"
    if out_path.exists() and not force:
        raise ArtifactExistsError(f"blend spec {out_path} exists; pass --force to overwrite it")
    experiments = list(experiments)
    if len(experiments) < 1:
        raise BlendError("name at least one experiment")
    blend_folds, info = load_blend_folds(oof_dir, experiments, folds)
    fold_ids = [f.fold for f in blend_folds]
    scorer = _Scorer(blend_folds)
    n = len(experiments)
    probe = scorer.metrics(fold_ids[0], np.ones(n))
    if metric not in probe:
        raise BlendError(f"unknown metric {metric!r}; choose from {', '.join(k for k in probe if '@' in k)}")

    def search(on_folds: Sequence[int]) -> np.ndarray:
        w, _ = coordinate_ascent(lambda c: scorer.objective(on_folds, c, metric), n, grid)
        return w

    members = {}
    for i, exp in enumerate(experiments):
        one_hot = np.eye(n)[i]
        members[exp] = _summary({k: scorer.metrics(k, one_hot) for k in fold_ids})

    nested = None
    if weights is not None:
        final = normalised_weights(weights, n)
        search_info: dict[str, Any] = {"method": "fixed", "metric": metric}
    else:
        search_info = {"method": "coordinate_ascent", "metric": metric, "grid": [float(g) for g in grid]}
        final = search(fold_ids) if n > 1 else np.ones(1)
        if n > 1 and len(fold_ids) > 1:
            nested_weights = {k: search([j for j in fold_ids if j != k]) for k in fold_ids}
            nested = _summary({k: scorer.metrics(k, nested_weights[k]) for k in fold_ids})
            nested["weights"] = {str(k): [float(x) for x in w] for k, w in nested_weights.items()}
        elif n > 1:
            log.warning("one fold only: no nested estimate, the in-sample score of searched weights is optimistic")
    in_sample = _summary({k: scorer.metrics(k, final) for k in fold_ids})

    spec = {
        "format": BLEND_FORMAT,
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "experiments": experiments,
        "weights": [float(x) for x in final],
        "normalisation": NORMALISATION,
        "embedding_size": int(sum(info["embedding_sizes"])),
        "folds": fold_ids,
        "n_splits": info["n_splits"],
        "folds_sha256": info["folds_sha256"],
        "search": search_info,
        "scores": {"in_sample": in_sample, "nested": nested, "members": members},
    }
    save_json(out_path, spec)
    log.info("wrote %s (%d metric evaluations)", out_path, len(scorer.cache))
    return spec


def render_blend(spec: dict[str, Any]) -> str:
    """Per-fold table of the members, the in-sample blend and the nested blend on the search metric."""
    metric = spec["search"]["metric"]
    scores = spec["scores"]
    rows = {}
    for exp, s in scores["members"].items():
        rows[exp] = {**{f"fold {k}": v[metric] for k, v in s["per_fold"].items()}, "mean": s["mean"][metric]}
    weights = ", ".join(f"{w:.2f}" for w in spec["weights"])
    ins = scores["in_sample"]
    rows[f"blend in-sample [{weights}]"] = {
        **{f"fold {k}": v[metric] for k, v in ins["per_fold"].items()},
        "mean": ins["mean"][metric],
    }
    if scores["nested"]:
        nes = scores["nested"]
        rows["blend nested"] = {
            **{f"fold {k}": v[metric] for k, v in nes["per_fold"].items()},
            "mean": nes["mean"][metric],
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    lines = [f"blend '{spec['name']}': {metric} per fold", table.to_string(float_format=lambda v: f"{v:.4f}")]
    if scores["nested"]:
        for k, w in scores["nested"]["weights"].items():
            lines.append(
                f"  nested weights for fold {k} (searched on the other folds): {', '.join(f'{x:.2f}' for x in w)}"
            )
    best_member = max(scores["members"], key=lambda e: scores["members"][e]["mean"][metric])
    best = scores["members"][best_member]["mean"][metric]
    honest = scores["nested"] or ins
    kind = "nested" if scores["nested"] else "in-sample"
    lines.append(
        f"{kind} {metric} {honest['mean'][metric]:.4f} vs best member '{best_member}' {best:.4f} "
        f"({honest['mean'][metric] - best:+.4f})"
    )
    return "\n".join(lines)
