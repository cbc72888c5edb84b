"""The margin heads' arithmetic as pure functions: ArcFace / CosFace target logits, per-class (dynamic) margins, class
weights, the margin warm-up and the classification loss. The heads (:mod:`arcfold.models.heads`) hold the weights;
these functions hold the formulas, each tested against a closed form.

All logit and margin arithmetic runs in fp32 with autocast disabled: ``cos(theta + m)`` needs ``sqrt(1 - cos^2)``,
which loses all precision in fp16 near cos = +-1 and whose gradient there is infinite, hence the clamps before
``sqrt`` and ``acos``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLASS_WEIGHT_MODES",
    "DYNAMIC_MARGIN_MODES",
    "LOSS_NAMES",
    "arcface_logits",
    "classification_loss",
    "cosface_logits",
    "dynamic_margins",
    "inverse_log_class_weights",
    "margin_warmup_factor",
]

_EPS = 1e-7
DYNAMIC_MARGIN_MODES = ("none", "power", "minmax")
CLASS_WEIGHT_MODES = ("none", "inv_log")
LOSS_NAMES = ("ce", "focal")


def _per_sample(margin: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or (B,) margin as an fp32 (B, 1) or (1, 1) tensor on ``like``'s device."""
    return torch.as_tensor(margin, dtype=torch.float32, device=like.device).reshape(-1, 1)


