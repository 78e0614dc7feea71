"""Spatial features of a backbone before its pooling, as (B, C, H, W) maps: what feature
distillation matches between a student and a teacher of different architectures."""

from __future__ import annotations

import torch
from torch import nn


def feature_maps(model: nn.Module, images: torch.Tensor, blocks: int = 1) -> list[torch.Tensor]:
    """The outputs of the last ``blocks`` stages or blocks of ``model`` as (B, C, H, W) maps.

    timm models: ``forward_intermediates`` with the final norm applied (a ViT's patch tokens
    without its prefix tokens, on their grid: DINOv2's ``get_intermediate_layers(norm=True)``).
    torchvision ResNets: ``layer4``'s output; torchvision models with ``features`` (VGG,
    EfficientNet, ConvNeXt...): its output (one map only).
    """
    if hasattr(model, "forward_intermediates"):
        maps = model.forward_intermediates(
            images, indices=blocks, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return list(maps)
    if blocks != 1:
        raise ValueError(f"{type(model).__name__} gives its last feature map only, not {blocks}")
    if all(hasattr(model, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer4")):
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = layer(x)
        return [x]
    if isinstance(getattr(model, "features", None), nn.Module):
        return [model.features(images)]
    raise ValueError(
        f"cannot take the feature map of a {type(model).__name__}: use a timm model, a "
        "torchvision ResNet or a torchvision model with a features module"
    )
