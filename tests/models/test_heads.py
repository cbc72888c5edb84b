import math

import pytest
import torch
import torch.nn.functional as F

from arcfold.config import HeadConfig
from arcfold.models.heads import ArcFaceHead, arcface_logits, build_head


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
    # PML has no past-pi continuation: compare only where every target angle is below pi - m
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
