import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import TripletMarginLoss

from arcfold.config import HeadConfig
from arcfold.models.heads import ArcFaceHead, build_head
from arcfold.models.losses import LOSSES, PairLossHead
from arcfold.models.margins import arcface_logits, dynamic_margins, inverse_log_class_weights, margin_warmup_factor


def test_arcface_logits_closed_form():
    # three samples, target angles 0.3, 1.2 (ordinary) and 2.9 rad (past pi - m, m = 0.5)
    m, s = 0.5, 30.0
    thetas = torch.tensor([0.3, 1.2, 2.9], dtype=torch.float64)
    other = torch.tensor([0.1, -0.4, 0.7], dtype=torch.float64)
    cosine = torch.stack([torch.cos(thetas), other], dim=1)  # (3, 2), class 0 is the target
    labels = torch.zeros(3, dtype=torch.long)
    logits = arcface_logits(cosine, labels, margin=m, scale=s)
    expected_target = [s * math.cos(0.3 + m), s * math.cos(1.2 + m), s * (math.cos(2.9) - m * math.sin(m))]
    assert logits.dtype == torch.float32
    expected = torch.tensor(expected_target, dtype=torch.float64)
    torch.testing.assert_close(logits[:, 0].double(), expected, atol=1e-4, rtol=0)
    # non-target logits are only scaled
    torch.testing.assert_close(logits[:, 1].double(), s * other, atol=1e-5, rtol=0)


def test_arcface_target_logit_is_monotonic_past_pi():
    # cos(theta + m) rises again once theta + m > pi; the continuation must keep falling
    m = 0.5
    thetas = torch.linspace(0.0, math.pi, 2001)
    cosine = torch.cos(thetas)[:, None]
    logits = arcface_logits(cosine, torch.zeros(len(thetas), dtype=torch.long), margin=m, scale=1.0)[:, 0]
    assert (logits[1:] - logits[:-1] <= 1e-6).all()


def test_arcface_head_matches_pytorch_metric_learning():
    from pytorch_metric_learning.losses import ArcFaceLoss

    torch.manual_seed(0)
    n, d, c = 16, 8, 5
    emb, labels = torch.randn(n, d), torch.randint(0, c, (n,))
    head = ArcFaceHead(d, c, scale=64.0, margin=math.radians(28.6))
    reference = ArcFaceLoss(num_classes=c, embedding_size=d, margin=28.6, scale=64)  # margin in degrees
    with torch.no_grad():
        reference.W.copy_(head.weight.T)  # PML stores W as (D, C)
    # ordinary angles only here; test_heads_reference.py compares past pi - m (PML 2.x has the same continuation)
    theta = torch.acos(head.cosine(emb).gather(1, labels[:, None]).clamp(-1, 1))
    assert (theta < math.pi - head.margin).all()
    torch.testing.assert_close(head(emb, labels), reference(emb, labels), atol=1e-4, rtol=1e-4)


def test_arcface_margin_math_stays_fp32_under_autocast():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 7)
    emb = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosine = head.cosine(emb.bfloat16())
        loss = head(emb.bfloat16(), torch.tensor([0, 1, 2, 3]))
    assert cosine.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(cosine, F.linear(F.normalize(emb.bfloat16().float()), F.normalize(head.weight)))
    assert torch.isfinite(loss)


def test_arcface_gradient_is_finite_at_the_boundaries():
    # cos = +-1 exactly: sqrt(1 - cos^2) has an infinite derivative there unless clamped
    cosine = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    logits = arcface_logits(cosine, torch.tensor([0, 0]), margin=0.5, scale=30.0)
    F.cross_entropy(logits, torch.tensor([0, 0])).backward()
    assert torch.isfinite(cosine.grad).all()


