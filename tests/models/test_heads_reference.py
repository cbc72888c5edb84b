"""Every margin head against a reference: a closed form written here, or pytorch-metric-learning's loss.

Tolerances are dtype-aware: the heads compute in fp32 whatever the input dtype (the input is only
rounded to it), so a head fed fp16/bf16/fp32/fp64 embeddings is compared with the reference evaluated
in fp64 on the *same rounded* embeddings and weights, to fp32 accuracy: ``atol = 4 eps32 * scale`` (a
logit ``s cos`` is off by ~``s eps32``; the loss sums a few of them) plus ``rtol = 4 eps32``
(eps32 = 1.19e-7: about 3e-5 + 2.4e-5 for s = 64 and a loss of 50; observed differences stay below 8e-6).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from arcfold.models.heads import (
    AdaCosHead,
    ArcFaceHead,
    CosFaceHead,
    NormSoftmaxHead,
    SoftmaxHead,
    SubCenterArcFaceHead,
    subcenter_outliers,
)
from arcfold.models.margins import cosface_logits

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


EPS32 = torch.finfo(torch.float32).eps


def _tol(scale: float) -> dict[str, float]:
    return {"atol": 4 * EPS32 * scale, "rtol": 4 * EPS32}


def _data(n=32, d=16, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _ce_float64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written out: log sum_j exp(z_j) - z_y."""
    logits = logits.double()
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None])[:, 0]).mean()


def _copy_weight(reference, weight: torch.Tensor) -> None:
    with torch.no_grad():
        reference.W.copy_(weight.T)  # PML stores W as (D, C) (sub-centre ArcFace: (D, C * k), class-major)


# ---------------------------------------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_head_closed_form(dtype):
    emb, labels = _data()
    head = SoftmaxHead(16, 6)
    x = emb.to(dtype)
    expected = _ce_float64(x.double() @ head.fc.weight.double().T + head.fc.bias.double(), labels)
    loss = head(x, labels)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- norm_softmax


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_softmax_matches_pytorch_metric_learning(dtype):
    from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

    emb, labels = _data()
    head = NormSoftmaxHead(16, 6, scale=20.0)
    reference = NormalizedSoftmaxLoss(num_classes=6, embedding_size=16, temperature=1 / 20.0)
    _copy_weight(reference, head.weight)
    x = emb.to(dtype)
    torch.testing.assert_close(head(x, labels).double(), reference(x.double(), labels), **_tol(20.0))


def test_norm_softmax_closed_form():
    emb, labels = _data()
    head = NormSoftmaxHead(16, 6, scale=16.0)
    cos = F.normalize(emb.double()) @ F.normalize(head.weight.double()).T
    torch.testing.assert_close(head(emb, labels).double(), _ce_float64(16.0 * cos, labels), **_tol(16.0))


# ---------------------------------------------------------------------------------------------------------- cosface


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosface_matches_pytorch_metric_learning(dtype):
    from pytorch_metric_learning.losses import CosFaceLoss

    emb, labels = _data()
    head = CosFaceHead(16, 6, scale=64.0, margin=0.35)
    reference = CosFaceLoss(num_classes=6, embedding_size=16, margin=0.35, scale=64)
    _copy_weight(reference, head.weight)
    x = emb.to(dtype)
    torch.testing.assert_close(head(x, labels).double(), reference(x.double(), labels), **_tol(64.0))


