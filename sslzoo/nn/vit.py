"""ViT parts that methods share and timm does otherwise: token access with a mask token (iBOT),
the fixed 2-D sin-cos position embedding (MoCo v3, MAE), MoCo v3's initialisation and frozen
patch projection, DINO's [CLS] initialisation and interpolation of position embeddings for
crops of another size."""

from __future__ import annotations

import math
import types
from typing import Any, Literal

import timm.models
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import DropPath
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
    """timm's ``_pos_embed`` in DINO's layout: a position embedding for the class token and
    the patches, with DINO's interpolation; register tokens, if any, go right after the class
    token with no position embedding (DINOv2's ``prepare_tokens_with_masks``)."""
    batch, height, width, dim = x.shape
    pos_embed = interpolate_pos_encoding(self.pos_embed, height, width, 1)
    x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
    x = x + pos_embed
    if self.reg_token is not None:
        x = torch.cat([x[:, :1], self.reg_token.expand(batch, -1, -1), x[:, 1:]], dim=1)
    return self.pos_drop(x)


def dino_pos_embed_setup(vit: nn.Module) -> None:
    """Give a timm ViT with a class token that takes crops of any size (``dynamic_img_size``)
    and embeds the class token's position (not ``no_embed_class``) DINO's position-embedding
    layout and interpolation; its register tokens lose the position embedding rows timm gives
    them (DINOv2's registers have none)."""
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
        return
    if not vit.dynamic_img_size or vit.no_embed_class:
        return
    if vit.reg_token is not None:
        rows = vit.pos_embed.detach()
        kept = torch.cat([rows[:, :1], rows[:, vit.num_prefix_tokens :]], dim=1)
        vit.pos_embed = nn.Parameter(kept)
    vit._pos_embed = types.MethodType(_dino_pos_embed, vit)


def dino_vit_setup(vit: nn.Module) -> None:
    """Give a timm ViT DINO's [CLS] init (``trunc_normal_(std=0.02)``, where timm draws
    N(0, 1e-6^2)) and, when it takes crops of any size (``dynamic_img_size``) in DINO's layout,
    DINO's position-embedding interpolation. Other modules are left as they are."""
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
        return
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    if vit.reg_token is None:
        dino_pos_embed_setup(vit)


def uniform_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth of the same ``rate`` in every block's two residual branches (DINOv2's
    ``drop_path_uniform``), where timm's rate rises linearly from 0 over the blocks."""
    for block in getattr(vit, "blocks", []):
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