def test_margin_makes_the_loss_larger_and_training_reduces_it():
    torch.manual_seed(0)
    emb, labels = torch.randn(32, 8), torch.randint(0, 4, (32,))
    plain = ArcFaceHead(8, 4, margin=0.0)
    margin = ArcFaceHead(8, 4, margin=0.4)
    margin.load_state_dict(plain.state_dict())
    assert margin(emb, labels) > plain(emb, labels)
    # the loss falls when only the class centres and embeddings are optimised
    emb = emb.clone().requires_grad_(True)
    opt = torch.optim.SGD([emb, *margin.parameters()], lr=0.5)
    first = margin(emb, labels).item()
    for _ in range(30):
        opt.zero_grad()
        loss = margin(emb, labels)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_build_head_by_name():
    head = build_head(HeadConfig(name="arcface", scale=16.0, margin=0.2), 32, 10)
    assert head.weight.shape == (10, 32) and head.scale == 16.0 and head.margin == 0.2
    with pytest.raises(ValueError, match="head.name='nope' is unknown"):
        build_head(HeadConfig(name="nope"), 32, 10)


def test_arcface_per_sample_margins_closed_form():
    # one margin per sample (per-class margins gathered by label), radians, written out in float64
    s = 20.0
    thetas = torch.tensor([0.3, 1.2, 2.9], dtype=torch.float64)
    margins = torch.tensor([0.1, 0.5, 0.5], dtype=torch.float64)  # sample 2 is past pi - m
    other = torch.tensor([0.2, -0.3, 0.6], dtype=torch.float64)
    cosine = torch.stack([other, torch.cos(thetas)], dim=1)  # (3, 2), class 1 is the target
    logits = arcface_logits(cosine, torch.ones(3, dtype=torch.long), margin=margins.float(), scale=s)
    expected = [s * math.cos(0.3 + 0.1), s * math.cos(1.2 + 0.5), s * (math.cos(2.9) - 0.5 * math.sin(0.5))]
    torch.testing.assert_close(logits[:, 1].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[:, 0].double(), s * other, atol=1e-5, rtol=0)


def test_arcface_head_with_class_margins_uses_the_target_class_margin():
    torch.manual_seed(0)
    n, d, c = 12, 8, 3
    emb, labels = torch.randn(n, d), torch.randint(0, c, (n,))
    class_margins = torch.tensor([0.1, 0.3, 0.6])
    head = ArcFaceHead(d, c, scale=30.0, margin=0.3, class_margins=class_margins)
    cos = head.cosine(emb).double()
    theta_y = torch.acos(cos.gather(1, labels[:, None]))[:, 0]
    target = 30.0 * torch.cos(theta_y + class_margins.double()[labels])  # all angles here are far below pi - m
    expected_logits = (30.0 * cos).scatter(1, labels[:, None], target[:, None])
    torch.testing.assert_close(head.logits(emb, labels).double(), expected_logits, atol=1e-4, rtol=0)
    expected = torch.logsumexp(expected_logits, 1) - target
    torch.testing.assert_close(head(emb, labels).double(), expected.mean(), atol=1e-5, rtol=1e-5)
    assert "class_margins" in head.state_dict()


def test_arcface_without_class_margins_keeps_the_old_state_dict():
    # checkpoints written before per-class margins hold only the weight: they must still load strictly
    head = ArcFaceHead(8, 3)
    assert list(head.state_dict()) == ["weight"]
    ArcFaceHead(8, 3).load_state_dict(head.state_dict())


