"""Pair/proxy loss heads: each against pytorch-metric-learning's own class on the same inputs and weights,
with and without miners; the loss falls in 10 optimiser steps; fp32 under bf16 autocast; config errors."""

from __future__ import annotations

import doctest

import pytest
import torch
from pytorch_metric_learning import losses as pml
from torch import nn

import arcfold.models.losses as losses_module
from arcfold.config import HeadConfig
from arcfold.models.losses import LOSSES, MINERS, PairLossHead, build_pair_loss, loss_defaults

N_CLASSES, DIM = 6, 16

# per loss: non-default parameters (so that a dropped keyword changes the value) and PML's class built
# independently with the same ones
REFERENCES = {
    "contrastive": (
        {"pos_margin": 0.1, "neg_margin": 1.3},
        lambda: pml.ContrastiveLoss(pos_margin=0.1, neg_margin=1.3),
    ),
    "triplet": ({"margin": 0.3}, lambda: pml.TripletMarginLoss(margin=0.3)),
    "ntxent": ({"temperature": 0.2}, lambda: pml.NTXentLoss(temperature=0.2)),
    "proxy_nca": (
        {"softmax_scale": 3.0},
        lambda: pml.ProxyNCALoss(num_classes=N_CLASSES, embedding_size=DIM, softmax_scale=3.0),
    ),
    "proxy_anchor": (
        {"margin": 0.2, "alpha": 16},
        lambda: pml.ProxyAnchorLoss(num_classes=N_CLASSES, embedding_size=DIM, margin=0.2, alpha=16),
    ),
    "margin": ({"margin": 0.1, "beta": 1.0}, lambda: pml.MarginLoss(margin=0.1, beta=1.0)),
    "multi_similarity": (
        {"alpha": 1.0, "beta": 40.0, "base": 0.3},
        lambda: pml.MultiSimilarityLoss(alpha=1.0, beta=40.0, base=0.3),
    ),
    "soft_triple": (
        {"centers_per_class": 3, "la": 10.0},
        lambda: pml.SoftTripleLoss(num_classes=N_CLASSES, embedding_size=DIM, centers_per_class=3, la=10.0),
    ),
    "fastap": ({"num_bins": 4}, lambda: pml.FastAPLoss(num_bins=4)),
    "snr": ({"neg_margin": 0.5}, lambda: pml.SignalToNoiseRatioContrastiveLoss(neg_margin=0.5)),
}


def make_batch(seed: int = 0, n_classes: int = 4, m: int = 4, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_classes * m, dim) random embeddings with some class structure, labels (n_classes * m,) int64."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    emb = centres.repeat_interleave(m, dim=0) + torch.randn(n_classes * m, dim, generator=g)
    return emb, torch.arange(n_classes).repeat_interleave(m)


def head_for(name: str, params: dict | None = None, **kwargs) -> PairLossHead:
    return build_pair_loss(HeadConfig(name=name, params=params or {}, **kwargs), DIM, N_CLASSES)


def test_doctests():
    assert doctest.testmod(losses_module).failed == 0


def test_registry_names():
    assert set(LOSSES) == set(REFERENCES)
    assert set(MINERS) == {"triplet_margin", "multi_similarity", "batch_hard", "pair_margin"}


def test_documented_defaults_are_pmls():
    # the module docstring's table; this fails if pytorch-metric-learning changes a default
    assert {name: loss_defaults(name) for name in LOSSES} == {
        "contrastive": {"pos_margin": 0, "neg_margin": 1},
        "triplet": {"margin": 0.05, "swap": False, "smooth_loss": False, "triplets_per_anchor": "all"},
        "ntxent": {"temperature": 0.07},
        "proxy_nca": {"softmax_scale": 1},
        "proxy_anchor": {"margin": 0.1, "alpha": 32},
        "margin": {"margin": 0.2, "nu": 0, "beta": 1.2, "triplets_per_anchor": "all", "learn_beta": False},
        "multi_similarity": {"alpha": 2, "beta": 50, "base": 0.5},
        "soft_triple": {"centers_per_class": 10, "la": 20, "gamma": 0.1, "margin": 0.01},
        "fastap": {"num_bins": 10},
        "snr": {"pos_margin": 0, "neg_margin": 1},
    }


@pytest.mark.parametrize("name", list(REFERENCES))
def test_head_equals_pytorch_metric_learning(name):
    params, make_reference = REFERENCES[name]
    torch.manual_seed(0)
    head = head_for(name, params)
    reference = make_reference()
    reference.load_state_dict(head.loss.state_dict())  # same proxies / centres
    emb, labels = make_batch()
    value = head(emb, labels)
    assert value.dtype == torch.float32 and value.ndim == 0 and value.item() > 0
    torch.testing.assert_close(value, reference(emb, labels))
    # the parameters matter: PML's defaults (same weights where the shapes allow) give another value
    default = head_for(name)
    if name != "soft_triple":  # centers_per_class changes the shape of SoftTriple's centres
        default.load_state_dict(head.state_dict())
    assert not torch.isclose(default(emb, labels), value)


MINER_CASES = [
    ("triplet_margin", {"margin": 0.1, "type_of_triplets": "semihard"}, "triplet"),
    ("triplet_margin", {}, "contrastive"),
    ("multi_similarity", {"epsilon": 0.2}, "multi_similarity"),
    ("multi_similarity", {}, "proxy_anchor"),
    ("batch_hard", {}, "triplet"),
    ("batch_hard", {}, "ntxent"),
    ("pair_margin", {"pos_margin": 0.1, "neg_margin": 0.9}, "contrastive"),
    ("pair_margin", {"pos_margin": 0.5, "neg_margin": 1.2}, "proxy_nca"),
]


