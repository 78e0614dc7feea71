"""The backbone factory: ResNets with the CIFAR stem, torchvision and timm models, ViT sizes;
the methods whose official ResNet starts its residual BatchNorms at zero."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import sslzoo.methods as methods
from sslzoo.backbones import build_backbone
from tests.conftest import TINY_HEADS, TINY_RESNET


def test_resnet18_cifar_stem() -> None:
    backbone = build_backbone("resnet18", cifar_stem=True)
    conv1 = backbone.model.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(backbone.model.maxpool, nn.Identity)
    assert backbone.num_features == 512
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_torchvision_and_timm_models() -> None:
    assert build_backbone("mobilenet_v3_small").num_features == 576
    vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4)
    assert vit.num_features == 192 and vit.model.patch_embed.num_patches == 64
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    tiny = build_backbone("timm/resnet18", layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
    assert tiny.num_features == 64


def test_resnet50_zero_init_residual() -> None:
    backbone = build_backbone("resnet50", zero_init_residual=True)
    assert backbone.num_features == 2048
    assert torch.count_nonzero(backbone.model.layer1[0].bn3.weight) == 0


def last_bn_weights(resnet: nn.Module) -> list[torch.Tensor]:
    """The scale of the last BatchNorm of every residual block (bn3 of a bottleneck, bn2 of a
    basic block), torchvision's or timm's."""
    blocks = [b for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
              for b in layer]  # fmt: skip
    return [(b.bn3 if hasattr(b, "bn3") else b.bn2).weight for b in blocks]


@pytest.mark.parametrize("name", ["resnet18", "timm/resnet18"])
def test_zero_init_residual_reaches_torchvision_and_timm_resnets(name: str) -> None:
    """torchvision's ``zero_init_residual`` (off by default) and timm's ``zero_init_last``
    (on by default) under one name; ``None`` keeps each library's default."""
    tiny = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]} if name.startswith("timm") else {}
    for setting in (True, False):
        model = build_backbone(name, zero_init_residual=setting, **tiny).model
        assert all(bool((w == 0).all()) == setting for w in last_bn_weights(model))
    default = build_backbone(name, **tiny).model
    timm_default = name.startswith("timm")
    assert all(bool((w == 0).all()) == timm_default for w in last_bn_weights(default))
    vit = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, zero_init_residual=True)
    assert vit.num_features == 192  # no residual BatchNorm: the setting does not apply
    with pytest.raises(ValueError, match="contradicts"):
        build_backbone("timm/resnet18", zero_init_residual=True, zero_init_last=False, **tiny)


def test_unknown_backbone_says_where_to_look() -> None:
    with pytest.raises(ValueError, match="list_models"):
        build_backbone("resnet1234")


@pytest.mark.parametrize("name", ["MoCoV3", "SimSiam", "BarlowTwins", "VICReg"])
def test_resnet_starts_with_zero_residual_batchnorms_as_officially(name: str) -> None:
    """These methods' official code builds ``torchvision.models.resnet*(zero_init_residual=
    True)``: the last BatchNorm of every residual block starts at zero scale, every other at
    one. The default applies to timm's ResNets too (``zero_init_last``) and can be turned off."""
    cls = getattr(methods, name)
    torch.manual_seed(0)
    official = torchvision.models.__dict__["resnet18"](zero_init_residual=True)
    zero = {n for n, m in official.named_modules()
             if isinstance(m, nn.BatchNorm2d) and bool((m.weight == 0).all())}  # fmt: skip
    assert zero == {f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)}
    model = cls(backbone="resnet18", **TINY_HEADS[name], sync_batchnorm=False)
    ours = {n for n, m in model.backbone.model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and bool((m.weight == 0).all())}  # fmt: skip
    assert ours == zero
    for setting in (True, False):
        tiny = cls(**TINY_RESNET, **TINY_HEADS[name], zero_init_residual=setting,
                   sync_batchnorm=False).backbone.model  # fmt: skip
        assert bool((tiny.layer1[0].bn2.weight == 0).all()) == setting
