"""Training-only margin heads: ``head(embeddings, labels) -> loss``.

A head holds the class centres ``W (C, D)`` and computes cosine logits ``cos(theta) = <x/|x|, w/|w|>``;
the margin is applied to the target logit in the loss, so the embedding model never depends on the
head and inference needs no head at all.

* ``softmax``: ``w_y . x + b_y``, a plain linear layer with bias (the weak baseline).
* ``norm_softmax``: ``s cos theta_y`` (temperature ``1/s``); NormFace, Wang et al., ACM MM 2017.
* ``cosface``: ``s (cos theta_y - m)``, m in cosine units; Wang et al., CVPR 2018.
* ``arcface``: ``s cos(theta_y + m)``, m in radians; Deng et al., CVPR 2019.
* ``subcenter_arcface``: arcface on the max over k sub-centres per class; Deng et al., ECCV 2020.
* ``adacos``: ``s cos theta_y`` with s re-set from every batch, no margin; Zhang et al., CVPR 2019.

(target logits shown; every normalised head's non-target logits are ``s cos theta_j``.)

Options shared by the heads (all from :class:`arcfold.config.HeadConfig`; formulas in :mod:`arcfold.models.margins`):

* per-class margins from the class sizes (``dynamic_margins``; cosface, arcface, subcenter_arcface), stored as the
  buffer ``class_margins (C,)`` so they travel with the checkpoint;
* margin warm-up: every head has ``margin_factor`` (float, default 1), which multiplies the margin; the train loop
  sets it each step to ``margin_warmup_factor``;
* class weights ``1/log(1 + n_c)`` (``inverse_log_class_weights``) and focal loss instead of CE
  (``classification_loss``).

All logit and margin arithmetic runs in fp32 with autocast disabled: ``cos(theta + m)`` needs
``sqrt(1 - cos^2)``, which loses all precision in fp16 near cos = +-1 and whose gradient there is
infinite, hence the clamps before ``sqrt`` and ``acos``; and an fp16 logit ``s cos`` near s = 64 keeps
only about 0.03 of absolute precision, more than the margins' effect on some samples.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arcfold.config import HeadConfig
from arcfold.models.losses import LOSSES, build_pair_loss
from arcfold.models.margins import (
    CLASS_WEIGHT_MODES,
    DYNAMIC_MARGIN_MODES,
    LOSS_NAMES,
    arcface_logits,
    classification_loss,
    cosface_logits,
    dynamic_margins,
    inverse_log_class_weights,
)

__all__ = [
    "HEADS",
    "AdaCosHead",
    "ArcFaceHead",
    "CosFaceHead",
    "MarginHead",
    "NormSoftmaxHead",
    "SoftmaxHead",
    "SubCenterArcFaceHead",
    "SubcenterOutliers",
    "build_head",
    "subcenter_outliers",
]

_EPS = 1e-7


# ----------------------------------------------------------------------------------------------------------------------
# heads


def _fp32_buffer(values: np.ndarray | torch.Tensor | None, n_classes: int, what: str) -> torch.Tensor | None:
    if values is None:
        return None
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if tensor.shape != (n_classes,):
        raise ValueError(f"{what} must have shape ({n_classes},), got {tuple(tensor.shape)}")
    return tensor


class MarginHead(nn.Module):
    """Base of every head: ``logits(embeddings, labels)`` -> CE or focal loss, class weights, ``margin_factor``.

    Subclasses implement :meth:`logits` (training logits, margin included, fp32). ``forward`` runs it and the
    loss with autocast disabled and returns an fp32 scalar.
    """

    def __init__(
        self,
        n_classes: int,
        class_weights: np.ndarray | torch.Tensor | None = None,
        loss: str = "ce",
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if loss not in LOSS_NAMES:
            raise ValueError(f"loss {loss!r} is unknown; choose one of {', '.join(LOSS_NAMES)}")
        self.n_classes = n_classes
        self.loss_name, self.focal_gamma = loss, focal_gamma
        self.margin_factor = 1.0  # set by the train loop for margin warm-up; not part of the state dict
        # (C,) per-class loss weights, mean 1; None (not in the state dict) when unweighted
        self.register_buffer("class_weights", _fp32_buffer(class_weights, n_classes, "class_weights"))

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D), (B,) -> (B, C) fp32 training logits (scale and margin applied)."""
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            logits = self.logits(embeddings, labels)  # (B, C) fp32
            weights = None if self.class_weights is None else self.class_weights.float()
            return classification_loss(logits, labels, weights, self.loss_name, self.focal_gamma)

    def _loss_repr(self) -> str:
        text = f"loss={self.loss_name}" + (f", focal_gamma={self.focal_gamma}" if self.loss_name == "focal" else "")
        return text + (", class_weights=inv_log" if self.class_weights is not None else "")


