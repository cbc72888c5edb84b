"""The one place that combines the embeddings of several models: a weighted concatenation of L2-normalised members,
and the blend spec (``oof/blends/<name>.json``) that records the weights.

For each image, every member's L2-normalised embedding ``e_i`` is multiplied by ``sqrt(w_i)`` with weights summing
to 1, the pieces are concatenated and the result is L2-normalised again, so the inner product of two blended
embeddings is the weighted sum of the members' cosine similarities. The fold ensemble of inference and the test
stage is the same operation with equal weights; the weight search on OOF is :mod:`arcfold.experiments.blend`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arcfold.errors import BlendError

__all__ = [
    "BLEND_FORMAT",
    "NORMALISATION",
    "blend_embeddings",
    "l2_normalise",
    "load_blend_spec",
    "normalised_weights",
]

BLEND_FORMAT = "arcfold.blend/1"


NORMALISATION = "l2_weighted_concat"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, float32; a zero or non-finite row is a :class:`BlendError`."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    if (norms == 0).any() or not np.isfinite(norms).all():
        raise BlendError("cannot L2-normalise embeddings with a zero or non-finite norm")
    return x / norms


def normalised_weights(weights: Sequence[float], n_members: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_members,):
        raise BlendError(f"{n_members} members need {n_members} weights, got {len(w)}")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise BlendError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return w / w.sum()


def blend_embeddings(members: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``l2(concat_i(sqrt(w_i) * l2(e_i)))`` with ``w`` rescaled to sum 1; (N, sum D_i) float32.

    The inner product of two blended rows is the weighted sum of the members' cosine similarities:

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 6))
    >>> x = blend_embeddings([a, b], [3, 1])
    >>> cos = lambda e: (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1)[:, None]).T
    >>> bool(np.allclose(x @ x.T, 0.75 * cos(a) + 0.25 * cos(b), atol=1e-6))
    True
    """
    if not members:
        raise BlendError("a blend needs at least one member")
    n = len(members[0])
    if any(len(m) != n for m in members):
        raise BlendError(f"members have different numbers of rows: {[len(m) for m in members]}")
    w = normalised_weights(weights, len(members))
    parts = [l2_normalise(m) * np.float32(math.sqrt(wi)) for m, wi in zip(members, w, strict=True)]  # each (N, D_i)
    return l2_normalise(np.concatenate(parts, axis=1))  # (N, sum D_i); the norm is already 1 up to rounding


def load_blend_spec(path: str | Path) -> dict[str, Any]:
    """Read a blend spec and check its format; ``spec["experiments"]`` and ``spec["weights"]`` say how to blend."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    if spec.get("format") != BLEND_FORMAT:
        raise BlendError(f"{path} is not a blend spec of format {BLEND_FORMAT} (got {spec.get('format')!r})")
    if spec.get("normalisation") != NORMALISATION:
        raise BlendError(f"{path}: unknown normalisation {spec.get('normalisation')!r}")
    normalised_weights(spec["weights"], len(spec["experiments"]))
    return spec