def test_cosface_per_class_margins_closed_form():
    emb, labels = _data()
    class_margins = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    head = CosFaceHead(16, 6, scale=30.0, class_margins=class_margins)
    cos = F.normalize(emb.double()) @ F.normalize(head.weight.double()).T
    one_hot = F.one_hot(labels, 6).double()
    logits = 30.0 * (cos - one_hot * class_margins.double()[labels][:, None])
    torch.testing.assert_close(head.logits(emb, labels).double(), logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(head(emb, labels).double(), _ce_float64(logits, labels), **_tol(30.0))


def test_cosface_logits_closed_form():
    cosine = torch.tensor([[0.9, 0.1], [-0.2, 0.4]])
    logits = cosface_logits(cosine, torch.tensor([0, 1]), margin=0.25, scale=10.0)
    torch.testing.assert_close(logits, torch.tensor([[6.5, 1.0], [-2.0, 1.5]]))


# ---------------------------------------------------------------------------------------------------------- arcface


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcface_matches_pytorch_metric_learning_past_pi(dtype):
    # PML 2.x continues the target logit past pi - m the same way (cos theta - m sin m): compare there too
    from pytorch_metric_learning.losses import ArcFaceLoss

    emb, labels = _data()
    head = ArcFaceHead(16, 6, scale=64.0, margin=0.5)
    with torch.no_grad():  # half the samples point away from their class centre: theta_y > pi - m
        emb[::2] = -head.weight[labels[::2]] + 0.05 * emb[::2]
    theta = torch.acos(head.cosine(emb).gather(1, labels[:, None]).clamp(-1, 1))
    assert (theta > math.pi - 0.5).sum() >= 8 and (theta < math.pi - 0.5).sum() >= 8
    reference = ArcFaceLoss(num_classes=6, embedding_size=16, margin=math.degrees(0.5), scale=64)
    _copy_weight(reference, head.weight)
    x = emb.to(dtype)
    torch.testing.assert_close(head(x, labels).double(), reference(x.double(), labels), **_tol(64.0))


# ---------------------------------------------------------------------------------------------- subcenter_arcface


@pytest.mark.parametrize("dtype", DTYPES)
def test_subcenter_arcface_matches_pytorch_metric_learning(dtype):
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    emb, labels = _data()
    head = SubCenterArcFaceHead(16, 6, scale=64.0, margin=0.4, subcenters=3)
    reference = SubCenterArcFaceLoss(
        num_classes=6, embedding_size=16, margin=math.degrees(0.4), scale=64, sub_centers=3
    )
    _copy_weight(reference, head.weight)
    x = emb.to(dtype)
    torch.testing.assert_close(head(x, labels).double(), reference(x.double(), labels), **_tol(64.0))


def test_subcenter_cosine_is_the_max_over_class_major_rows():
    # rows c * k + j belong to class c: an embedding equal to row 2 * 3 + 1 has cosine 1 to class 2 only
    head = SubCenterArcFaceHead(16, 4, subcenters=3)
    emb = head.weight[7].detach()[None] * 3.0  # the norm does not matter
    cos = head.cosine(emb)
    assert cos.shape == (1, 4)
    torch.testing.assert_close(cos[0, 2], torch.tensor(1.0))
    assert (cos[0, [0, 1, 3]] < 0.99).all()
    expected = (F.normalize(emb.double()) @ F.normalize(head.weight.double()).T).view(1, 4, 3).amax(2)
    torch.testing.assert_close(cos.double(), expected, atol=1e-6, rtol=0)


def test_subcenter_arcface_with_one_subcenter_is_arcface():
    emb, labels = _data()
    sub = SubCenterArcFaceHead(16, 6, subcenters=1)
    arc = ArcFaceHead(16, 6)
    arc.load_state_dict(sub.state_dict())
    torch.testing.assert_close(sub(emb, labels), arc(emb, labels))


def test_subcenter_outliers_match_pytorch_metric_learning():
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    emb, labels = _data(n=200, d=4, c=5, seed=3)
    head = SubCenterArcFaceHead(4, 5, subcenters=3)
    reference = SubCenterArcFaceLoss(num_classes=5, embedding_size=4, sub_centers=3)
    _copy_weight(reference, head.weight)
    pml_outliers, _ = reference.get_outliers(emb, labels, threshold=75)
    outliers = subcenter_outliers(head, emb, labels, threshold_degrees=75)
    assert 0 < len(outliers.indices) < len(emb)  # the comparison says something
    assert outliers.indices.tolist() == sorted(pml_outliers.tolist())
    expected_angles = torch.rad2deg(torch.acos(head.subcenter_cosine(emb).clamp(-1, 1)))  # (N, C, k)
    assert (outliers.angles > 75).all()
    # each outlier's angle is the angle to one of its own class's sub-centres
    own = expected_angles[outliers.indices, labels[outliers.indices]]  # (n_outliers, k)
    assert ((own - outliers.angles[:, None]).abs() < 1e-3).any(dim=1).all()
    # chunking does not change the answer
    chunked = subcenter_outliers(head, emb, labels, threshold_degrees=75, chunk_size=7)
    assert torch.equal(chunked.indices, outliers.indices)


def test_subcenter_outliers_hand_built():
    # class 0: sub-centres at 0, 90 and 180 degrees in the plane. Three images near 0 degrees, one at
    # 80 degrees (nearest sub-centre: the 90 degree one), one at 40 degrees. Dominant: 0 degrees (3 votes).
    head = SubCenterArcFaceHead(2, 2, subcenters=3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.5, 0.5]]))

    def at(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    emb = torch.tensor([at(2), at(-3), at(80), at(1), at(40), at(45)])
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    outliers = subcenter_outliers(head, emb, labels, threshold_degrees=75)
    assert outliers.indices.tolist() == [2]
    torch.testing.assert_close(outliers.angles, torch.tensor([80.0]), atol=1e-3, rtol=0)
    assert subcenter_outliers(head, emb, labels, threshold_degrees=30).indices.tolist() == [2, 4]
    assert subcenter_outliers(head, emb, labels, threshold_degrees=85).indices.tolist() == []


# ----------------------------------------------------------------------------------------------------------- adacos


def _adacos_scale_by_the_formula(cos: torch.Tensor, labels: torch.Tensor, s: float) -> float:
    """The AdaCos rule (Zhang et al. 2019, eq. 13-15), in float64 with plain loops over the batch."""
    cos = cos.double()
    b_terms, target_angles = [], []
    for i in range(len(cos)):
        b_terms.append(sum(math.exp(s * cos[i, j].item()) for j in range(cos.shape[1]) if j != labels[i]))
        target_angles.append(math.acos(cos[i, labels[i]].item()))
    b_avg = sum(b_terms) / len(cos)
    theta_med = sorted(target_angles)[(len(target_angles) - 1) // 2]  # lower middle value, as torch.median
    return math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))


