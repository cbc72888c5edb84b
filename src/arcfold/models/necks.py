"""Necks: pooled features ``(B, C)`` -> embedding ``(B, D)``, picked by name.

``linear_bn_prelu`` is the neck of the Google Landmark Recognition 2020 winners (Linear -> BN ->
PReLU to 512-d); ``linear_bn`` drops the non-linearity (BN-neck, common in re-identification).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["NECKS", "build_neck"]


def _linear_bn(in_features: int, embedding_size: int) -> nn.Sequential:
    # no bias: the batch norm right after has its own shift
    return nn.Sequential(nn.Linear(in_features, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))


def _linear_bn_prelu(in_features: int, embedding_size: int) -> nn.Sequential:
    return nn.Sequential(*_linear_bn(in_features, embedding_size), nn.PReLU())


NECKS: dict[str, Callable[[int, int], nn.Module]] = {"linear_bn": _linear_bn, "linear_bn_prelu": _linear_bn_prelu}


def build_neck(name: str, in_features: int, embedding_size: int) -> nn.Module:
    if name not in NECKS:
        raise ValueError(f"model.neck={name!r} is unknown; choose one of {', '.join(NECKS)}")
    return NECKS[name](in_features, embedding_size)