class SoftmaxHead(MarginHead):
    """Plain linear classifier ``W x + b`` with bias + CE: the weak baseline (no normalisation, no margin, no scale).

    Embeddings trained this way separate classes by direction *and* norm, so cosine retrieval on them is
    usually clearly worse than with the normalised heads; it is here to measure that gap.
    """

    def __init__(self, embedding_size: int, n_classes: int, **loss_kwargs) -> None:
        super().__init__(n_classes, **loss_kwargs)
        self.fc = nn.Linear(embedding_size, n_classes)  # weight (C, D), bias (C,)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.linear(embeddings.float(), self.fc.weight.float(), self.fc.bias.float())

    def extra_repr(self) -> str:
        return self._loss_repr()


class _CosineHead(MarginHead):
    """Class centres ``W (C * k, D)`` (k sub-centres per class, class-major rows ``c * k + j``) and cosine logits."""

    def __init__(self, embedding_size: int, n_classes: int, subcenters: int = 1, **loss_kwargs) -> None:
        super().__init__(n_classes, **loss_kwargs)
        if subcenters < 1:
            raise ValueError(f"subcenters must be at least 1 (got {subcenters})")
        self.subcenters = subcenters
        self.weight = nn.Parameter(torch.empty(n_classes * subcenters, embedding_size))  # (C * k, D) centres
        # N(0, 1), as pytorch-metric-learning's margin losses: only the centres' directions enter the logits, so their
        # scale only sets how far an Adam step (about lr per coordinate, whatever the scale) turns them; at Xavier's
        # scale (std ~0.06) a head lr of 1e-2 turned every centre ~18x further per step and cost 0.03 Recall@1 on
        # Omniglot (issue 16; benchmarks/results/omniglot_defaults_study.md)
        nn.init.normal_(self.weight)

    def subcenter_cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C, k) cosine similarities to every sub-centre, fp32."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))  # (B, C * k)
        return cosine.view(len(embeddings), self.n_classes, self.subcenters)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C) cosine similarities to the class centres (max over sub-centres), fp32."""
        if self.subcenters == 1:
            with torch.autocast(device_type=embeddings.device.type, enabled=False):
                return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        return self.subcenter_cosine(embeddings).amax(dim=2)

    def extra_repr(self) -> str:
        dim = self.weight.shape[1]
        text = f"embedding_size={dim}, n_classes={self.n_classes}"
        return text + (f", subcenters={self.subcenters}" if self.subcenters > 1 else "")


class NormSoftmaxHead(_CosineHead):
    """Normalised softmax / NormFace (Wang et al., ACM MM 2017; Zhai & Wu, BMVC 2019): logits ``s cos theta_j``.

    No margin. ``scale`` s is the inverse temperature (pytorch-metric-learning's ``NormalizedSoftmaxLoss``
    uses temperature 0.05, i.e. s = 20); typical s 10-64. A too small s cannot reach low loss at all
    (the softmax of values in [-s, s] stays flat).
    """

    def __init__(self, embedding_size: int, n_classes: int, scale: float = 30.0, **loss_kwargs) -> None:
        super().__init__(embedding_size, n_classes, **loss_kwargs)
        self.scale = scale

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.cosine(embeddings) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, {self._loss_repr()}"


class _AdditiveMarginHead(_CosineHead):
    """A cosine head with a target margin: one float ``margin`` or per-class ``class_margins (C,)`` (a buffer)."""

    margin_unit = ""

    def __init__(
        self,
        embedding_size: int,
        n_classes: int,
        scale: float = 30.0,
        margin: float = 0.3,
        *,
        class_margins: np.ndarray | torch.Tensor | None = None,
        subcenters: int = 1,
        **loss_kwargs,
    ) -> None:
        super().__init__(embedding_size, n_classes, subcenters=subcenters, **loss_kwargs)
        self.scale, self.margin = scale, margin
        # (C,) per-class margins (dynamic margins); None (not in the state dict): ``margin`` for every class
        self.register_buffer("class_margins", _fp32_buffer(class_margins, n_classes, "class_margins"))

    def target_margins(self, labels: torch.Tensor) -> float | torch.Tensor:
        """The margin of each sample's target class times ``margin_factor``: a float, or (B,) fp32."""
        if self.class_margins is None:
            return self.margin * self.margin_factor
        return self.class_margins.float()[labels] * self.margin_factor

    def extra_repr(self) -> str:
        margin = "per class" if self.class_margins is not None else f"{self.margin} {self.margin_unit}".strip()
        return f"{super().extra_repr()}, scale={self.scale}, margin={margin}, {self._loss_repr()}"