def arcface_logits(
    cosine: torch.Tensor, labels: torch.Tensor, margin: float | torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """ArcFace logits (Deng et al., CVPR 2019): ``s * cos(theta_y + m)`` for the target, ``s * cos(theta_j)`` else.

    ``margin`` m is an angle in radians (typical 0.2-0.5; 0.5 rad = 28.6 degrees), one float or a (B,)
    tensor with one margin per sample (per-class margins gathered by label); ``scale`` s is typically
    16-64. Past ``theta_y > pi - m`` the function ``cos(theta_y + m)`` would *rise* again (the angle wraps
    past pi) and reward a worse embedding, so there the target logit continues as ``cos(theta_y) - m sin(m)``,
    the linear continuation used by InsightFace and pytorch-metric-learning, which stays monotonic.

    cosine: (B, C) in [-1, 1]; labels: (B,) int64. Returns (B, C) float32.
    """
    cosine = cosine.float().clamp(-1.0 + _EPS, 1.0 - _EPS)
    m = _per_sample(margin, cosine)  # (B, 1) or (1, 1), radians
    target = cosine.gather(1, labels[:, None])  # (B, 1) cos(theta_y)
    sine = (1.0 - target.square()).clamp(min=0.0).sqrt()  # sin(theta_y) >= 0 since theta in [0, pi]
    with_margin = target * torch.cos(m) - sine * torch.sin(m)  # cos(theta_y + m)
    past_pi = target <= torch.cos(math.pi - m)  # theta_y >= pi - m
    with_margin = torch.where(past_pi, target - m * torch.sin(m), with_margin)
    return cosine.scatter(1, labels[:, None], with_margin) * scale


def cosface_logits(
    cosine: torch.Tensor, labels: torch.Tensor, margin: float | torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """CosFace / large-margin cosine logits (Wang et al., CVPR 2018): ``s * (cos theta_y - m)`` for the target.

    ``margin`` m is in cosine units (typical 0.1-0.4; pytorch-metric-learning's default 0.35), one float or
    a (B,) tensor of per-sample margins; ``scale`` s typically 30-64. No square root is involved, so no clamp.

    cosine: (B, C); labels: (B,) int64. Returns (B, C) float32.
    """
    cosine = cosine.float()
    m = _per_sample(margin, cosine)  # (B, 1) or (1, 1), cosine units
    target = cosine.gather(1, labels[:, None]) - m  # (B, 1)
    return cosine.scatter(1, labels[:, None], target) * scale


def dynamic_margins(
    class_counts: np.ndarray,
    mode: str,
    a: float = 0.5,
    lam: float = 0.25,
    b: float = 0.05,
    m_min: float = 0.05,
    m_max: float = 0.5,
) -> np.ndarray:
    """Per-class margins (C,) from the class sizes n_c: rare classes get larger margins.

    * ``power``: ``m_c = a * n_c^(-lam) + b`` (the adaptive-margin form of the GLR 2020 / Happywhale
      solutions; with a=0.5, lam=0.25, b=0.05 a singleton class gets 0.55, a class of 10 000 gets 0.055).
      ``m_min``/``m_max`` are ignored.
    * ``minmax``: ``t_c = n_c^(-1/4)``, min-max scaled to ``[m_min, m_max]`` (GLR 2020 1st place): the
      rarest class gets ``m_max``, the most frequent ``m_min``. When every class has the same size there is
      nothing to scale (0/0); then every class counts as the rarest and gets ``m_max``.

    The unit is the head's: radians for arcface / subcenter_arcface, cosine units for cosface.
    Returns float64.

    >>> dynamic_margins(np.array([1, 16, 81]), "power", a=0.5, lam=0.25, b=0.05).round(4).tolist()
    [0.55, 0.3, 0.2167]
    >>> dynamic_margins(np.array([1, 16, 10000]), "minmax", m_min=0.1, m_max=0.5).round(4).tolist()
    [0.5, 0.2778, 0.1]
    >>> dynamic_margins(np.array([7, 7]), "minmax", m_min=0.1, m_max=0.5).tolist()
    [0.5, 0.5]
    """
    counts = _check_counts(class_counts)
    if mode == "power":
        margins = a * counts ** (-lam) + b
    elif mode == "minmax":
        if counts.min() == counts.max():
            margins = np.full(len(counts), float(m_max))
        else:
            t = counts ** (-0.25)
            margins = m_min + (t - t.min()) / (t.max() - t.min()) * (m_max - m_min)
    else:
        raise ValueError(f"dynamic margin mode {mode!r} is unknown; choose one of power, minmax")
    if not np.isfinite(margins).all():
        raise ValueError(f"dynamic margins are not all finite (mode={mode}, a={a}, lam={lam}, b={b})")
    return margins


def inverse_log_class_weights(class_counts: np.ndarray) -> np.ndarray:
    """Class weights ``w_c = 1 / log(1 + n_c)``, normalised so that their mean over the classes is 1. (C,) float64.

    The losses reduce with PyTorch's weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (as
    ``F.cross_entropy(weight=...)`` does), so the normalisation does not change the loss value; it only
    makes the weights readable (a class with weight 2 counts twice as much as the average class).

    >>> inverse_log_class_weights(np.array([1, 1])).tolist()
    [1.0, 1.0]
    >>> w = inverse_log_class_weights(np.array([1, 100])); bool(w[0] > w[1]), round(float(w.mean()), 6)
    (True, 1.0)
    """
    counts = _check_counts(class_counts)
    weights = 1.0 / np.log1p(counts)
    return weights / weights.mean()


def _check_counts(class_counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0:
        raise ValueError(f"class_counts must be a non-empty 1-d array, got shape {counts.shape}")
    if not (counts >= 1).all():
        raise ValueError(f"every class needs at least one training image; class_counts min is {counts.min()}")
    return counts


def margin_warmup_factor(epoch_progress: float, warmup_epochs: float) -> float:
    """Multiplier of the margin at ``epoch_progress`` (epochs done, fractional): linear 0 -> 1 over ``warmup_epochs``.

    1 when ``warmup_epochs`` is 0 (no warm-up) and after the warm-up. A hard margin on random class centres
    can stall the start of training; ramping it in avoids that.

    >>> margin_warmup_factor(0.5, 2.0), margin_warmup_factor(3.0, 2.0), margin_warmup_factor(0.0, 0.0)
    (0.25, 1.0, 1.0)
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must not be negative (got {warmup_epochs})")
    if warmup_epochs == 0:
        return 1.0
    return float(min(1.0, max(0.0, epoch_progress / warmup_epochs)))


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    loss: str = "ce",
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """Cross-entropy or focal loss of (B, C) logits, optionally class-weighted; a scalar in the logits' dtype.

    * ``ce``: ``F.cross_entropy(logits, labels, weight=class_weights)``.
    * ``focal`` (Lin et al., ICCV 2017): ``FL_i = (1 - p_t)^gamma * CE_i`` with ``p_t = softmax(logits)_{y_i}``;
      gamma typically 0.5-5 (2 in the paper); gamma = 0 is CE (then computed by ``F.cross_entropy`` itself,
      so bit for bit). ``1 - p_t`` is computed as ``-expm1(-CE)``, accurate when ``p_t`` is close to 1.

    With class weights both reduce as PyTorch's weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}``;
    without, as the plain mean.
    """
    if loss not in LOSS_NAMES:
        raise ValueError(f"loss {loss!r} is unknown; choose one of {', '.join(LOSS_NAMES)}")
    if loss == "ce" or focal_gamma == 0:  # the modulating factor is 1: exactly CE, bit for bit
        return F.cross_entropy(logits, labels, weight=class_weights)
    ce = F.cross_entropy(logits, labels, reduction="none")  # (B,) -log p_t
    one_minus_pt = (-torch.expm1(-ce)).clamp(min=1e-12)  # (B,); the clamp keeps d/dx x^gamma finite at p_t = 1
    focal = one_minus_pt.pow(focal_gamma) * ce  # (B,)
    if class_weights is None:
        return focal.mean()
    w = class_weights[labels]  # (B,)
    return (w * focal).sum() / w.sum()
