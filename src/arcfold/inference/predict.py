"""From embeddings to predictions: the rerank spec inference runs (found, checked), and the labels of a
recognition / top-5 submission. See steps 3-4 of :mod:`arcfold.inference.run`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arcfold.errors import ConfigError
from arcfold.inference.config import (
    InferenceConfig,
)
from arcfold.inference.ensemble import (
    Ensemble,
)
from arcfold.retrieval.postprocess import rerank_pipeline, spec_path
from arcfold.retrieval.search import search
from arcfold.retrieval.voting import fill_labels, vote_labels

log = logging.getLogger(__name__)

__all__ = ["TOP5_DEPTH", "check_rerank_spec", "find_rerank_spec", "predict_labels", "top5_width"]

TOP5_DEPTH = 50  # neighbours searched for a top5 submission (at least vote.k): enough to fill 5 labels


def find_rerank_spec(cfg: InferenceConfig, ensemble: Ensemble) -> Path | None:
    """The rerank spec to apply: ``rerank`` as a path, or for ``auto`` the rerank stage's file for this task."""

    if cfg.rerank == "none":
        return None
    if cfg.rerank != "auto":
        path = Path(cfg.rerank)
        if not path.is_file():
            raise FileNotFoundError(f"rerank spec {path} not found (rerank=auto finds one, rerank=none turns it off)")
        return path
    task = "retrieval" if cfg.submission.format == "retrieval" else "recognition"
    if ensemble.blend_path is not None:
        candidates = [spec_path(cfg.oof_dir, task, blend=ensemble.blend_path)]
    else:
        candidates = [spec_path(d, task, experiment=ensemble.name) for d in (cfg.oof_dir, cfg.models_dir)]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and task == "recognition":
        source = f"--experiment {ensemble.name}" if ensemble.blend_path is None else f"--blend {ensemble.blend_path}"
        raise FileNotFoundError(
            f"submission.format={cfg.submission.format} needs a recognition rerank spec (its label vote and "
            f"new-label threshold, chosen on OOF) and rerank=auto found none (looked for "
            f"{', '.join(map(str, candidates))}): make it with `python -m arcfold rerank {source} --task "
            f"recognition` (on Kaggle, copy it beside the weights), or set rerank=none to vote with the config's "
            f"vote settings"
        )
    if found is None:
        log.info("no rerank spec (looked for %s): plain search", ", ".join(map(str, candidates)))
    return found


def check_rerank_spec(cfg: InferenceConfig, spec: dict[str, Any] | None, path: Path | None) -> None:
    """Refuse a spec without a vote for a recognition/top5 submission; warn when top5 can never predict new."""
    fmt = cfg.submission.format
    if fmt == "retrieval":
        return
    if spec is not None and not spec.get("vote"):
        raise ConfigError(
            f"rerank spec {path} is for the {spec.get('task')} task and has no label vote, which "
            f"submission.format={fmt} needs: use the recognition spec (`python -m arcfold rerank ... --task "
            f"recognition` writes rerank-recognition.json), or rerank=none to vote with the config's vote settings"
        )
    if spec is None and fmt == "top5" and cfg.vote.threshold is None:
        log.warning(
            "rerank=none and vote.threshold=null: %s is never predicted; set vote.threshold, or make a recognition "
            "rerank spec (python -m arcfold rerank --experiment NAME --task recognition) and use rerank=auto",
            cfg.submission.new_label,
        )


def _new_label_for(fmt: str, vote: dict[str, Any], new_label: str) -> tuple[str | None, float | None]:
    threshold = vote.get("threshold") if fmt == "top5" else None  # recognition: GAP ranks by confidence
    return (new_label if threshold is not None else None), threshold


def top5_width(gallery_labels: Sequence, vote: dict[str, Any], new_label: str) -> int:
    """How many labels every top5 row lists: 5, or fewer when the gallery's labels (and the new label) are fewer."""
    new, _ = _new_label_for("top5", vote, new_label)
    return min(5, len(set(gallery_labels) | ({new} if new is not None else set())))


def predict_labels(
    query: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: Sequence,
    steps: list[dict[str, Any]],
    vote: dict[str, Any],
    *,
    fmt: str,
    new_label: str,
    **search_kwargs: Any,
) -> tuple[list[list], list[float]]:
    """Labels of each query for a ``recognition`` or ``top5`` submission, and the first one's confidence.

    Search (with ``steps``), then :func:`arcfold.retrieval.voting.vote_labels` over the first ``vote["k"]``
    neighbours. ``top5`` inserts ``new_label`` at ``vote["threshold"]`` (when not null) and fills every row to
    :func:`top5_width` labels from ``max(k, TOP5_DEPTH)`` neighbours (module doc); the rows still short (a class
    with more images than that around the query) take the rest from a plain search of those rows alone, 4× deeper
    each time, up to the whole gallery, so the guarantee holds whatever the class sizes.
    """

    labels = np.asarray(gallery_labels, dtype=object)  # (N,)
    new, threshold = _new_label_for(fmt, vote, new_label)
    top5 = fmt == "top5"
    depth = min(max(vote["k"], TOP5_DEPTH) if top5 else vote["k"], len(labels))
    sims, idx = rerank_pipeline(query, gallery, steps, depth, **search_kwargs)  # (Q, depth)
    voted, scores = vote_labels(
        idx, sims, labels, k=min(vote["k"], depth), mode=vote["mode"], new_label=new, threshold=threshold, top=5,
        fill=top5,
    )  # fmt: skip
    width = top5_width(labels.tolist(), vote, new_label) if top5 else 0
    while depth < len(labels):
        short = np.flatnonzero((~np.isnan(scores)).sum(axis=1) < width)  # (S,)
        if not len(short):
            break
        depth = min(4 * depth, len(labels))
        log.info("top5: %d queries have fewer than %d labels among their neighbours: a plain search %d deep",
                 len(short), width, depth)  # fmt: skip
        deep_sims, deep_idx = search(query[short], gallery, depth, **search_kwargs)  # (S, depth)
        voted[short], scores[short] = fill_labels(voted[short], scores[short], deep_idx, deep_sims, labels,
                                                  mode=vote["mode"])  # fmt: skip
    predictions = [[lab for lab in row if lab not in (None, "")] for row in voted]
    confidences = [float(row[0]) for row in scores]  # NaN: no label
    return predictions, confidences
