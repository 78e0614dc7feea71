"""DINO's and iBOT's ViT details that timm does otherwise: the [CLS] token's initial weights
and the interpolation of position embeddings for crops of another size."""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def interpolate_pos_encoding(
    pos_embed: torch.Tensor, height: int, width: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """DINO's ``VisionTransformer.interpolate_pos_encoding`` for a grid of ``height`` x
    ``width`` patches: the square grid of patch embeddings resized by bicubic interpolation
    with scale factors ``(n + 0.1) / side`` (the official offset that keeps the output size
    exact), without antialiasing (timm antialiases when it shrinks them); the prefix tokens'
    embeddings are kept."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = int(math.sqrt(patches.shape[1]))
    if height == width == side:
        return pos_embed
    dim = patches.shape[-1]
    grid = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((height + 0.1) / side, (width + 0.1) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    return torch.cat((prefix, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def _dino_pos_embed(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """timm's ``_pos_embed`` for a ViT with a class token, no register tokens and a position
    embedding for the class token too (DINO's layout), with DINO's interpolation."""
    batch, height, width, dim = x.shape
    pos_embed = interpolate_pos_encoding(self.pos_embed, height, width, self.num_prefix_tokens)
    x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
    return self.pos_drop(x + pos_embed)


def dino_vit_setup(vit: nn.Module) -> None:
    """Give a timm ViT DINO's [CLS] init (``trunc_normal_(std=0.02)``, where timm draws
    N(0, 1e-6^2)) and, when it takes crops of any size (``dynamic_img_size``) in DINO's layout,
    DINO's position-embedding interpolation. Other modules are left as they are."""
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
        return
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    if vit.dynamic_img_size and vit.reg_token is None and not vit.no_embed_class:
        vit._pos_embed = types.MethodType(_dino_pos_embed, vit)