def sincos_2d(
    grid_size: tuple[int, int],
    dim: int,
    first: Literal["rows", "cols"],
    dtype: torch.dtype = torch.float32,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of a (H, W) patch grid, (H * W, dim) rows in
    row-major patch order: ``[sin(a w), cos(a w), sin(b w), cos(b w)]`` with
    ``w_d = 1 / temperature ** (d / (dim / 4))``, where a is the token's row and b its column
    (``first="rows"``: MoCo v3's ``build_2d_sincos_position_embedding``) or the other way
    round (``first="cols"``: MAE's ``get_2d_sincos_pos_embed``). Computed in ``dtype``
    (MAE's numpy code works in float64), returned as float32."""
    if dim % 4:
        raise ValueError(f"the embedding dimension must be divisible by 4 (got {dim})")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=dtype) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size[0], dtype=dtype),
        torch.arange(grid_size[1], dtype=dtype),
        indexing="ij",
    )
    a, b = (rows, cols) if first == "rows" else (cols, rows)
    angles_a = a.reshape(-1, 1) * omega
    angles_b = b.reshape(-1, 1) * omega
    return torch.cat([angles_a.sin(), angles_a.cos(), angles_b.sin(), angles_b.cos()], 1).float()


@torch.no_grad()
def moco_vit_setup(
    vit: VisionTransformer, stop_grad_conv1: bool = True, sincos_pos_embed: bool = True
) -> None:
    """Apply the official ``VisionTransformerMoCo`` changes to a timm ViT, in place.

    Every Linear gets xavier-uniform weights and zero biases, with the qkv projection treated
    as three separate (dim x dim) matrices; the class token is drawn with std 1e-6; the patch
    projection is xavier-uniform over its flattened weight and, with ``stop_grad_conv1``,
    frozen. With ``sincos_pos_embed`` the position embedding becomes the fixed 2-D sin-cos
    table (zeros for the class token), a parameter with ``requires_grad=False``.
    """
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if vit.cls_token is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        fan_in = proj.in_channels * math.prod(proj.kernel_size)
        val = math.sqrt(6.0 / float(fan_in + proj.out_channels))
        nn.init.uniform_(proj.weight, -val, val)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        if stop_grad_conv1:
            for p in proj.parameters():
                p.requires_grad = False
    if sincos_pos_embed:
        if vit.pos_embed is None or vit.num_prefix_tokens != 1 or vit.no_embed_class:
            raise ValueError(
                "the fixed sin-cos position embedding needs a ViT with a class token, no "
                "register tokens and a learned position embedding that includes the class token"
            )
        table = sincos_2d(tuple(vit.patch_embed.grid_size), vit.embed_dim, first="rows")
        table = torch.cat([torch.zeros(1, vit.embed_dim), table])[None]
        vit.pos_embed = nn.Parameter(table.to(vit.pos_embed.dtype), requires_grad=False)


def embed_patches(
    vit: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    masked_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embeddings of a timm ViT, (B, H, W, D) or (B, N, D), with masked positions
    replaced by ``masked_embed`` (iBOT's ``mask_model``, before the position embedding)."""
    x = vit.patch_embed(images)
    if mask is not None:
        m = mask.reshape(x.shape[:-1]).unsqueeze(-1)
        x = torch.where(m, masked_embed.to(x.dtype), x)
    return x


def vit_tokens(
    vit: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    masked_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every output token (B, prefix + N, D) of a timm ``VisionTransformer`` after its final
    norm: timm's ``forward_features`` with the mask token inserted after patch embedding."""
    x = embed_patches(vit, images, mask, masked_embed)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


def disable_drop_path(module: nn.Module) -> nn.Module:
    """Set every timm ``DropPath`` in ``module`` to probability 0 (the teacher has none)."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    return module


def set_drop_path(vit: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth of a timm ``VisionTransformer`` set after construction, as timm's (and
    MAE's) ``drop_path_rate`` sets it: block ``i`` of ``depth`` drops each residual branch with
    probability ``rate * i / (depth - 1)``."""
    rates = torch.linspace(0, rate, len(vit.blocks)).tolist()
    for block, p in zip(vit.blocks, rates, strict=True):
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()
    return vit


def is_timm_vit(name: str) -> bool:
    """Whether :func:`sslzoo.backbones.build_backbone` builds a timm ``VisionTransformer``
    from ``name`` (torchvision names win when there is no ``timm/`` prefix, as there)."""
    library, _, bare = name.rpartition("/")
    if library == "tv":
        return False
    if library == "" and bare in torchvision.models.list_models(module=torchvision.models):
        return False
    return timm.models.is_model(bare) and timm.models.is_model_in_modules(
        bare, ["vision_transformer"]
    )


def vit_backbone_kwargs(
    backbone: str, backbone_kwargs: dict[str, Any] | None, drop_path_rate: float
) -> dict[str, Any]:
    """Backbone arguments with, for timm ViTs, the student's stochastic depth and
    ``dynamic_img_size`` (position embeddings interpolated for crops of another size, DINO's
    ``interpolate_pos_encoding``) unless given explicitly."""
    kwargs = dict(backbone_kwargs or {})
    if is_timm_vit(backbone):
        kwargs.setdefault("drop_path_rate", drop_path_rate)
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


def patch_size_of(backbone: nn.Module) -> int:
    """The ViT patch size of a backbone, 1 for anything else."""
    patch_embed = getattr(getattr(backbone, "model", backbone), "patch_embed", None)
    return int(patch_embed.patch_size[0]) if patch_embed is not None else 1