def test_build_head_every_name():
    from arcfold.models import heads

    expected = {
        "softmax": heads.SoftmaxHead,
        "norm_softmax": heads.NormSoftmaxHead,
        "cosface": heads.CosFaceHead,
        "arcface": heads.ArcFaceHead,
        "subcenter_arcface": heads.SubCenterArcFaceHead,
        "adacos": heads.AdaCosHead,
    }
    assert heads.HEADS == expected
    for name, cls in expected.items():
        head = build_head(HeadConfig(name=name, scale=16.0, margin=0.2, subcenters=4), 32, 10)
        assert type(head) is cls and head.margin_factor == 1.0
    assert build_head(HeadConfig(name="softmax"), 32, 10).fc.bias.shape == (10,)
    assert build_head(HeadConfig(name="norm_softmax", scale=16.0), 32, 10).scale == 16.0
    cosface = build_head(HeadConfig(name="cosface", scale=16.0, margin=0.25), 32, 10)
    assert (cosface.scale, cosface.margin, cosface.weight.shape) == (16.0, 0.25, (10, 32))
    sub = build_head(HeadConfig(name="subcenter_arcface", subcenters=4, margin=0.2), 32, 10)
    assert sub.weight.shape == (40, 32) and sub.subcenters == 4 and sub.margin == 0.2
    adacos = build_head(HeadConfig(name="adacos"), 32, 10)
    assert math.isclose(adacos.scale.item(), math.sqrt(2) * math.log(9), rel_tol=1e-6)


def test_build_head_loss_options():
    counts = np.array([1, 5, 20, 100])
    head = build_head(HeadConfig(name="cosface", class_weights="inv_log", loss="focal", focal_gamma=1.5), 8, 4, counts)
    assert head.loss_name == "focal" and head.focal_gamma == 1.5
    torch.testing.assert_close(head.class_weights, torch.tensor(inverse_log_class_weights(counts), dtype=torch.float32))
    assert "class_weights" in head.state_dict()
    plain = build_head(HeadConfig(name="cosface"), 8, 4, counts)  # counts given but not needed: ignored
    assert plain.class_weights is None and plain.class_margins is None and plain.loss_name == "ce"


@pytest.mark.parametrize("name", ["arcface", "subcenter_arcface", "cosface"])
@pytest.mark.parametrize("mode", ["power", "minmax"])
def test_build_head_dynamic_margins(name, mode):
    counts = np.array([1, 5, 20, 100])
    cfg = HeadConfig(name=name, dynamic_margin=mode, margin_a=0.4, margin_lambda=0.3, margin_b=0.1)
    head = build_head(cfg, 8, 4, counts)
    expected = dynamic_margins(counts, mode, a=0.4, lam=0.3, b=0.1, m_min=cfg.margin_min, m_max=cfg.margin_max)
    torch.testing.assert_close(head.class_margins, torch.tensor(expected, dtype=torch.float32))
    assert head.class_margins.dtype == torch.float32 and "class_margins" in head.state_dict()