def test_adacos_scale_update_matches_the_formula():
    emb, labels = _data(n=10, c=6)  # even batch: the lower median
    head = AdaCosHead(16, 6)
    s0 = math.sqrt(2) * math.log(6 - 1)
    assert math.isclose(head.scale.item(), s0, rel_tol=1e-6)
    cos = head.cosine(emb).double()
    s0 = 10.0  # the initial value is close to the rule's fixed point on random data: start away from it
    head.scale.fill_(s0)

    loss = head(emb, labels)  # training mode: s is re-set from this batch, then used for its logits
    s1 = _adacos_scale_by_the_formula(cos, labels, s0)
    assert abs(s1 - s0) > 0.1  # the update is visible
    assert math.isclose(head.scale.item(), s1, rel_tol=1e-5)
    torch.testing.assert_close(loss.double(), _ce_float64(s1 * cos, labels), **_tol(s1))

    head(emb, labels)  # the next step starts from s1
    assert math.isclose(head.scale.item(), _adacos_scale_by_the_formula(cos, labels, s1), rel_tol=1e-5)


def test_adacos_scale_is_frozen_in_eval_and_fixed_mode_and_checkpointed():
    emb, labels = _data(n=16, c=6)
    head = AdaCosHead(16, 6).eval()
    s0 = head.scale.clone()
    head(emb, labels)
    assert torch.equal(head.scale, s0)
    fixed = AdaCosHead(16, 6, adaptive=False)
    fixed(emb, labels)
    assert torch.equal(fixed.scale, s0)
    head.train()(emb, labels)
    assert not torch.equal(head.scale, s0)
    resumed = AdaCosHead(16, 6)
    resumed.load_state_dict(head.state_dict())  # s is a buffer: it resumes
    assert torch.equal(resumed.scale, head.scale)


def test_adacos_handles_large_scales_without_overflow():
    # exp(s cos) with s = 200 overflows fp32; the update uses logsumexp
    emb, labels = _data(n=16, c=6)
    head = AdaCosHead(16, 6)
    head.scale.fill_(200.0)
    cos = head.cosine(emb)
    loss = head(emb, labels)
    assert torch.isfinite(loss) and torch.isfinite(head.scale)
    assert math.isclose(head.scale.item(), _adacos_scale_by_the_formula(cos, labels, 200.0), rel_tol=1e-5)
