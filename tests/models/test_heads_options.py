"""Dynamic margins, class weights and focal loss of the margin heads, against hand-computed numbers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arcfold.config import HeadConfig
from arcfold.models.heads import build_head
from arcfold.models.margins import classification_loss, dynamic_margins, inverse_log_class_weights

# ------------------------------------------------------------------------------------------------- dynamic margins


def test_power_margins_by_hand():
    # n^-1/4 of 1, 16, 81, 10000 is 1, 1/2, 1/3, 1/10
    margins = dynamic_margins(np.array([1, 16, 81, 10000]), "power", a=0.5, lam=0.25, b=0.05)
    np.testing.assert_allclose(margins, [0.55, 0.30, 0.05 + 0.5 / 3, 0.10], rtol=0, atol=1e-12)
    # lambda = 1/2: m = a / sqrt(n) + b
    margins = dynamic_margins(np.array([4, 25]), "power", a=1.0, lam=0.5, b=0.0)
    np.testing.assert_allclose(margins, [0.5, 0.2], rtol=0, atol=1e-12)


def test_minmax_margins_by_hand():
    # t = n^-1/4 = 1, 1/2, 1/10: (t - 0.1) / 0.9 = 1, 4/9, 0 -> 0.1 + 0.4 * that
    margins = dynamic_margins(np.array([1, 16, 10000]), "minmax", m_min=0.1, m_max=0.5)
    np.testing.assert_allclose(margins, [0.5, 0.1 + 0.4 * 4 / 9, 0.1], rtol=0, atol=1e-12)
    # order does not matter, the rarest class gets m_max and the largest m_min
    margins = dynamic_margins(np.array([10000, 1, 16]), "minmax", m_min=0.1, m_max=0.5)
    np.testing.assert_allclose(margins, [0.1, 0.5, 0.1 + 0.4 * 4 / 9], rtol=0, atol=1e-12)


def test_minmax_margins_with_equal_class_sizes_are_all_the_maximum():
    # nothing to scale (0/0): documented choice, every class counts as the rarest
    np.testing.assert_array_equal(dynamic_margins(np.array([5, 5, 5]), "minmax", m_min=0.1, m_max=0.4), [0.4] * 3)
    np.testing.assert_array_equal(dynamic_margins(np.array([3]), "minmax", m_min=0.1, m_max=0.4), [0.4])


def test_dynamic_margins_reject_bad_input():
    with pytest.raises(ValueError, match="at least one training image"):
        dynamic_margins(np.array([3, 0]), "power")
    with pytest.raises(ValueError, match="mode 'none' is unknown"):
        dynamic_margins(np.array([3, 1]), "none")
    with pytest.raises(ValueError, match="non-empty 1-d"):
        dynamic_margins(np.array([]), "power")


@pytest.mark.parametrize("name", ["arcface", "subcenter_arcface", "cosface"])
def test_rare_classes_get_the_larger_margin_in_the_loss(name):
    # two samples with the same target cosine: the one of the rare class has the larger loss
    counts = np.array([1, 1000, 50])
    cfg = HeadConfig(name=name, scale=5.0, dynamic_margin="minmax", subcenters=2)  # small s: losses not saturated
    head = build_head(cfg, 4, 3, counts)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4)[[0, 0, 1, 1, 2, 2]] if name == "subcenter_arcface" else torch.eye(4)[:3])
    emb = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0]])  # sample 0 -> class 0, sample 1 -> class 1
    losses = [head(emb[i : i + 1], torch.tensor([i])).item() for i in range(2)]
    assert losses[0] > losses[1] + 0.1


# --------------------------------------------------------------------------------------------------- class weights


def test_inverse_log_class_weights_by_hand():
    # 1/log(2), 1/log(4), 1/log(8) = (1, 1/2, 1/3) / log 2; mean (11/6) / (3 log 2) -> 18/11, 9/11, 6/11
    np.testing.assert_allclose(inverse_log_class_weights(np.array([1, 3, 7])), [18 / 11, 9 / 11, 6 / 11], atol=1e-12)
    np.testing.assert_allclose(inverse_log_class_weights(np.array([4, 4])), [1.0, 1.0], atol=1e-12)


def test_class_weighted_loss_is_the_weighted_mean():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2])
    w = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    ce = torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None])[:, 0]
    expected = (2.0 * ce[0] + 2.0 * ce[1] + 0.5 * ce[2]) / 4.5
    torch.testing.assert_close(classification_loss(logits, labels, w), expected)
    torch.testing.assert_close(classification_loss(logits, labels, w, loss="focal", focal_gamma=0.0), expected)


def test_head_applies_the_class_weights():
    torch.manual_seed(0)
    emb, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
    counts = np.array([1, 3, 7, 15])
    head = build_head(HeadConfig(name="arcface", class_weights="inv_log"), 8, 4, counts)
    plain = build_head(HeadConfig(name="arcface"), 8, 4)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if k != "class_weights"})
    w = torch.tensor(inverse_log_class_weights(counts))
    expected = F.cross_entropy(plain.logits(emb, labels).double(), labels, weight=w)
    torch.testing.assert_close(head(emb, labels).double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(head(emb, labels), plain(emb, labels))


# ------------------------------------------------------------------------------------------------------ focal loss


def test_focal_loss_of_one_sample_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64)
    p = math.exp(2.0) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0))
    for gamma in [0.5, 2.0, 5.0]:
        expected = (1 - p) ** gamma * -math.log(p)
        loss = classification_loss(logits, torch.tensor([0]), loss="focal", focal_gamma=gamma)
        assert math.isclose(loss.item(), expected, rel_tol=1e-9)


def test_focal_loss_with_gamma_zero_is_cross_entropy_exactly():
    torch.manual_seed(0)
    logits, labels = 10 * torch.randn(64, 7), torch.randint(0, 7, (64,))
    w = torch.rand(7) + 0.5
    for weight in [None, w]:
        ce = F.cross_entropy(logits, labels, weight=weight)
        assert torch.equal(classification_loss(logits, labels, weight, loss="focal", focal_gamma=0.0), ce)
        # and the focal formula itself tends to CE as gamma -> 0 (gamma = 0 short-cuts to F.cross_entropy)
        near_zero = classification_loss(logits, labels, weight, loss="focal", focal_gamma=1e-7)
        torch.testing.assert_close(near_zero, ce, atol=0, rtol=1e-5)
        assert classification_loss(logits, labels, weight, loss="focal", focal_gamma=1.0) < ce


def test_focal_loss_down_weights_easy_samples_and_has_finite_gradients():
    logits = torch.tensor([[30.0, 0.0], [0.0, 0.0]], requires_grad=True)  # sample 0 is p_t = 1 in fp32
    labels = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    loss = classification_loss(logits, labels, loss="focal", focal_gamma=0.5)  # x^0.5 has infinite slope at 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert loss.item() < ce.mean().item()
    assert math.isclose(loss.item(), 0.5 * (0.5**0.5 * math.log(2)), rel_tol=1e-5)


@pytest.mark.parametrize("name", ["softmax", "norm_softmax", "cosface", "arcface", "subcenter_arcface", "adacos"])
def test_every_head_takes_focal_loss_and_class_weights(name):
    torch.manual_seed(0)
    emb, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
    counts = np.array([2, 5, 9, 30])
    cfg = HeadConfig(name=name, loss="focal", focal_gamma=2.0, class_weights="inv_log")
    focal = build_head(cfg, 8, 4, counts).eval()  # eval: adacos keeps its scale, so both see the same logits
    logits = focal.logits(emb, labels).double()
    w = torch.tensor(inverse_log_class_weights(counts))[labels]
    ce = torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None])[:, 0]
    expected = (w * (1 - torch.exp(-ce)) ** 2 * ce).sum() / w.sum()
    torch.testing.assert_close(focal(emb, labels).double(), expected, atol=1e-5, rtol=1e-5)
