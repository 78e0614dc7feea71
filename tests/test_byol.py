"""BYOL: the regression loss against its formula, lightly's heads and views, EMA pairs."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn

from sslzoo.backbones import build_backbone
from sslzoo.losses.regression import NormalizedMSELoss
from sslzoo.methods.byol import BYOL, byol_mlp
from sslzoo.methods.byol import VIEWS as BYOL_VIEWS
from tests.conftest import REPO, TINY_RESNET

SMALL = dict(**TINY_RESNET, projector_hidden_dim=32, projector_out_dim=8, predictor_hidden_dim=32)
regression_loss = NormalizedMSELoss()


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


def test_heads_are_the_official_mlp_without_output_bias() -> None:
    """The official ``networks.MLP`` is Linear -> BN -> ReLU -> Linear(with_bias=False).
    lightly's BYOL heads add a bias to the output Linear, a parameter the official model does
    not have, so the heads are our own; the first Linear has no bias (the BN after it cancels
    one). Checked against the formula written out, in train mode (batch statistics)."""
    model = BYOL(**SMALL, sync_batchnorm=False)
    for head, dims in ((model.projector, (128, 32, 8)), (model.predictor, (8, 32, 8))):
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [dims[:2], dims[1:]]
        assert all(m.bias is None for m in linears)
        bn = next(m for m in head.modules() if isinstance(m, nn.BatchNorm1d))
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        x = torch.randn(6, dims[0])
        h = x @ linears[0].weight.T
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps)
        expected = torch.relu(h * bn.weight + bn.bias) @ linears[1].weight.T
        torch.testing.assert_close(head(x), expected, rtol=1e-4, atol=1e-5)


def test_teacher_is_backbone_and_projector_without_grad() -> None:
    model = BYOL(**SMALL, sync_batchnorm=False)
    pairs = model.teacher_pairs()
    assert [s for s, _ in pairs] == [model.backbone, model.projector]
    assert all(not p.requires_grad for _, t in pairs for p in t.parameters())
    assert model.ema_base_momentum == 0.996


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_target_starts_from_its_own_random_initialisation() -> None:
    """byol_experiment.py ``_make_initial_state``: ``rng_online, rng_target = split(rng)``, and
    online and target parameters are each ``forward.init`` of their own key. The target is a
    second draw of the same networks, not a copy (of its parameters only the encoder and the
    projector are ever used). Written out here: the online backbone, projector and predictor,
    then the target backbone and projector, drawn in turn from the seeded generator."""
    arch = dict(name=SMALL["backbone"], cifar_stem=True, **SMALL["backbone_kwargs"])
    torch.manual_seed(7)
    online = [build_backbone(**arch), byol_mlp(128, 32, 8), byol_mlp(8, 32, 8)]
    target = [build_backbone(**arch), byol_mlp(128, 32, 8)]
    torch.manual_seed(7)
    model = BYOL(**SMALL, sync_batchnorm=False)
    assert same_weights(model.backbone, online[0]) and same_weights(model.projector, online[1])
    assert same_weights(model.predictor, online[2])
    assert same_weights(model.target_backbone, target[0])
    assert same_weights(model.target_projector, target[1])
    assert not same_weights(model.target_backbone, model.backbone)
    assert not same_weights(model.target_projector, model.projector)
    assert all(not p.requires_grad for _, t in model.teacher_pairs() for p in t.parameters())
    torch.manual_seed(7)
    again = BYOL(**SMALL, sync_batchnorm=False)  # reproducible from the seed
    assert same_weights(again, model)


def test_target_can_start_as_a_copy_of_the_online_network() -> None:
    torch.manual_seed(7)
    model = BYOL(**SMALL, sync_batchnorm=False, target_init="copy")
    assert same_weights(model.target_backbone, model.backbone)
    assert same_weights(model.target_projector, model.projector)
    assert all(not p.requires_grad for _, t in model.teacher_pairs() for p in t.parameters())
    with pytest.raises(ValueError, match="target_init"):
        BYOL(**SMALL, sync_batchnorm=False, target_init="online")


def test_views_are_asymmetric_as_in_byol() -> None:
    """BYOL's views are the official asymmetric pair: blur 1.0 / 0.1, solarize 0 / 0.2, colour
    jitter (0.4, 0.4, 0.2, 0.1) with BYOL's ops and p=0.8, grayscale 0.2."""
    model = BYOL(**SMALL, sync_batchnorm=False)
    views = model.views.pil(32, (0.5,) * 3, (0.25,) * 3)
    probs = []
    for view in views.transforms:
        ops = view.transform.transforms
        blur = next(o for o in ops if type(o).__name__ == "KernelGaussianBlur")
        solar = next(o for o in ops if type(o).__name__ == "RandomSolarization")
        cj = next(o for o in ops if type(o).__name__ == "TensorColorJitter")
        assert cj.jitter == pytest.approx((0.4, 0.4, 0.2, 0.1)) and cj.color_ops == "byol"
        gray = next(o for o in ops if type(o).__name__ == "RandomGrayscale")
        probs.append((blur.prob, solar.prob, cj.prob, gray.p))
    assert probs == [(1.0, 0.0, 0.8, 0.2), (0.1, 0.2, 0.8, 0.2)]
    for view in model.views.device(32, (0.5,) * 3, (0.25,) * 3).recipes:
        assert view.jitter == pytest.approx((0.4, 0.4, 0.2, 0.1))