def test_build_head_needs_class_counts():
    with pytest.raises(ValueError, match="head.dynamic_margin=power need class_counts"):
        build_head(HeadConfig(name="arcface", dynamic_margin="power"), 8, 4)
    with pytest.raises(ValueError, match="head.class_weights=inv_log need class_counts"):
        build_head(HeadConfig(name="softmax", class_weights="inv_log"), 8, 4)
    with pytest.raises(ValueError, match=r"class_counts must have shape \(4,\)"):
        build_head(HeadConfig(name="arcface", class_weights="inv_log"), 8, 4, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="at least one training image"):
        build_head(HeadConfig(name="arcface", class_weights="inv_log"), 8, 4, np.array([1, 2, 0, 3]))
    with pytest.raises(ValueError, match="applies to cosface, arcface, subcenter_arcface, not norm_softmax"):
        build_head(HeadConfig(name="norm_softmax", dynamic_margin="minmax"), 8, 4, np.array([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="head.loss='nll' is unknown"):
        build_head(HeadConfig(name="arcface", loss="nll"), 8, 4)
    with pytest.raises(ValueError, match="must be < pi"):
        build_head(HeadConfig(name="arcface", dynamic_margin="power", margin_a=5.0), 8, 2, np.array([1, 2]))
    with pytest.raises(ValueError, match="adacos needs at least 3 classes"):
        build_head(HeadConfig(name="adacos"), 8, 2)


def test_build_head_hands_pair_losses_to_the_losses_module():
    head = build_head(HeadConfig(name="triplet"), 32, 10)
    assert isinstance(head, PairLossHead) and isinstance(head.loss, TripletMarginLoss)
    assert isinstance(build_head(HeadConfig(name="arcface"), 32, 10), ArcFaceHead)  # margin heads come first
    with pytest.raises(ValueError, match="head.name='nope' is unknown") as e:
        build_head(HeadConfig(name="nope"), 32, 10)
    for name in ["softmax", "norm_softmax", "cosface", "arcface", "subcenter_arcface", "adacos", *LOSSES]:
        assert name in str(e.value)


def test_margin_warmup_factor():
    assert margin_warmup_factor(0.0, 2.0) == 0.0
    assert margin_warmup_factor(0.5, 2.0) == 0.25
    assert margin_warmup_factor(2.0, 2.0) == 1.0
    assert margin_warmup_factor(7.3, 2.0) == 1.0
    assert margin_warmup_factor(0.0, 0.0) == 1.0  # no warm-up
    with pytest.raises(ValueError, match="must not be negative"):
        margin_warmup_factor(0.0, -1.0)


@pytest.mark.parametrize("name", ["arcface", "subcenter_arcface", "cosface"])
def test_margin_factor_scales_the_margin(name):
    torch.manual_seed(0)
    emb, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
    half = build_head(HeadConfig(name=name, margin=0.4, subcenters=2), 8, 4)
    full = build_head(HeadConfig(name=name, margin=0.2, subcenters=2), 8, 4)
    full.load_state_dict(half.state_dict())
    half.margin_factor = 0.5
    torch.testing.assert_close(half(emb, labels), full(emb, labels))
    # per-class margins are scaled the same way
    counts = np.array([1, 4, 9, 16])
    dyn = build_head(HeadConfig(name=name, dynamic_margin="power", subcenters=2), 8, 4, counts)
    dyn.load_state_dict({**half.state_dict(), "class_margins": dyn.class_margins})
    no_margin = build_head(HeadConfig(name=name, margin=0.0, subcenters=2), 8, 4)
    no_margin.load_state_dict(half.state_dict())
    dyn.margin_factor = 0.0  # start of a warm-up: no margin at all
    torch.testing.assert_close(dyn(emb, labels), no_margin(emb, labels))
    dyn.margin_factor = 1.0
    assert dyn(emb, labels) > no_margin(emb, labels)


def test_doctests():
    from arcfold.models import heads, margins

    results = [doctest.testmod(heads), doctest.testmod(margins)]
    assert sum(r.attempted for r in results) >= 5 and not any(r.failed for r in results)


@pytest.mark.parametrize("name", ["arcface", "cosface", "subcenter_arcface", "norm_softmax", "adacos"])
def test_adam_step_turns_class_centres_by_lr_radians(name):
    """Centres start N(0, 1) (pytorch-metric-learning's init). Adam's first step moves every coordinate with a
    gradient by exactly lr, so a centre turns by about lr * sqrt(D) / |w| = lr radians when |w| ~ sqrt(D); at Xavier's
    scale (std ~0.06 for 128 classes x 512-d, |w| ~ 1.3) the same step turned it ~0.18 rad, 18 times as far: the head
    learning rate of the defaults (10 x 1e-3) shook the centres and cost arcfold ~0.07 Recall@1 on Omniglot (issue 16).
    """
    torch.manual_seed(0)
    dim, n_classes, lr = 512, 128, 1e-2
    head = build_head(HeadConfig(name=name, margin=0.3, subcenters=2), dim, n_classes)
    w0 = head.weight.detach().clone()
    assert abs(w0.std().item() - 1) < 0.01 and abs(w0.mean().item()) < 0.01
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    head(torch.randn(64, dim), torch.randint(0, n_classes, (64,))).backward()
    optimizer.step()
    moved = (head.weight.detach() - w0).abs().amax(dim=1) > 0  # centres with a gradient
    angle = torch.arccos(F.cosine_similarity(head.weight.detach(), w0, dim=1).clamp(max=1.0))[moved]
    assert moved.sum() > 0
    assert angle.max().item() < 1.2 * lr
