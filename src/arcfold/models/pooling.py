"""Global pooling of a backbone feature map ``(B, C, H, W) -> (B, C)``, picked by name.

timm's ``SelectAdaptivePool2d`` has avg/max/avgmax but no GeM, the pooling of every landmark
retrieval winner, so GeM is written here (Radenović et al., "Fine-tuning CNN Image Retrieval with
No Human Annotation", TPAMI 2018).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["POOLS", "GeM", "build_pool"]


class GeM(nn.Module):
    """Generalised-mean pooling: ``(mean_hw x^p)^(1/p)``; p=1 is average pooling, p->inf max pooling.

    ``p`` is a learnable scalar when ``trainable``. Inputs are clamped to ``eps`` first: the fractional
    power of a negative or zero activation is undefined or has an infinite gradient.
    """

    def __init__(self, p: float = 3.0, trainable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=trainable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        dtype = x.dtype
        # In fp32, and with the per-channel max factored out: (mean x^p)^(1/p) = c (mean (x/c)^p)^(1/p).
        # x^p overflows fp16 from x ~ 40 at p = 3 and even fp32 once p log(x) > 88 (a learnt p can grow).
        p = self.p.float()
        x = x.float().clamp(min=self.eps)
        peak = x.amax(dim=(2, 3), keepdim=True).detach()  # (B, C, 1, 1); the identity holds for any c
        pooled = F.adaptive_avg_pool2d((x / peak).pow(p), 1).pow(1.0 / p) * peak
        return pooled.flatten(1).to(dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, trainable={self.p.requires_grad}, eps={self.eps}"


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        return x.mean(dim=(2, 3))


POOLS = {"avg": AvgPool, "gem": GeM}


def build_pool(name: str, gem_p: float = 3.0, gem_trainable: bool = True) -> nn.Module:
    if name not in POOLS:
        raise ValueError(f"model.pool={name!r} is unknown; choose one of {', '.join(POOLS)}")
    if name == "gem":
        return GeM(p=gem_p, trainable=gem_trainable)
    return POOLS[name]()
