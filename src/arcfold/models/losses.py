"""Pair and proxy losses from pytorch-metric-learning (PML) as heads: ``head(embeddings, labels) -> loss``.

``build_pair_loss(cfg.head, embedding_size, n_classes)`` returns a :class:`PairLossHead`: the PML loss
named by ``head.name`` built with ``head.params`` as keyword arguments, an optional PML miner
(``head.miner`` with ``head.miner_params``), and, for ``head.direction_gamma > 0``, the direction-
regularised version of triplet / proxy_nca / multi_similarity (:mod:`arcfold.models.direction`).
The losses are PML's own classes, not rewritten; a loss's parameters (proxies, SoftTriple's centres,
MarginLoss's learned beta) are parameters of the head, so the optimiser's head group (``optim.head_lr``)
trains them and checkpoints store them.

Every default below is PML 2.9's default (nothing is overridden here); "auto" arguments come from the
data and must not be set in ``head.params``. Distances are on L2-normalised embeddings unless noted.

==================  ======================================  ==================================================
name                PML class                               defaults (all PML's)
==================  ======================================  ==================================================
contrastive         ContrastiveLoss                         pos_margin=0, neg_margin=1 (Euclidean distance)
triplet             TripletMarginLoss                       margin=0.05, swap=False, smooth_loss=False,
                                                            triplets_per_anchor="all" (Euclidean distance)
ntxent              NTXentLoss                              temperature=0.07 (cosine similarity)
proxy_nca           ProxyNCALoss                            softmax_scale=1 (squared Euclidean distance);
                                                            auto: num_classes, embedding_size
proxy_anchor        ProxyAnchorLoss                         margin=0.1, alpha=32 (cosine); auto: num_classes,
                                                            embedding_size
margin              MarginLoss                              margin=0.2, nu=0, beta=1.2, triplets_per_anchor=
                                                            "all", learn_beta=False; auto with learn_beta=true:
                                                            num_classes (one learned beta per class)
multi_similarity    MultiSimilarityLoss                     alpha=2, beta=50, base=0.5 (cosine similarity)
soft_triple         SoftTripleLoss                          centers_per_class=10, la=20, gamma=0.1,
                                                            margin=0.01 (cosine); auto: num_classes,
                                                            embedding_size
fastap              FastAPLoss                              num_bins=10 (squared Euclidean distance)
snr                 SignalToNoiseRatioContrastiveLoss       pos_margin=0, neg_margin=1 (SNR distance)
==================  ======================================  ==================================================

Miners (``head.miner``), defaults PML's: ``triplet_margin`` (margin=0.2, type_of_triplets="all"),
``multi_similarity`` (epsilon=0.1), ``batch_hard`` (no arguments), ``pair_margin`` (pos_margin=0.2,
neg_margin=0.8). A loss given a miner sees only the mined pairs/triplets (proxy losses, SoftTriple and
FastAP weight the samples by how often they were mined, PML's ``convert_to_weights``).

Pair losses need positives in the batch: use an m-per-class sampler (``sampler.m_per_class``,
:func:`arcfold.data.samplers.build_sampler`). All arithmetic runs in fp32 with autocast disabled
(exp/logsumexp with scales like 32-50 overflow fp16).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.generic_pair_loss import GenericPairLoss
from pytorch_metric_learning.miners import BaseMiner
from torch import nn

from arcfold.config import HeadConfig
from arcfold.models.direction import DIRECTION_LOSSES

__all__ = ["LOSSES", "MINERS", "PairLossHead", "build_pair_loss", "loss_arguments", "loss_defaults"]

LOSSES: dict[str, type[BaseMetricLossFunction]] = {
    "contrastive": pml_losses.ContrastiveLoss,
    "triplet": pml_losses.TripletMarginLoss,
    "ntxent": pml_losses.NTXentLoss,
    "proxy_nca": pml_losses.ProxyNCALoss,
    "proxy_anchor": pml_losses.ProxyAnchorLoss,
    "margin": pml_losses.MarginLoss,
    "multi_similarity": pml_losses.MultiSimilarityLoss,
    "soft_triple": pml_losses.SoftTripleLoss,
    "fastap": pml_losses.FastAPLoss,
    "snr": pml_losses.SignalToNoiseRatioContrastiveLoss,
}

MINERS: dict[str, type[BaseMiner]] = {
    "triplet_margin": pml_miners.TripletMarginMiner,
    "multi_similarity": pml_miners.MultiSimilarityMiner,
    "batch_hard": pml_miners.BatchHardMiner,
    "pair_margin": pml_miners.PairMarginMiner,
}

# set from the data by build_pair_loss, never from head.params
_AUTOMATIC = ("num_classes", "embedding_size")
# PML base classes whose constructor arguments are internal (distance/reducer objects, mat_based_loss)
_INTERNAL_BASES = (BaseMetricLossFunction, GenericPairLoss)


def _init_signature(cls: type) -> dict[str, inspect.Parameter]:
    return {
        name: param
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    }


def loss_arguments(name: str) -> dict[str, inspect.Parameter]:
    """Constructor arguments of the PML loss ``name`` that a config may set, walking its PML loss classes
    (``SignalToNoiseRatioContrastiveLoss`` takes ContrastiveLoss's margins, ProxyNCA NCALoss's scale);
    mixins and base classes (distance, reducer, regularisers: objects, not config values) are left out."""
    arguments: dict[str, inspect.Parameter] = {}
    for klass in LOSSES[name].__mro__:
        if not issubclass(klass, BaseMetricLossFunction) or klass in _INTERNAL_BASES or "__init__" not in vars(klass):
            continue
        for arg, param in _init_signature(klass).items():
            arguments.setdefault(arg, param)
    return arguments


def loss_defaults(name: str) -> dict[str, Any]:
    """PML's defaults of loss ``name`` (the arguments :func:`build_pair_loss` fills in automatically excluded).

    >>> loss_defaults("multi_similarity")
    {'alpha': 2, 'beta': 50, 'base': 0.5}
    """
    return {
        arg: param.default
        for arg, param in loss_arguments(name).items()
        if arg not in _AUTOMATIC and param.default is not inspect.Parameter.empty
    }


def _check_keys(given: dict[str, Any], accepted: list[str], prefix: str, owner: str, extra: str = "") -> None:
    for key in given:
        if key not in accepted:
            choices = ", ".join(accepted) if accepted else "no arguments"
            raise ValueError(f"{prefix}.{key} is not an argument of {owner}; it accepts: {choices}{extra}")


class PairLossHead(nn.Module):
    """``forward(embeddings (B, D), labels (B,) int64) -> scalar fp32 loss`` around a PML loss and optional miner.

    Embeddings are cast to fp32 and the loss (and miner) run with autocast disabled. ``margin_factor``
    exists for interface parity with the margin heads (margin warm-up sets it); pair losses ignore it.
    """

    def __init__(self, loss: BaseMetricLossFunction, miner: BaseMiner | None = None, name: str = "") -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.name = name
        self.margin_factor = 1.0  # unused: no margin schedule for pair/proxy losses

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()  # (B, D)
            indices_tuple = self.miner(embeddings, labels) if self.miner is not None else None
            return self.loss(embeddings, labels, indices_tuple)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def build_pair_loss(cfg: HeadConfig, embedding_size: int, n_classes: int) -> PairLossHead:
    """The head for pair/proxy loss ``cfg.name`` (a key of :data:`LOSSES`); see the module docstring.

    Raises ValueError for an unknown loss or miner, a keyword the PML class does not take (naming
    ``head.params.<key>`` and the accepted arguments), or ``direction_gamma > 0`` on a loss without a
    direction-regularised version.
    """
    if cfg.name not in LOSSES:
        raise ValueError(f"head.name={cfg.name!r} is not a pair/proxy loss; choose one of {', '.join(LOSSES)}")
    arguments = loss_arguments(cfg.name)
    settable = [arg for arg in arguments if arg not in _AUTOMATIC]
    params = dict(cfg.params)
    for key in params:
        if key in _AUTOMATIC and key in arguments:
            raise ValueError(f"head.params.{key} is set from the data (model.embedding_size, the number of classes)")
    _check_keys(params, settable, "head.params", f"{LOSSES[cfg.name].__name__} (head.name={cfg.name!r})")

    automatic: dict[str, Any] = {}
    if "embedding_size" in arguments:  # proxy losses
        automatic = {"num_classes": n_classes, "embedding_size": embedding_size}
    elif cfg.name == "margin" and params.get("learn_beta", False):
        automatic = {"num_classes": n_classes}  # one learned beta per class

    gamma = float(cfg.direction_gamma)
    if gamma < 0:
        raise ValueError(f"head.direction_gamma must not be negative (got {gamma})")
    loss_cls: type[BaseMetricLossFunction] = LOSSES[cfg.name]
    if gamma > 0:
        if cfg.name not in DIRECTION_LOSSES:
            raise ValueError(
                f"head.direction_gamma={gamma} but head.name={cfg.name!r} has no direction-regularised version; "
                f"use one of {', '.join(DIRECTION_LOSSES)} or set head.direction_gamma=0"
            )
        loss_cls, automatic = DIRECTION_LOSSES[cfg.name], {**automatic, "gamma": gamma}
    try:
        loss = loss_cls(**automatic, **params)
    except AssertionError as e:  # PML validates some arguments with assert
        raise ValueError(f"head.params for head.name={cfg.name!r}: {e}") from None

    miner = None
    if cfg.miner == "none":
        if cfg.miner_params:
            raise ValueError("head.miner_params is set but head.miner=none")
    elif cfg.miner in MINERS:
        miner_cls = MINERS[cfg.miner]
        _check_keys(cfg.miner_params, list(_init_signature(miner_cls)), "head.miner_params", miner_cls.__name__)
        miner = miner_cls(**cfg.miner_params)
    else:
        raise ValueError(f"head.miner={cfg.miner!r} is unknown; choose none or one of {', '.join(MINERS)}")
    return PairLossHead(loss, miner, name=cfg.name)
