"""BYOL: the regression loss against its formula, lightly's heads and views, EMA pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslzoo.methods.byol import BYOL, regression_loss
from tests.conftest import TINY_RESNET

SMALL = dict(**TINY_RESNET, projector_hidden_dim=32, projector_out_dim=8, predictor_hidden_dim=32)


def test_regression_loss_matches_formula() -> None:
    torch.manual_seed(0)
    p, z = torch.randn(5, 7), torch.randn(5, 7)
    expected = 0.0
    for i in range(5):
        pn, zn = p[i] / p[i].norm(), z[i] / z[i].norm()
        expected += float(((pn - zn) ** 2).sum())  # ||p/|p| - z/|z|||^2 = 2 - 2 cos
    assert abs(float(regression_loss(p, z)) - expected / 5) < 1e-5


def test_regression_loss_stops_target_gradient() -> None:
    p = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    regression_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_symmetric_loss_uses_target_of_the_other_view() -> None:
    torch.manual_seed(0)
    model = BYOL(**SMALL, sync_batchnorm=False)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = model.training_step(([x1, x2], torch.arange(4)), 0)
    with torch.no_grad():  # train-mode BN uses batch statistics: the same terms again
        p1 = model.predictor(model.projector(model.backbone(x1)))
        p2 = model.predictor(model.projector(model.backbone(x2)))
        t1 = model.target_projector(model.target_backbone(x1))
        t2 = model.target_projector(model.target_backbone(x2))
    expected = regression_loss(p1, t2) + regression_loss(p2, t1)
    assert torch.allclose(out["loss"].detach(), expected, atol=1e-4)


def test_lightly_heads_match_byol_mlp() -> None:
    """lightly's BYOL heads are Linear -> BN -> ReLU -> Linear, the official MLP; the first
    Linear drops its bias because BN follows, which changes nothing."""
    model = BYOL(**SMALL, sync_batchnorm=False)
    for head, dims in ((model.projector, (128, 32, 8)), (model.predictor, (8, 32, 8))):
        layers = list(head.modules())
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [dims[:2], dims[1:]]
        assert any(isinstance(m, nn.BatchNorm1d) for m in layers)
        assert any(isinstance(m, nn.ReLU) for m in layers)
        assert linears[-1].bias is not None


def test_teacher_is_backbone_and_projector_without_grad() -> None:
    model = BYOL(**SMALL, sync_batchnorm=False)
    pairs = model.teacher_pairs()
    assert [s for s, _ in pairs] == [model.backbone, model.projector]
    assert all(not p.requires_grad for _, t in pairs for p in t.parameters())
    assert model.ema_base_momentum == 0.996


def test_views_are_asymmetric_as_in_byol() -> None:
    """lightly's BYOL views are the official asymmetric pair: blur 1.0 / 0.1, solarize 0 / 0.2,
    colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale 0.2."""
    model = BYOL(**SMALL, sync_batchnorm=False)
    views = model.view_transform(32, [0.5] * 3, [0.25] * 3)
    probs = []
    for view in views.transforms:
        ops = view.transform.transforms
        blur = next(o for o in ops if type(o).__name__ == "GaussianBlur")
        solar = next(o for o in ops if type(o).__name__ == "RandomSolarization")
        cj = next(o for o in ops if type(o).__name__ == "RandomApply").transforms[0]
        assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.saturation == pytest.approx(
            (0.8, 1.2)
        )
        probs.append((blur.prob, solar.prob))
    assert probs == [(1.0, 0.0), (0.1, 0.2)]
