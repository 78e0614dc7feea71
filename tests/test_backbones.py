"""The backbone factory: ResNets with the CIFAR stem, torchvision and timm models, ViT sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslzoo.backbones import build_backbone


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
