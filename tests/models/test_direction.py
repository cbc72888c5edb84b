"""Direction regularisation: the cosine on hand-built points, the losses on hand-computed 2-D cases (points on
the unit circle, angles from the inscribed-angle theorem), agreement with a transcription of the public
reproduction (alpoler/mohan2020, loss/mvrloss.py) on random batches, gamma = 0 equal to PML's plain losses,
gradients, miners."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn

import arcfold.models.direction as direction
from arcfold.config import HeadConfig
from arcfold.models.direction import (
    DIRECTION_LOSSES,
    DirectionMultiSimilarityLoss,
    DirectionProxyNCALoss,
    DirectionTripletLoss,
    direction_cosine,
)
from arcfold.models.losses import build_pair_loss

F64 = torch.float64
SQRT3 = math.sqrt(3.0)


def vec(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=F64)


def on_circle(*degrees: float) -> torch.Tensor:
    """(len(degrees), 2) unit vectors at the given angles."""
    rad = torch.deg2rad(torch.tensor(degrees, dtype=F64))
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def random_batch(seed: int, n_classes: int = 4, m: int = 3, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g, dtype=F64)
    emb = centres.repeat_interleave(m, dim=0) + 0.8 * torch.randn(n_classes * m, dim, generator=g, dtype=F64)
    return emb, torch.arange(n_classes).repeat_interleave(m)


def tied_batch(seed: int, n_classes: int = 4, m: int = 3, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a class has the same embedding: each positive coincides with its anchor."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g, dtype=F64)
    return centres.repeat_interleave(m, dim=0), torch.arange(n_classes).repeat_interleave(m)


def test_doctests():
    assert doctest.testmod(direction).failed == 0


# --- the cosine at the anchor ---------------------------------------------------------------------


def test_cosine_on_hand_built_points():
    a, p = vec(1, 0, 0), vec(0, 1, 0)  # p - a = (-1, 1, 0)
    cases = [
        (vec(0, 0, 1), 0.5),  # n - a = (-1, 0, 1): 60 degrees
        (vec(1, 1, 0), 2**-0.5),  # (0, 1, 0): 45 degrees
        (vec(2, 1, 0), 0.0),  # (1, 1, 0): 90 degrees
        (vec(3, -2, 0), -1.0),  # (2, -2, 0) = -2 (p - a): 180 degrees
        (vec(-1, 2, 0), 1.0),  # 2 (p - a): 0 degrees
    ]
    for n, expected in cases:
        assert direction_cosine(a, p, n).item() == pytest.approx(expected, abs=1e-12)


def test_cosine_matches_torch_on_explicit_vectors():
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(50, 7, generator=g, dtype=F64) for _ in range(3))
    torch.testing.assert_close(direction_cosine(a, p, n), F.cosine_similarity(p - a, n - a, dim=1))


def test_cosine_is_zero_with_finite_gradient_when_positive_equals_anchor():
    a = vec(0.6, 0.8, 0.0).requires_grad_()
    n = vec(0.0, 0.0, 1.0).requires_grad_()
    cos = direction_cosine(a, a, n)
    cos.sum().backward()
    assert cos.item() == 0.0
    assert torch.isfinite(a.grad).all() and torch.isfinite(n.grad).all()


# --- hand-computed cases: four points on the unit circle ----------------------------------------
# A = 0, P = 60, N = 180, M = 300 degrees; classes {A, P} and {N, M}. Chord of an arc t: 2 sin(t / 2)
# (60 -> 1, 120 -> sqrt 3, 180 -> 2). The angle at the anchor between the chords to p and n is half the
# arc from p to n that does not contain the anchor (inscribed-angle theorem).

CIRCLE = on_circle(0, 60, 180, 300)
CIRCLE_LABELS = torch.tensor([0, 0, 1, 1])
# (anchor, positive, negative): (|a - p|, |a - n|, cos of the angle at a)
CIRCLE_TRIPLETS = {
    ("A", "P", "N"): (1.0, 2.0, 0.5),  # arc P..N = 120 -> 60 degrees
    ("A", "P", "M"): (1.0, 1.0, -0.5),  # arc P..M through N = 240 -> 120 degrees
    ("P", "A", "N"): (1.0, SQRT3, 0.0),  # arc A..N through M = 180 -> 90 degrees
    ("P", "A", "M"): (1.0, SQRT3, SQRT3 / 2),  # arc M..A = 60 -> 30 degrees
    ("N", "M", "A"): (SQRT3, 2.0, SQRT3 / 2),  # arc M..A = 60 -> 30 degrees
    ("N", "M", "P"): (SQRT3, SQRT3, 0.5),  # arc M..P through A = 120 -> 60 degrees
    ("M", "N", "A"): (SQRT3, 1.0, 0.0),  # arc N..A through P = 180 -> 90 degrees
    ("M", "N", "P"): (SQRT3, SQRT3, 0.5),  # arc P..N = 120 -> 60 degrees
}


def test_triplet_on_the_circle():
    margin, gamma = 0.5, 0.4
    hinge = [max(0.0, ap - an + margin - gamma * cos) for ap, an, cos in CIRCLE_TRIPLETS.values()]
    # by hand: 0, 0.7, 0, 0, 0, 0.3, sqrt 3 - 0.5, 0.3 (the cos < 0 of (A, P, M) adds 0.2, the others subtract)
    assert hinge == pytest.approx([0, 0.7, 0, 0, 0, 0.3, SQRT3 - 0.5, 0.3])
    loss = DirectionTripletLoss(gamma=gamma, margin=margin)
    assert loss(CIRCLE, CIRCLE_LABELS).item() == pytest.approx(0.2 + SQRT3 / 4)  # mean of the 4 positive ones
    mean_all = DirectionTripletLoss(gamma=gamma, margin=margin, reducer=MeanReducer())
    assert mean_all(CIRCLE, CIRCLE_LABELS).item() == pytest.approx((0.8 + SQRT3) / 8)  # the reproduction's mean


def test_proxy_nca_on_the_circle():
    # x at 0 degrees, its class proxy at 90, the other proxies at 180 and 270. Squared distances 2, 4, 2;
    # angle at x between the chords to 90 and 180: 45 degrees; to 90 and 270: 90 degrees.
    gamma = 1.0
    loss = DirectionProxyNCALoss(num_classes=3, embedding_size=2, gamma=gamma)
    loss.proxies = nn.Parameter(on_circle(90, 180, 270))
    expected = 2 + math.log(math.exp(-2) + math.exp(-(4 + gamma * 2**-0.5)) + math.exp(-(2 + gamma * 0.0)))
    assert loss(on_circle(0), torch.tensor([0])).item() == pytest.approx(expected)


def test_multi_similarity_on_the_circle():
    alpha, beta, base, gamma = 2.0, 10.0, 0.3, 0.4
    # per anchor: similarity to its one positive; (similarity, cos of the angle at the anchor) per negative
    anchors = [
        (0.5, [(-1.0, 0.5), (0.5, -0.5)]),  # A: P; N, M
        (0.5, [(-0.5, 0.0), (-0.5, SQRT3 / 2)]),  # P: A; N, M
        (-0.5, [(-1.0, SQRT3 / 2), (-0.5, 0.5)]),  # N: M; A, P
        (-0.5, [(0.5, 0.0), (-0.5, 0.5)]),  # M: N; A, P
    ]
    expected = [
        math.log(1 + math.exp(-alpha * (s_p - base))) / alpha
        + math.log(1 + sum(math.exp(beta * (s_n - base - gamma * cos)) for s_n, cos in negatives)) / beta
        for s_p, negatives in anchors
    ]
    loss = DirectionMultiSimilarityLoss(gamma=gamma, alpha=alpha, beta=beta, base=base)
    assert loss(CIRCLE, CIRCLE_LABELS).item() == pytest.approx(sum(expected) / 4)


# --- the public reproduction, transcribed ---------------------------------------------------------
# github.com/alpoler/mohan2020, loss/mvrloss.py (a CENG501 reproduction of the paper). Triplet and ProxyNCA:
# MVR_Triplet.forward lines 35-44 and MVR_Proxy.forward lines 59-92 at commit
# 1970458bc21aed27f512c393f3cc4807443facd5 (same maths at 15fd8d88d0cd736db57afadf262dc7889e68ca2d);
# multi-similarity: MVR_MS_reg.forward lines 167-222 of the later version that adds it (the search index does not
# give its commit; hyper_train.py at 12206e56297a5c94429fece6def21437eee77ed7 imports it). Only the formulas are
# written out here. nn.PairwiseDistance's eps (1e-6 added to every coordinate difference) is left out.


def mohan2020_triplet(x: torch.Tensor, labels: torch.Tensor, margin: float, reg: float) -> torch.Tensor:
    a, p, n = lmu.get_all_triplets_indices(labels)  # every triplet of the batch, as the reproduction
    cos = F.cosine_similarity(x[p] - x[a], x[n] - x[a], dim=1)
    return F.relu((x[a] - x[p]).norm(dim=1) - (x[a] - x[n]).norm(dim=1) + margin - reg * cos).mean()


def mohan2020_proxy_nca(x: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, reg: float) -> torch.Tensor:
    """Per sample: -log( exp(-d_y) / sum_{z != y} exp(-(d_z + reg cos_z)) ), unsquared distances."""
    d = torch.cdist(x, proxies)  # (B, C)
    cos = F.cosine_similarity(proxies[None] - x[:, None], (proxies[labels] - x)[:, None], dim=2)  # (B, C)
    own = F.one_hot(labels, len(proxies)).bool()
    return d[own] + torch.logsumexp(-(d + reg * cos)[~own].view(len(x), -1), dim=1)


def mohan2020_multi_similarity(x, labels, scale_pos, scale_neg, thresh, margin, gamma):
    sim = x @ x.T
    total = torch.zeros((), dtype=x.dtype)
    for i in range(len(x)):
        pos = [j for j in range(len(x)) if labels[j] == labels[i] and sim[i, j] < 1 - 1e-5]
        neg = [k for k in range(len(x)) if labels[k] != labels[i]]
        pos_kept = [j for j in pos if sim[i, j] - margin < max(sim[i, k] for k in neg)]
        neg_kept = [k for k in neg if sim[i, k] + margin > min(sim[i, j] for j in pos)]
        if not pos_kept or not neg_kept:
            continue
        hardest = min(pos_kept, key=lambda j: sim[i, j])
        reg = gamma * F.cosine_similarity(x[neg_kept] - x[i], (x[hardest] - x[i])[None], dim=1)
        total = total + torch.log(1 + torch.exp(-scale_pos * (sim[i, pos_kept] - thresh)).sum()) / scale_pos
        total = total + torch.log(1 + torch.exp(scale_neg * (sim[i, neg_kept] - thresh - reg)).sum()) / scale_neg
    return total / len(x)


@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_matches_the_reproduction(seed):
    emb, labels = random_batch(seed)
    emb.requires_grad_()
    ours = DirectionTripletLoss(gamma=0.49, margin=0.28, reducer=MeanReducer())(emb, labels)
    (grad_ours,) = torch.autograd.grad(ours, emb)
    # the reproduction's network L2-normalises its output; arcfold's loss does it (PML's distance)
    reference = mohan2020_triplet(F.normalize(emb), labels, margin=0.28, reg=0.49)
    (grad_reference,) = torch.autograd.grad(reference, emb)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=0, atol=1e-6)


def test_proxy_nca_matches_the_reproduction_up_to_the_own_proxy_in_the_denominator():
    emb, labels = random_batch(2)
    x = F.normalize(emb)
    proxies = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(2), dtype=F64))  # its init
    loss = DirectionProxyNCALoss(num_classes=5, embedding_size=8, gamma=0.3, distance=LpDistance(power=1))
    loss.proxies = nn.Parameter(proxies.clone())
    # with the own proxy also in the denominator, -log(e^-d_y / (e^-d_y + S)) = log(1 + S e^d_y) = softplus(r)
    expected = F.softplus(mohan2020_proxy_nca(x, labels, proxies, reg=0.3)).mean()
    assert loss(x, labels).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("seed", [3, 4])
def test_multi_similarity_with_its_miner_matches_the_reproduction(seed):
    emb, labels = random_batch(seed, n_classes=5, m=4)
    x = F.normalize(emb)
    pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, labels)
    assert len(pairs[0]) > 0 and len(pairs[2]) > 0
    ours = DirectionMultiSimilarityLoss(gamma=0.3, alpha=2.0, beta=50.0, base=0.6)(x, labels, pairs)
    reference = mohan2020_multi_similarity(x, labels, 2.0, 50.0, thresh=0.6, margin=0.1, gamma=0.3)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6)


# --- gamma = 0: PML's plain losses, value for value -------------------------------------------------


def test_gamma_zero_is_pml_triplet():
    for emb, labels in (random_batch(3), tied_batch(3)):
        torch.testing.assert_close(
            DirectionTripletLoss(margin=0.3)(emb, labels), pml.TripletMarginLoss(margin=0.3)(emb, labels)
        )


def test_gamma_zero_is_pml_proxy_nca():
    torch.manual_seed(0)
    emb, labels = random_batch(4)
    dr = DirectionProxyNCALoss(num_classes=4, embedding_size=8, softmax_scale=3.0)
    reference = pml.ProxyNCALoss(num_classes=4, embedding_size=8, softmax_scale=3.0)
    reference.load_state_dict(dr.state_dict())
    torch.testing.assert_close(dr(emb, labels), reference(emb, labels))


def test_gamma_zero_is_pml_multi_similarity():
    emb, labels = random_batch(5)
    kwargs = {"alpha": 2.0, "beta": 10.0, "base": 0.3}
    torch.testing.assert_close(
        DirectionMultiSimilarityLoss(**kwargs)(emb, labels), pml.MultiSimilarityLoss(**kwargs)(emb, labels)
    )


# --- gradients ----------------------------------------------------------------------------------------


def test_regulariser_turns_the_negative_towards_the_anchor_positive_direction():
    # a = e1, p = e2, n = e3, one triplet with an active hinge: the regulariser's part of the negative's
    # descent direction is gamma (u - cos v) / |v| with u, v the unit vectors of p - a and n - a (d cos / d n),
    # projected on the sphere's tangent plane at n (the loss sees normalised embeddings)
    emb, labels = torch.eye(3, dtype=F64), torch.tensor([0, 0, 1])
    triplet = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))

    def push(gamma: float) -> torch.Tensor:
        x = emb.clone().requires_grad_()
        DirectionTripletLoss(gamma=gamma, margin=3.0)(x, labels, triplet).backward()  # hinge active
        return -x.grad[2]

    u, v = torch.tensor([-1.0, 1, 0], dtype=F64) / 2**0.5, torch.tensor([-1.0, 0, 1], dtype=F64) / 2**0.5
    turn = (u - 0.5 * v) / 2**0.5  # cos = 1/2, |n - a| = sqrt 2
    turn = turn - turn[2] * emb[2]  # tangential at n = e3
    torch.testing.assert_close(push(2.0) - push(0.0), 2.0 * turn)


def test_degenerate_positive_equal_to_anchor_gives_finite_gradients():
    emb, labels = tied_batch(6)
    emb = emb.clone().requires_grad_()
    for loss in (DirectionTripletLoss(gamma=1.0), DirectionMultiSimilarityLoss(gamma=1.0)):
        emb.grad = None
        value = loss(emb, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(emb.grad).all()


# --- through build_pair_loss ----------------------------------------------------------------------


def dr_head(name: str, gamma: float = 0.5, **kwargs):
    return build_pair_loss(HeadConfig(name=name, direction_gamma=gamma, **kwargs), embedding_size=8, n_classes=4)


def test_build_pair_loss_picks_the_regularised_loss():
    for name, cls in DIRECTION_LOSSES.items():
        head = dr_head(name, 0.5)
        assert type(head.loss) is cls and head.loss.gamma == 0.5
    assert dr_head("triplet", params={"margin": 0.2}).loss.margin == 0.2
    with pytest.raises(ValueError, match="swap"):
        dr_head("triplet", params={"swap": True})
    with pytest.raises(ValueError, match=r"head\.params\.gamma"):
        dr_head("multi_similarity", params={"gamma": 0.1})  # gamma comes from head.direction_gamma


@pytest.mark.parametrize(
    ("name", "miner", "miner_params"),
    [
        ("triplet", "triplet_margin", {"margin": -0.1}),  # a strict subset of the triplets with a positive loss
        ("triplet", "batch_hard", {}),
        ("multi_similarity", "multi_similarity", {"epsilon": 0.1}),
        ("proxy_nca", "pair_margin", {"pos_margin": 0.5, "neg_margin": 1.2}),
    ],
)
def test_regularised_loss_with_miner_equals_loss_on_the_mined_indices(name, miner, miner_params):
    torch.manual_seed(0)
    head = dr_head(name, 0.5, miner=miner, miner_params=miner_params)
    emb, labels = random_batch(7)
    emb = emb.float()
    mined = {
        "triplet_margin": pml_miners.TripletMarginMiner,
        "batch_hard": pml_miners.BatchHardMiner,
        "multi_similarity": pml_miners.MultiSimilarityMiner,
        "pair_margin": pml_miners.PairMarginMiner,
    }[miner](**miner_params)(emb, labels)
    assert len(mined[0]) > 0
    torch.testing.assert_close(head(emb, labels), head.loss(emb, labels, mined))
    assert not torch.isclose(head(emb, labels), head.loss(emb, labels))


@pytest.mark.parametrize("name", list(DIRECTION_LOSSES))
def test_regularised_loss_fp32_under_bf16_autocast(name):
    torch.manual_seed(0)
    head, net = dr_head(name, 0.5), nn.Linear(8, 8)
    x, labels = random_batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(x.float())
        loss = head(emb, labels)
    assert emb.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, head(emb.detach().float(), labels))


@pytest.mark.parametrize("name", list(DIRECTION_LOSSES))
def test_regularised_loss_falls_within_ten_steps(name):
    torch.manual_seed(0)
    _, labels = random_batch(9)
    emb = nn.Parameter(torch.randn(len(labels), 8))
    head = dr_head(name, 0.5)
    optimizer = torch.optim.Adam([emb, *head.parameters()], lr=0.05)
    first = None
    for _ in range(10):
        loss = head(emb, labels)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert head(emb, labels).item() < first
