"""Training-only margin heads: ``head(embeddings, labels) -> loss``.

A head holds the class centres ``W (C, D)`` and computes cosine logits ``cos(theta) = <x/|x|, w/|w|>``;
the margin is applied to the target logit in the loss, so the embedding model never depends on the
head and inference needs no head at all.

All margin arithmetic runs in fp32 with autocast disabled: ``cos(theta + m)`` needs
``sqrt(1 - cos^2)``, which loses all precision in fp16 near cos = +-1 and whose gradient there is
infinite, hence the clamps before ``sqrt``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arcfold.config import HeadConfig

__all__ = ["HEADS", "ArcFaceHead", "arcface_logits", "build_head"]

_EPS = 1e-7


def arcface_logits(cosine: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """ArcFace logits (Deng et al., CVPR 2019): ``s * cos(theta_y + m)`` for the target, ``s * cos(theta_j)`` else.

    ``margin`` m is an angle in radians (typical 0.2-0.5; 0.5 rad = 28.6 degrees); ``scale`` s is
    typically 16-64. Past ``theta_y > pi - m`` the function ``cos(theta_y + m)`` would *rise* again
    (the angle wraps past pi) and reward a worse embedding, so there the target logit continues as
    ``cos(theta_y) - m sin(m)``, the linear continuation used by InsightFace, which stays monotonic.

    cosine: (B, C) in [-1, 1]; labels: (B,) int64. Returns (B, C) float32.
    """
    cosine = cosine.float().clamp(-1.0 + _EPS, 1.0 - _EPS)
    target = cosine.gather(1, labels[:, None])  # (B, 1) cos(theta_y)
    sine = (1.0 - target.square()).clamp(min=0.0).sqrt()  # sin(theta_y) >= 0 since theta in [0, pi]
    with_margin = target * math.cos(margin) - sine * math.sin(margin)  # cos(theta_y + m)
    past_pi = target <= math.cos(math.pi - margin)  # theta_y >= pi - m
    with_margin = torch.where(past_pi, target - margin * math.sin(margin), with_margin)
    return cosine.scatter(1, labels[:, None], with_margin) * scale


class ArcFaceHead(nn.Module):
    """Cosine classifier + additive angular margin + cross-entropy."""

    def __init__(self, embedding_size: int, n_classes: int, scale: float = 30.0, margin: float = 0.3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_size))  # (C, D) class centres
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C) cosine similarities to the class centres, fp32."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = arcface_logits(self.cosine(embeddings), labels, self.margin, self.scale)
        return F.cross_entropy(logits, labels)

    def extra_repr(self) -> str:
        n_classes, dim = self.weight.shape
        return f"embedding_size={dim}, n_classes={n_classes}, scale={self.scale}, margin={self.margin} rad"


HEADS = {"arcface": ArcFaceHead}


def build_head(cfg: HeadConfig, embedding_size: int, n_classes: int) -> nn.Module:
    if cfg.name not in HEADS:
        raise ValueError(f"head.name={cfg.name!r} is unknown; choose one of {', '.join(HEADS)}")
    return HEADS[cfg.name](embedding_size, n_classes, scale=cfg.scale, margin=cfg.margin)
