import pytest
import torch

from arcfold.models.pooling import GeM, build_pool


def test_gem_with_p_1_is_average_pooling():
    x = torch.rand(2, 5, 4, 3) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(build_pool("avg")(x), x.mean(dim=(2, 3)))


def test_gem_closed_form_and_large_p_tends_to_max():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    torch.testing.assert_close(GeM(p=3.0)(x), torch.tensor([[expected]]))
    assert GeM(p=64.0)(x).item() == pytest.approx(4.0, rel=0.03)


def test_gem_p_is_learnable_and_clamps_non_positive_inputs():
    gem = GeM(p=3.0, trainable=True)
    x = torch.randn(2, 3, 4, 4)  # negatives: clamped to eps, not NaN
    out = gem(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad)
    assert not GeM(trainable=False).p.requires_grad


def test_unknown_pool_name():
    with pytest.raises(ValueError, match="model.pool='median' is unknown"):
        build_pool("median")
