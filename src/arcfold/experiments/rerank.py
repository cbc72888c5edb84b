"""Rerank stage: choose post-processing on OOF embeddings, with an honest (nested) estimate of what it gains.

Post-processors (:mod:`arcfold.postprocess`): database-side augmentation ``dba``, α-query expansion ``qe``,
k-reciprocal re-ranking ``kr``, alone and combined (always in that order), and for recognition the label
vote over the top neighbours with a "new / unknown" threshold. Each is applied to the OOF embeddings of an
experiment (or of a blend, with the blend's weights), fold by fold; embeddings of different folds come from
different models and are never mixed.

Evaluation per fold
    A seeded query/gallery split of the fold's images that mimics a test set (:func:`recognition_split`): of every
    class, half of the images (rounded down; singletons stay in the gallery) are queries and the rest the gallery;
    with ``--task recognition`` a fraction ``--new-fraction`` of the classes is "new": all their images are queries
    whose truth is ``--new-label`` and none is in the gallery. Queries and gallery are disjoint, as at test time:
    leave-one-out inside one set would flatter DBA (a query would be part of its neighbours' augmented vectors).

    *retrieval* (always): Recall@1/5/10 and MAP@R (R = the class's gallery images) of the re-ranked lists of the
    queries whose class is in the gallery (lists of depth ``max(10, max R)``, so MAP@R is exact).

    *recognition*: queries are answered by the label vote; scored by MAP@5 (the new label counts as a label) and
    GAP (the best known label and its confidence).

Parameter search (grids in :data:`DEFAULT_GRIDS`): a single method tries its whole grid; a combination starts
from its members' best single settings and moves one parameter at a time over its grid while the objective
strictly improves (deterministic). The vote's ``k``, ``mode`` and ``threshold`` are searched with every
setting. The objective is the mean over the selection folds of ``--metric`` (default ``map@r`` for retrieval,
``map@5`` for recognition).

Honesty, as in blending: the **nested** score of a method is, for each fold K, the score on K of the settings
chosen on the other folds; its mean over K estimates what the method gives on unseen data. With a single
fold the fold's classes are split in two seeded halves which play the role of folds (each half is then a
smaller gallery, so its absolute numbers are not the fold's). The written settings are chosen on all folds.
A method is switched on (``enabled``) only if its nested score beats no post-processing by more than
``--min-gain``; otherwise the spec says ``none`` and inference only searches. The reported ``gain`` is that of
the method with the best nested score among the N compared (``n_compared``, ``none`` included): a maximum of N
noisy estimates, so slightly optimistic; the spec (``gain_note``) and the ``.md`` report say so.

Output, ``oof/<exp>/rerank-<task>.json`` or ``oof/blends/<blend>.rerank-<task>.json`` (format
``arcfold.rerank/1``; :func:`spec_path`), and a Markdown table beside it (``.md``)::

    {
      "format": "arcfold.rerank/1", "name": "NAME", "created_at": "...",
      "source": {"experiment": "exp"} | {"blend": "oof/blends/b.json", "experiments": [...], "weights": [...]},
      "task": "retrieval" | "recognition", "metric": "map@r", "folds": [0, 1], "nesting": "folds" | "class_halves",
      "enabled": "dba+qe",                       # or "none"
      "gain": 0.012, "n_compared": 8,            # nested gain of the enabled method over "none", best of N
      "gain_note": "best of 8 nested scores (8 methods compared): slightly optimistic",
      "steps": [{"name": "dba", "k": 2, "alpha": 3.0}, {"name": "qe", "k": 2, "alpha": 3.0}],  # what inference runs
      "vote": {"k": 5, "mode": "max", "threshold": 0.45, "new_label": "new_individual"} | null,
      "methods": {"none": {"steps": [], "vote": ..., "nested": {metric: mean}, "nested_per_fold": {...},
                           "in_sample": {metric: mean}}, "dba": {...}, ...}
    }

CLI::

    python -m arcfold rerank --experiment NAME [--task recognition] [--metric map@r] [--folds 1 2 3]
    python -m arcfold rerank --blend oof/blends/NAME.json
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from arcfold.errors import ArtifactExistsError, RerankError
from arcfold.experiments.blend import load_blend_folds
from arcfold.io import save_json, save_text
from arcfold.retrieval.ensemble import blend_embeddings, load_blend_spec
from arcfold.retrieval.metrics import map_at_r, recall_at_k
from arcfold.retrieval.postprocess import RERANK_FORMAT, rerank_pipeline, spec_path
from arcfold.retrieval.submission import global_average_precision
from arcfold.retrieval.voting import vote_labels

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_GRIDS",
    "METHODS",
    "FoldData",
    "rerank_search",
]

DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "dba": {"k": [1, 2, 3, 5, 10], "alpha": [0.0, 1.0, 3.0]},
    "qe": {"k": [1, 2, 3, 5, 10], "alpha": [0.0, 1.0, 3.0]},
    "kr": {"k1": [10, 20, 30], "k2": [3, 6], "lambda": [0.1, 0.3, 0.6]},
}
VOTE_GRID: dict[str, list] = {
    "k": [5, 20],
    "mode": ["max", "sum"],
    "threshold": [round(float(t), 2) for t in np.arange(-0.2, 1.0001, 0.05)],
}
METHODS = ("none", "dba", "qe", "kr", "dba+qe", "dba+kr", "qe+kr", "dba+qe+kr")
RETRIEVAL_KS = (1, 5, 10)
DEFAULT_NEW_LABEL = "new_individual"


@dataclass
class FoldData:
    """One evaluation fold: L2-normalised embeddings (N, D) and labels (N,) of the held-out images."""

    fold: int
    embeddings: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------------------------------------------------
# evaluation of one setting on one fold


def metric_names(task: str) -> list[str]:
    """The metrics reported (and selectable) for a task."""
    return [f"recall@{k}" for k in RETRIEVAL_KS] + ["map@r"] + (["map@5", "gap"] if task == "recognition" else [])


def _steps_for(method: str, params: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    if method == "none":
        return []
    return [{"name": name, **params[name]} for name in method.split("+")]


def _key(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def recognition_split(labels: np.ndarray, new_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded query/gallery split of one fold: (query rows, gallery rows, query is-new flags); see module doc."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    n_new = int(round(new_fraction * len(classes)))
    new_classes = set(rng.choice(classes, size=n_new, replace=False).tolist()) if n_new else set()
    queries, gallery = [], []
    for c in classes:
        rows = np.flatnonzero(labels == c)
        if c in new_classes:
            queries.extend(rows.tolist())
            continue
        rows = rng.permutation(rows)
        n_query = len(rows) // 2  # singletons stay gallery-only
        queries.extend(rows[:n_query].tolist())
        gallery.extend(rows[n_query:].tolist())
    queries, gallery = np.sort(np.asarray(queries, dtype=np.int64)), np.sort(np.asarray(gallery, dtype=np.int64))
    is_new = np.isin(labels[queries], list(new_classes))
    return queries, gallery, is_new


def map5_by_threshold(
    labels: np.ndarray, scores: np.ndarray, truth: np.ndarray, is_new: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """MAP@5 for every new-label threshold at once, from one vote without the new label; (T,) float64.

    ``labels``/``scores`` (Q, 5) from :func:`arcfold.retrieval.voting.vote_labels` (best first, NaN score =
    padding), ``truth`` (Q,) the true labels, ``is_new`` (Q,) whether the truth is the new label. Inserting the new
    label at threshold t puts it at position p = the number of scores >= t (vote_labels' rule), pushing the labels
    from p on one place down (the 5th falls out). So a new query scores 1/(p+1) if p < 5, and a known query whose
    label is at rank r scores 1/(r+1) if r < p, else 1/(r+2) if r + 1 < 5, else 0 -- the same numbers as
    re-running the vote for every threshold, without re-running it (checked in tests/experiments/test_rerank.py).
    """
    scores = np.where(np.isnan(scores), -np.inf, scores)  # padding is never ahead of the new label
    hit = labels == truth[:, None]  # (Q, 5)
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)  # (Q,) the truth's rank, -1 if not in the list
    p = (scores[:, None, :] >= thresholds[None, :, None]).sum(axis=2)  # (Q, T) the new label's position
    new_score = np.where(p < 5, 1.0 / (p + 1), 0.0)  # (Q, T)
    r = np.maximum(rank, 0)[:, None]  # (Q, 1); absent truths are zeroed below
    known_score = np.where(
        rank[:, None] < 0, 0.0, np.where(r < p, 1.0 / (r + 1), np.where(r + 1 < 5, 1.0 / (r + 2), 0.0))
    )  # (Q, T)
    return np.where(is_new[:, None], new_score, known_score).mean(axis=0)


class _Evaluator:
    """Scores of (steps, vote) settings on folds, memoised (the searches revisit the same settings)."""

    def __init__(
        self, folds: Sequence[FoldData], task: str, new_fraction: float, new_label: str, seed: int, search_kwargs
    ) -> None:
        self.folds = {f.fold: f for f in folds}
        self.task = task
        self.new_label = new_label
        self.search_kwargs = dict(search_kwargs)
        self.cache: dict[tuple[int, str], dict[str, float]] = {}
        self.neighbours: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self.splits: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.depth: dict[int, int] = {}
        for f in folds:
            q, g, is_new = recognition_split(f.labels, new_fraction if task == "recognition" else 0.0, seed + f.fold)
            if len(g) == 0 or len(q) == 0:
                raise RerankError(f"fold {f.fold}: the query/gallery split has no queries or no gallery")
            self.splits[f.fold] = (q, g, is_new)
            n_relevant = pd.Series(f.labels[g]).value_counts()
            wanted = max(max(RETRIEVAL_KS), int(n_relevant.max()), max(VOTE_GRID["k"]) if task == "recognition" else 0)
            self.depth[f.fold] = min(wanted, len(g))

    def ranked(self, fold: int, steps: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """The fold's queries' re-ranked gallery neighbours: (sims, idx), each (Q, depth), idx into the gallery."""

        key = (fold, _key(steps))
        if key not in self.neighbours:
            f = self.folds[fold]
            q, g, _ = self.splits[fold]
            self.neighbours[key] = rerank_pipeline(
                f.embeddings[q], f.embeddings[g], steps, self.depth[fold], **self.search_kwargs
            )
        return self.neighbours[key]

    def retrieval(self, fold: int, steps: list[dict]) -> dict[str, float]:
        """Recall@K and MAP@R of the queries whose class is in the gallery (R = its gallery images)."""
        key = (fold, "retrieval" + _key(steps))
        if key not in self.cache:
            f = self.folds[fold]
            q, g, _ = self.splits[fold]
            _, idx = self.ranked(fold, steps)
            gallery_labels = f.labels[g]
            n_relevant = pd.Series(gallery_labels).value_counts().reindex(f.labels[q]).fillna(0).to_numpy(np.int64)
            keep = n_relevant >= 1
            nbr = gallery_labels[idx[keep]]  # (Q', depth)
            depth = idx.shape[1]
            recall = recall_at_k(nbr, f.labels[q][keep], sorted({min(k, depth) for k in RETRIEVAL_KS}))
            out = {f"recall@{k}": recall[min(k, depth)] for k in RETRIEVAL_KS}  # K > depth: the whole gallery
            out["map@r"] = map_at_r(nbr, f.labels[q][keep], np.minimum(n_relevant[keep], depth))
            self.cache[key] = out
        return self.cache[key]

    def voted(self, fold: int, steps: list[dict], k: int, mode: str) -> dict[str, Any]:
        """The vote without the new label: MAP@5 for every threshold of the grid at once, and GAP."""

        key = (fold, "voted" + _key([steps, k, mode]))
        if key not in self.cache:
            f = self.folds[fold]
            q, g, is_new = self.splits[fold]
            sims, idx = self.ranked(fold, steps)
            labels, scores = vote_labels(idx, sims, f.labels[g], k=min(k, idx.shape[1]), mode=mode, top=5)
            truth = f.labels[q]
            curve = map5_by_threshold(labels, scores, truth, is_new, np.asarray(VOTE_GRID["threshold"]))
            # GAP: the best label and its confidence; a query of a new class has nothing to find
            first = [row[0] for row in labels]
            gap = global_average_precision(first, scores[:, 0], np.where(is_new, None, truth).tolist())
            self.cache[key] = {"curve": curve, "gap": gap}
        return self.cache[key]

    def recognition(self, fold: int, steps: list[dict], vote: dict[str, Any]) -> dict[str, float]:
        """MAP@5 (new label included) and GAP (best known label) of the label vote."""
        voted = self.voted(fold, steps, vote["k"], vote["mode"])
        at = VOTE_GRID["threshold"].index(vote["threshold"])
        return {"map@5": float(voted["curve"][at]), "gap": voted["gap"]}

    def metrics(self, fold: int, steps: list[dict], vote: dict[str, Any] | None) -> dict[str, float]:
        out = dict(self.retrieval(fold, steps))
        if self.task == "recognition" and vote is not None:
            out.update(self.recognition(fold, steps, vote))
        return out


# --------------------------------------------------------------------------------------------------------------------
# the search


def _vote_settings() -> list[dict[str, Any]]:
    return [dict(zip(VOTE_GRID, values, strict=True)) for values in itertools.product(*VOTE_GRID.values())]


class _Search:
    def __init__(self, evaluator: _Evaluator, metric: str, grids: dict[str, dict[str, list]]) -> None:
        self.ev = evaluator
        self.metric = metric
        self.grids = grids

    def objective(self, folds: Sequence[int], steps: list[dict]) -> tuple[float, dict | None]:
        """Mean of the metric over ``folds``, and for recognition the vote setting that is best for these steps."""
        vote = self.best_vote(folds, steps) if self.ev.task == "recognition" else None
        return float(np.mean([self.ev.metrics(k, steps, vote)[self.metric] for k in folds])), vote

    def best_vote(self, folds: Sequence[int], steps: list[dict]) -> dict[str, Any]:
        """The vote setting (k, mode, threshold) that maximises MAP@5 (or GAP) over ``folds`` for these steps."""
        best, best_vote = -np.inf, None
        for k, mode in itertools.product(VOTE_GRID["k"], VOTE_GRID["mode"]):
            voted = [self.ev.voted(fold, steps, k, mode) for fold in folds]
            if self.metric == "gap":  # GAP ignores the threshold: keep the grid's first
                values = np.full(len(VOTE_GRID["threshold"]), np.mean([v["gap"] for v in voted]))
            else:
                values = np.mean([v["curve"] for v in voted], axis=0)  # (T,) MAP@5 per threshold
            at = int(np.argmax(values))  # first maximum: the lowest threshold among equals
            if values[at] > best + 1e-12:
                best, best_vote = float(values[at]), {"k": k, "mode": mode, "threshold": VOTE_GRID["threshold"][at]}
        return best_vote

    def single(self, name: str, folds: Sequence[int]) -> dict[str, Any]:
        grid = self.grids[name]
        best, best_params = -np.inf, None
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values, strict=True))
            value, _ = self.objective(folds, [{"name": name, **params}])
            if value > best + 1e-12:
                best, best_params = value, params
        return best_params

    def choose(self, method: str, folds: Sequence[int]) -> tuple[list[dict], dict | None]:
        """Settings of ``method`` chosen on ``folds``: (steps, vote)."""
        if method == "none":
            return [], self.objective(folds, [])[1]
        names = method.split("+")
        params = {name: self.single(name, folds) for name in names}
        if len(names) > 1:  # coordinate ascent from the singles' optimum
            best, _ = self.objective(folds, _steps_for(method, params))
            changed = True
            while changed:
                changed = False
                for name in names:
                    for param, values in self.grids[name].items():
                        for value in values:
                            if value == params[name][param]:
                                continue
                            trial = {n: dict(p) for n, p in params.items()}
                            trial[name][param] = value
                            score, _ = self.objective(folds, _steps_for(method, trial))
                            if score > best + 1e-12:
                                best, params, changed = score, trial, True
        steps = _steps_for(method, params)
        return steps, self.objective(folds, steps)[1]


def _split_classes(fold: FoldData, seed: int) -> list[FoldData]:
    classes = np.unique(fold.labels)
    rng = np.random.default_rng(seed)
    half = set(rng.permutation(classes)[: len(classes) // 2].tolist())
    mask = np.isin(fold.labels, list(half))
    return [
        FoldData(fold=0, embeddings=fold.embeddings[mask], labels=fold.labels[mask]),
        FoldData(fold=1, embeddings=fold.embeddings[~mask], labels=fold.labels[~mask]),
    ]


def rerank_search(
    folds: Sequence[FoldData],
    *,
    task: str = "retrieval",
    metric: str | None = None,
    methods: Sequence[str] = METHODS,
    grids: dict[str, dict[str, list]] | None = None,
    new_fraction: float = 0.2,
    new_label: str = DEFAULT_NEW_LABEL,
    min_gain: float = 0.0,
    seed: int = 0,
    search_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Choose post-processing on OOF folds; returns the spec body (see module doc) without name/source."""
    if task not in ("retrieval", "recognition"):
        raise RerankError(f"task must be 'retrieval' or 'recognition', got {task!r}")
    metric = metric or ("map@r" if task == "retrieval" else "map@5")
    allowed = metric_names(task)
    if metric not in allowed:
        raise RerankError(f"metric {metric!r} is not available for task {task}; choose one of {', '.join(allowed)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise RerankError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    methods = ["none", *[m for m in methods if m != "none"]]
    grids = {**DEFAULT_GRIDS, **(grids or {})}
    nesting = "folds"
    if len(folds) == 1:
        folds, nesting = _split_classes(folds[0], seed), "class_halves"
        log.info("one fold: its classes are split in two halves that play the role of folds for the nested score")
    evaluator = _Evaluator(folds, task, new_fraction, new_label, seed, search_kwargs or {})
    search = _Search(evaluator, metric, grids)
    fold_ids = [f.fold for f in folds]

    result: dict[str, Any] = {}
    for method in methods:
        started = time.perf_counter()
        per_fold = {}
        for held in fold_ids:
            rest = [k for k in fold_ids if k != held]
            steps, vote = search.choose(method, rest)
            per_fold[str(held)] = {"steps": steps, "vote": vote, **evaluator.metrics(held, steps, vote)}
        steps, vote = search.choose(method, fold_ids)
        in_sample = pd.DataFrame([evaluator.metrics(k, steps, vote) for k in fold_ids]).mean().to_dict()
        nested = pd.DataFrame(
            [{m: v for m, v in row.items() if m not in ("steps", "vote")} for row in per_fold.values()]
        ).mean()
        result[method] = {
            "steps": steps,
            "vote": vote,
            "nested": {m: float(v) for m, v in nested.items()},
            "nested_per_fold": per_fold,
            "in_sample": {m: float(v) for m, v in in_sample.items()},
            "seconds": round(time.perf_counter() - started, 2),
        }
        log.info(
            "%-10s nested %s %.4f (in-sample %.4f) in %.1f s",
            method,
            metric,
            result[method]["nested"][metric],
            result[method]["in_sample"][metric],
            result[method]["seconds"],
        )
    baseline = result["none"]["nested"][metric]
    best = max(methods, key=lambda m: (result[m]["nested"][metric], -methods.index(m)))
    enabled = best if result[best]["nested"][metric] > baseline + min_gain else "none"
    n_compared = len(methods)
    return {
        "task": task,
        "metric": metric,
        "folds": fold_ids if nesting == "folds" else [int(f) for f in fold_ids],
        "nesting": nesting,
        "enabled": enabled,
        "steps": result[enabled]["steps"],
        "vote": {**result[enabled]["vote"], "new_label": new_label} if task == "recognition" else None,
        "gain": result[enabled]["nested"][metric] - baseline,
        "n_compared": n_compared,
        "gain_note": gain_note(n_compared),
        "methods": result,
    }


# --------------------------------------------------------------------------------------------------------------------
# files


def load_rerank_folds(
    oof_dir: Path, experiments: list[str], weights: list[float], folds: Sequence[int] | None = None
) -> list[FoldData]:
    blend_folds, _ = load_blend_folds(oof_dir, experiments, folds)
    return [
        FoldData(fold=bf.fold, embeddings=blend_embeddings(bf.members, weights), labels=bf.labels) for bf in blend_folds
    ]


def gain_note(n_compared: int) -> str:
    """What the reported gain is: the best of ``n_compared`` nested scores, so slightly optimistic."""
    return f"best of {n_compared} nested scores ({n_compared} methods compared): slightly optimistic"


def render_rerank(spec: dict[str, Any]) -> str:
    """Markdown table: each method's chosen settings and nested scores, with the gain over no post-processing."""
    metric = spec["metric"]
    columns = (
        [f"recall@{k}" for k in RETRIEVAL_KS] + ["map@r"] + (["map@5", "gap"] if spec["task"] == "recognition" else [])
    )
    base = spec["methods"]["none"]["nested"]
    lines = [
        f"# Re-ranking on OOF: {spec['name']}",
        "",
        f"task {spec['task']}, selection metric {metric}, nested over {spec['nesting']} {spec['folds']}; "
        f"enabled: **{spec['enabled']}** (gain {spec['gain']:+.4f}"
        + (f", the {spec['gain_note']})" if "gain_note" in spec else ")"),
        "",
        "| method | settings (chosen on all folds) | " + " | ".join(columns) + f" | Δ {metric} |",
        "|---|---|" + "---|" * (len(columns) + 1),
    ]
    for method, row in spec["methods"].items():
        settings = "; ".join(
            f"{s['name']} " + " ".join(f"{k}={v}" for k, v in s.items() if k != "name") for s in row["steps"]
        )
        if row.get("vote"):
            settings += ("; " if settings else "") + "vote " + " ".join(f"{k}={v}" for k, v in row["vote"].items())
        cells = " | ".join(f"{row['nested'][c]:.4f}" for c in columns)
        lines.append(f"| {method} | {settings or '—'} | {cells} | {row['nested'][metric] - base[metric]:+.4f} |")
    lines += ["", "Scores are nested: each fold scored with settings chosen on the other folds."]
    if "n_compared" in spec:
        lines.append(
            f"The method is then chosen as the best of these {spec['n_compared']} nested scores, so the reported gain "
            "is the maximum of noisy estimates: slightly optimistic."
        )
    lines.append("")
    return "\n".join(lines)


def rerank_experiment(
    oof_dir: Path,
    task: str,
    *,
    experiment: str | None = None,
    blend: str | Path | None = None,
    force: bool = False,
    folds: Sequence[int] | None = None,
    **search: Any,
) -> tuple[dict[str, Any], Path]:
    """Search the post-processing of an experiment (or a blend spec) on its OOF folds and write the rerank spec
    (``rerank-<task>.json`` and its ``.md`` table); ``search`` goes to :func:`rerank_search`. Refuses to overwrite
    an existing spec unless ``force``. Returns the spec and its path."""
    if experiment:
        experiments, weights = [experiment], [1.0]
        name, out = experiment, spec_path(oof_dir, task, experiment=experiment)
        source_info: dict[str, Any] = {"experiment": experiment}
    else:
        blend_path = Path(blend)
        blend_spec = load_blend_spec(blend_path)
        experiments, weights = list(blend_spec["experiments"]), list(blend_spec["weights"])
        name, out = blend_spec["name"], spec_path(oof_dir, task, blend=blend_path)
        source_info = {"blend": str(blend_path), "experiments": experiments, "weights": weights}
    if out.exists() and not force:
        raise ArtifactExistsError(f"{out} exists; pass --force to search again and overwrite it")
    fold_data = load_rerank_folds(oof_dir, experiments, weights, folds)
    log.info("%s: %d fold(s), %s images", name, len(fold_data), "+".join(str(len(f.labels)) for f in fold_data))
    spec = {
        "format": RERANK_FORMAT,
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source_info,
        **rerank_search(fold_data, task=task, **search),
    }
    save_json(out, spec)
    save_text(out.with_suffix(".md"), render_rerank(spec))
    return spec, out