def test_color_jitter_setting_reaches_both_view_pipelines() -> None:
    views = BYOL_VIEWS.replace(color_jitter=(0.3, 0.2, 0.1, 0.05))
    model = BYOL(**SMALL, sync_batchnorm=False, views=views)
    for view in model.views.pil(32, (0.5,) * 3, (0.25,) * 3).transforms:
        ops = view.transform.transforms
        cj = next(o for o in ops if type(o).__name__ == "TensorColorJitter")
        assert cj.jitter == pytest.approx((0.3, 0.2, 0.1, 0.05))
    for view in model.views.device(32, (0.5,) * 3, (0.25,) * 3).recipes:
        assert view.jitter == pytest.approx((0.3, 0.2, 0.1, 0.05))


def test_cifar10_config_takes_the_steps_of_lightlys_benchmark() -> None:
    """configs/cifar10/byol.yaml follows lightly's CIFAR-10 benchmark, whose loss is
    ``0.5 (NegCos(p1, z2) + NegCos(p2, z1))`` under SGD(lr 0.06 x batch / 128, momentum 0.9,
    wd 5e-4 on every parameter). BYOL's loss has 4x that gradient; the config's lr and weight
    decay make SGD take the same steps from the same start."""
    from lightly.loss import NegativeCosineSimilarity

    config = yaml.safe_load((REPO / "configs" / "cifar10" / "byol.yaml").read_text())
    args = config["model"]["init_args"]["optim"]
    batch = config["data"]["init_args"]["batch_size"]
    assert args["optimizer"] == "sgd" and args["exclude_bias_and_norm"] is False
    torch.manual_seed(0)
    ours = BYOL(**SMALL, sync_batchnorm=False)
    theirs, start = copy.deepcopy(ours), copy.deepcopy(ours)

    def sgd(model: BYOL, lr: float, wd: float) -> torch.optim.SGD:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=args["momentum"], weight_decay=wd)

    opt_ours = sgd(ours, args["lr"] * batch / 256, args["weight_decay"])
    opt_theirs = sgd(theirs, 0.06 * batch / 128, 5e-4)
    criterion = NegativeCosineSimilarity()
    for _ in range(3):
        x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
        loss = ours.training_step(([x1, x2], torch.arange(8)), 0)["loss"]
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()
        p1, p2 = (theirs.predictor(theirs.projector(theirs.backbone(x))) for x in (x1, x2))
        with torch.no_grad():
            z1, z2 = (theirs.target_projector(theirs.target_backbone(x)) for x in (x1, x2))
        loss = 0.5 * (criterion(p1, z2) + criterion(p2, z1))
        opt_theirs.zero_grad()
        loss.backward()
        opt_theirs.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(ours.projector[0].weight, start.projector[0].weight)