@pytest.mark.parametrize(("miner", "miner_params", "name"), MINER_CASES)
def test_head_with_miner_equals_loss_on_the_mined_indices(miner, miner_params, name):
    params, make_reference = REFERENCES[name]
    torch.manual_seed(0)
    head = head_for(name, params, miner=miner, miner_params=miner_params)
    assert isinstance(head.miner, MINERS[miner])
    reference = make_reference()
    reference.load_state_dict(head.loss.state_dict())
    reference_miner = MINERS[miner](**miner_params)
    emb, labels = make_batch(seed=1)
    indices = reference_miner(emb, labels)
    assert 0 < len(indices[0]) < len(labels) ** 2  # the miner kept some, not all
    torch.testing.assert_close(head(emb, labels), reference(emb, labels, indices))
    assert not torch.isclose(head(emb, labels), reference(emb, labels))  # mining changed the loss


@pytest.mark.parametrize("name", list(REFERENCES))
def test_fp32_result_under_bf16_autocast(name):
    torch.manual_seed(0)
    head = head_for(name, REFERENCES[name][0])
    net = nn.Linear(DIM, DIM)
    x, labels = make_batch(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(x)
        loss = head(emb, labels)
    assert emb.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # autocast is off inside the head: same value as an fp32 call on the bf16-rounded embeddings
    torch.testing.assert_close(loss, head(emb.detach().float(), labels))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


FALLS_CASES = [(name, REFERENCES[name][0], "none") for name in REFERENCES] + [
    ("triplet", {}, "batch_hard"),
    ("multi_similarity", {}, "multi_similarity"),
    ("contrastive", {}, "pair_margin"),
]


@pytest.mark.parametrize(("name", "params", "miner"), FALLS_CASES)
def test_loss_falls_within_ten_steps(name, params, miner):
    torch.manual_seed(0)
    emb0, labels = make_batch(seed=3, n_classes=4, m=4)
    emb = nn.Parameter(torch.randn_like(emb0))  # no class structure to start from
    head = head_for(name, params, miner=miner)
    optimizer = torch.optim.Adam([emb, *head.parameters()], lr=0.05)
    values = []
    for _ in range(10):
        loss = head(emb, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    final = head(emb, labels).item()
    assert final < values[0], (name, values, final)


def test_loss_parameters_belong_to_the_head():
    assert dict(head_for("proxy_nca").named_parameters())["loss.proxies"].shape == (N_CLASSES, DIM)
    assert dict(head_for("proxy_anchor").named_parameters())["loss.proxies"].shape == (N_CLASSES, DIM)
    soft = head_for("soft_triple", {"centers_per_class": 3})
    assert dict(soft.named_parameters())["loss.fc"].shape == (DIM, N_CLASSES * 3)
    assert dict(head_for("margin", {"learn_beta": True}).named_parameters())["loss.beta"].shape == (N_CLASSES,)
    assert list(head_for("triplet").parameters()) == []
    # the proxies get a gradient, so the optimiser's head group trains them
    head = head_for("proxy_nca")
    emb, labels = make_batch()
    head(emb, labels).backward()
    assert head.loss.proxies.grad is not None and head.loss.proxies.grad.abs().sum() > 0
    assert "loss.proxies" in head.state_dict()


def test_margin_factor_is_one():
    head = head_for("triplet")
    assert head.margin_factor == 1.0
    emb, labels = make_batch()
    before = head(emb, labels)
    head.margin_factor = 0.0  # set by a margin warm-up; pair losses ignore it
    assert head(emb, labels) == before


def test_unknown_keyword_names_the_key_and_the_accepted_arguments():
    with pytest.raises(
        ValueError, match=r"head\.params\.marign .*accepts: margin, swap, smooth_loss, triplets_per_anchor"
    ):
        head_for("triplet", {"marign": 0.1})
    with pytest.raises(ValueError, match=r"head\.params\.num_classes is set from the data"):
        head_for("proxy_nca", {"num_classes": 3})
    with pytest.raises(ValueError, match=r"head\.params\.distance .*accepts: pos_margin, neg_margin"):
        head_for("snr", {"distance": "cosine"})


def test_unknown_names_and_miner_keywords():
    with pytest.raises(ValueError, match="head.name='lifted'.*contrastive"):
        head_for("lifted")
    with pytest.raises(ValueError, match="head.miner='hdc'"):
        head_for("triplet", miner="hdc")
    with pytest.raises(ValueError, match=r"head\.miner_params\.eps .*accepts: epsilon"):
        head_for("triplet", miner="multi_similarity", miner_params={"eps": 0.1})
    with pytest.raises(ValueError, match=r"head\.miner_params\.margin .*no arguments"):
        head_for("triplet", miner="batch_hard", miner_params={"margin": 0.1})
    with pytest.raises(ValueError, match="head.miner=none"):
        head_for("triplet", miner_params={"margin": 0.1})


def test_direction_gamma_only_for_losses_with_a_regularised_version():
    with pytest.raises(ValueError, match="head.direction_gamma=0.5 .*'contrastive'"):
        head_for("contrastive", direction_gamma=0.5)
    assert type(head_for("triplet").loss) is pml.TripletMarginLoss  # gamma = 0: PML's loss itself