class CosFaceHead(_AdditiveMarginHead):
    """CosFace / additive cosine margin (Wang et al., CVPR 2018; AM-softmax): target logit ``s (cos theta_y - m)``.

    ``margin`` m in cosine units, typical 0.1-0.4 (paper 0.35; "Metric Learning Reality Check" 0.62 at
    s = 100 on CUB); ``scale`` s typical 30-64. Per-class margins via ``class_margins``.
    """

    margin_unit = "(cosine units)"

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cosface_logits(self.cosine(embeddings), labels, self.target_margins(labels), self.scale)


class ArcFaceHead(_AdditiveMarginHead):
    """ArcFace / additive angular margin (Deng et al., CVPR 2019): target logit ``s cos(theta_y + m)`` + CE.

    ``margin`` m in **radians**, typical 0.2-0.5 (0.5 rad = 28.6 degrees, the paper's value); ``scale`` s
    typical 16-64 (paper 64; 30 for smaller data). Per-class margins (radians) via ``class_margins``.
    See :func:`arcface_logits` for the continuation past ``theta_y > pi - m``.
    """

    margin_unit = "rad"

    def __init__(self, embedding_size: int, n_classes: int, scale: float = 30.0, margin: float = 0.3, **kwargs) -> None:
        super().__init__(embedding_size, n_classes, scale, margin, **kwargs)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return arcface_logits(self.cosine(embeddings), labels, self.target_margins(labels), self.scale)


class SubCenterArcFaceHead(ArcFaceHead):
    """Sub-centre ArcFace (Deng et al., ECCV 2020): k sub-centres per class, ``cos theta_j = max_k cos(x, w_jk)``.

    Then the ArcFace margin on the target (``margin`` in radians, typical 0.2-0.5; ``scale`` 16-64).
    ``weight`` is (C * k, D) with class-major rows ``c * k + j`` (the layout of pytorch-metric-learning's
    ``SubCenterArcFaceLoss.W.T``); k = 3 in the paper. Noisy images of a class gather on non-dominant
    sub-centres; :func:`subcenter_outliers` lists them.
    """

    def __init__(
        self, embedding_size: int, n_classes: int, scale: float = 30.0, margin: float = 0.3, subcenters: int = 3, **kw
    ) -> None:
        super().__init__(embedding_size, n_classes, scale, margin, subcenters=subcenters, **kw)


class SubcenterOutliers(NamedTuple):
    indices: torch.Tensor  # (N,) int64 positions in the given embeddings, ascending
    angles: torch.Tensor  # (N,) fp32 degrees between each outlier and its class's dominant sub-centre


