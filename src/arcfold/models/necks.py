"""Necks: what sits around the global pooling, from the backbone's feature map to the embedding.

A neck's name lists its layers in the order they run (``gp`` = the global pooling, ``model.pool``):

====================  =====================================================  ===================
name                  layers                                                 embedding size
====================  =====================================================  ===================
``gp``                pool                                                   backbone channels
``gp_bn``             pool -> BatchNorm1d (the re-id "BNNeck")               backbone channels
``dp_gp``             Dropout(model.drop_rate) on the map -> pool            backbone channels
``bn_gp``             BatchNorm2d on the map -> pool                         backbone channels
``bn_dp_gp_bn``       BatchNorm2d -> Dropout -> pool -> BatchNorm1d          backbone channels
``linear_bn``         pool -> Linear -> BatchNorm1d                          model.embedding_size
``linear_bn_prelu``   pool -> Linear -> BatchNorm1d -> PReLU (GLR 2020 1st)  model.embedding_size
====================  =====================================================  ===================

The pool-only necks keep the backbone's channel count, so ``model.embedding_size`` must equal it
(an error says so otherwise). ``linear_bn_prelu`` is the neck of the Google Landmark Recognition
2020 winners; ``linear_bn`` drops the non-linearity. A BatchNorm2d before GeM lets GeM's clamp at
``eps`` zero the negative half of the normalised map; with ``model.pool=avg`` it is a plain affine.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["NECKS", "NeckParts", "build_neck"]

NECKS = ("gp", "gp_bn", "dp_gp", "bn_gp", "bn_dp_gp_bn", "linear_bn", "linear_bn_prelu")


@dataclass
class NeckParts:
    """``pre_pool`` runs on the (B, C, h, w) map, ``post_pool`` on the pooled (B, C) vector.

    For the linear necks the model puts Dropout(model.drop_rate) between pool and ``post_pool``.
    """

    pre_pool: nn.Module
    post_pool: nn.Module
    embedding_size: int


def build_neck(name: str, in_features: int, embedding_size: int, drop_rate: float = 0.0) -> NeckParts:
    """The layers of neck ``name`` for a backbone with ``in_features`` channels."""
    if name not in NECKS:
        raise ValueError(f"model.neck={name!r} is unknown; choose one of {', '.join(NECKS)}")
    if name.startswith("linear_bn"):
        # no bias: the batch norm right after has its own shift
        post = [nn.Linear(in_features, embedding_size, bias=False), nn.BatchNorm1d(embedding_size)]
        if name == "linear_bn_prelu":
            post.append(nn.PReLU())
        return NeckParts(nn.Identity(), nn.Sequential(*post), embedding_size)

    if embedding_size != in_features:
        raise ValueError(
            f"model.neck={name} keeps the backbone's {in_features} channels as the embedding: set "
            f"model.embedding_size={in_features}, or use a neck with a linear layer (linear_bn, linear_bn_prelu)"
        )
    layers = name.split("_")
    if "dp" in layers and drop_rate <= 0:
        raise ValueError(f"model.neck={name} has a dropout layer: set model.drop_rate > 0 (e.g. 0.2)")
    at = layers.index("gp")
    build = {
        "bn": lambda before_pool: nn.BatchNorm2d(in_features) if before_pool else nn.BatchNorm1d(in_features),
        "dp": lambda before_pool: nn.Dropout(drop_rate),
    }
    pre = [build[layer](True) for layer in layers[:at]]
    post = [build[layer](False) for layer in layers[at + 1 :]]
    return NeckParts(
        nn.Sequential(*pre) if pre else nn.Identity(),
        nn.Sequential(*post) if post else nn.Identity(),
        in_features,
    )