@torch.no_grad()
def subcenter_outliers(
    head: _CosineHead,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    threshold_degrees: float = 75.0,
    chunk_size: int = 4096,
) -> SubcenterOutliers:
    """Likely label-noise images: farther than ``threshold_degrees`` from their class's dominant sub-centre.

    The dominant sub-centre of a class is the one that most of its images (among those given) are closest
    to (ties: the lower index), as in the sub-centre ArcFace paper and pytorch-metric-learning's
    ``SubCenterArcFaceLoss.get_outliers``. Pass the embeddings of a whole class (ideally the whole training
    set), not one batch. Works for any cosine head (k = 1: the class centre is the dominant one).

    embeddings: (N, D); labels: (N,) int64. Returns ``(indices, angles)`` of the outliers, angles in degrees.
    """
    device, k = head.weight.device, head.subcenters
    labels = labels.to(device)
    centres = F.normalize(head.weight.float()).view(head.n_classes, k, -1)  # (C, k, D)
    own = torch.cat(
        [
            torch.einsum("nd,nkd->nk", F.normalize(e.to(device).float()), centres[y])  # (n, k) cos to own sub-centres
            for e, y in zip(embeddings.split(chunk_size), labels.split(chunk_size), strict=True)
        ]
    )  # (N, k)
    nearest = own.argmax(dim=1)  # (N,)
    votes = torch.bincount(labels * k + nearest, minlength=head.n_classes * k).view(head.n_classes, k)
    dominant = votes.argmax(dim=1)  # (C,) first maximum on ties
    cos_dominant = own.gather(1, dominant[labels][:, None])[:, 0]  # (N,)
    is_outlier = cos_dominant < math.cos(math.radians(threshold_degrees))
    indices = is_outlier.nonzero()[:, 0]
    angles = torch.rad2deg(torch.acos(cos_dominant[indices].clamp(-1.0, 1.0)))
    return SubcenterOutliers(indices, angles)


class AdaCosHead(_CosineHead):
    """AdaCos (Zhang et al., CVPR 2019): cosine logits ``s cos theta_j`` with no margin and an adaptive scale s.

    s starts at the paper's fixed value ``sqrt(2) * log(C - 1)`` and, with ``adaptive=True`` (dynamic
    AdaCos), is re-set at every training-mode forward from the batch (before the logits are scaled)::

        B_avg     = 1/B sum_i sum_{j != y_i} exp(s_old cos theta_ij)
        theta_med = median_i theta_{i, y_i}              (torch.median: the lower middle value)
        s         = log(B_avg) / cos(min(pi/4, theta_med))

    ``log(B_avg)`` is computed with logsumexp, so large s do not overflow. An update that would make s
    non-finite or not positive is skipped (possible only when non-target cosines are strongly negative
    with few classes). s is the buffer ``scale`` (a 0-d tensor), so it is checkpointed and resumed; in
    eval mode it is frozen. Needs at least 3 classes (the initial s is 0 for 2).
    """

    def __init__(self, embedding_size: int, n_classes: int, adaptive: bool = True, **loss_kwargs) -> None:
        if n_classes < 3:
            raise ValueError(f"adacos needs at least 3 classes (its initial scale sqrt(2) log(C - 1)); got {n_classes}")
        super().__init__(embedding_size, n_classes, **loss_kwargs)
        self.adaptive = adaptive
        self.register_buffer("scale", torch.tensor(math.sqrt(2.0) * math.log(n_classes - 1), dtype=torch.float32))

    @torch.no_grad()
    def update_scale(self, cosine: torch.Tensor, labels: torch.Tensor) -> None:
        """Re-set ``scale`` from a batch of cosines (B, C) and labels (B,) by the AdaCos rule (see the class)."""
        cosine = cosine.float()
        is_target = F.one_hot(labels, self.n_classes).bool()  # (B, C)
        non_target = (self.scale * cosine).masked_fill(is_target, -math.inf)  # (B, C)
        log_b_avg = torch.logsumexp(non_target.flatten(), dim=0) - math.log(len(cosine))
        theta = torch.acos(cosine.gather(1, labels[:, None]).clamp(-1.0 + _EPS, 1.0 - _EPS))  # (B, 1)
        new_scale = log_b_avg / torch.cos(theta.median().clamp(max=math.pi / 4))
        ok = torch.isfinite(new_scale) & (new_scale > 0)
        self.scale.copy_(torch.where(ok, new_scale, self.scale))  # no host sync

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.cosine(embeddings)  # (B, C)
        if self.training and self.adaptive:
            self.update_scale(cosine.detach(), labels)
        return cosine * self.scale

    def extra_repr(self) -> str:
        kind = "adaptive" if self.adaptive else "fixed"
        return f"{super().extra_repr()}, scale={self.scale.item():.3f} ({kind}), {self._loss_repr()}"


HEADS: dict[str, type[MarginHead]] = {
    "softmax": SoftmaxHead,
    "norm_softmax": NormSoftmaxHead,
    "cosface": CosFaceHead,
    "arcface": ArcFaceHead,
    "subcenter_arcface": SubCenterArcFaceHead,
    "adacos": AdaCosHead,
}
HEADS_WITH_MARGIN = ("cosface", "arcface", "subcenter_arcface")  # the heads that take (dynamic) margins


def build_head(
    cfg: HeadConfig, embedding_size: int, n_classes: int, class_counts: np.ndarray | None = None
) -> nn.Module:
    """The training objective named ``cfg.name``: a margin head from :data:`HEADS` or a pair/proxy loss.

    ``class_counts[c]`` is the number of training images of class c (contiguous ids 0..C-1); it is required
    for ``dynamic_margin`` other than none and for ``class_weights`` other than none. Names not in
    :data:`HEADS` go to :func:`arcfold.models.losses.build_pair_loss` when its registry has them.
    """
    if cfg.name not in HEADS:
        if cfg.name in LOSSES:
            return build_pair_loss(cfg, embedding_size, n_classes)
        raise ValueError(f"head.name={cfg.name!r} is unknown; choose one of {', '.join([*HEADS, *LOSSES])}")

    for key, value, allowed in [
        ("dynamic_margin", cfg.dynamic_margin, DYNAMIC_MARGIN_MODES),
        ("class_weights", cfg.class_weights, CLASS_WEIGHT_MODES),
        ("loss", cfg.loss, LOSS_NAMES),
    ]:
        if value not in allowed:
            raise ValueError(f"head.{key}={value!r} is unknown; choose one of {', '.join(allowed)}")
    needs_counts = [
        f"head.{k}={v}"
        for k, v in [("dynamic_margin", cfg.dynamic_margin), ("class_weights", cfg.class_weights)]
        if v != "none"
    ]
    if needs_counts and class_counts is None:
        raise ValueError(f"{' and '.join(needs_counts)} need class_counts (training images per class)")
    if class_counts is not None and np.shape(class_counts) != (n_classes,):
        raise ValueError(f"class_counts must have shape ({n_classes},), got {np.shape(class_counts)}")
    if cfg.dynamic_margin != "none" and cfg.name not in HEADS_WITH_MARGIN:
        raise ValueError(
            f"head.dynamic_margin={cfg.dynamic_margin} applies to {', '.join(HEADS_WITH_MARGIN)}, not {cfg.name}"
        )

    loss_kwargs = {
        "class_weights": inverse_log_class_weights(class_counts) if cfg.class_weights == "inv_log" else None,
        "loss": cfg.loss,
        "focal_gamma": cfg.focal_gamma,
    }
    if cfg.name == "softmax":
        return SoftmaxHead(embedding_size, n_classes, **loss_kwargs)
    if cfg.name == "norm_softmax":
        return NormSoftmaxHead(embedding_size, n_classes, scale=cfg.scale, **loss_kwargs)
    if cfg.name == "adacos":
        return AdaCosHead(embedding_size, n_classes, **loss_kwargs)
    class_margins = None
    if cfg.dynamic_margin != "none":
        class_margins = dynamic_margins(
            class_counts,
            cfg.dynamic_margin,
            a=cfg.margin_a,
            lam=cfg.margin_lambda,
            b=cfg.margin_b,
            m_min=cfg.margin_min,
            m_max=cfg.margin_max,
        )
        if cfg.name != "cosface" and class_margins.max() >= math.pi:
            raise ValueError(f"dynamic arcface margins are radians and must be < pi (max {class_margins.max():.3f})")
    if cfg.name == "subcenter_arcface":
        loss_kwargs["subcenters"] = cfg.subcenters
    return HEADS[cfg.name](
        embedding_size, n_classes, scale=cfg.scale, margin=cfg.margin, class_margins=class_margins, **loss_kwargs
    )
