"""Layer-wise learning-rate decay for ViTs as DINOv2's ``get_params_groups_with_decay`` does it:
the deeper a parameter, the larger its learning rate."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

STEM = ("pos_embed", "patch_embed", "cls_token", "reg_token", "mask_token")


def vit_layer_id(name: str, num_blocks: int) -> int:
    """Layer of a timm ViT parameter: 0 for the stem (tokens, position and patch embeddings),
    i + 1 for block i, ``num_blocks + 1`` for the rest (the final norm). timm's
    ``param_groups_layer_decay`` puts the final norm with the last block instead."""
    if name.startswith(STEM):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def no_weight_decay(name: str) -> bool:
    """DINOv2's exclusions from weight decay, by name: biases, norms, LayerScale gammas."""
    return name.endswith(".bias") or "norm" in name or "gamma" in name


def layer_decay_groups(
    module: nn.Module,
    weight_decay: float,
    layer_decay: float,
    patch_embed_lr_mult: float = 1.0,
    stem_params: Iterable[tuple[str, nn.Parameter]] = (),
    prefix: str = "",
) -> list[dict[str, Any]]:
    """Parameter groups of a timm ViT (blocks in ``module.blocks``) or of a head (no blocks:
    every scale 1) as DINOv2's ``get_params_groups_with_decay``: an ``lr_scale`` of
    ``layer_decay ** (L + 1 - layer)`` (:func:`vit_layer_id`, L blocks), times
    ``patch_embed_lr_mult`` for the patch embedding; ``weight_decay`` except where
    :func:`no_weight_decay` says (DINOv2 decays the tokens and the position embedding);
    ``last_layer`` True for parameters of a ``last_layer``. ``stem_params`` (a mask token
    held outside the ViT) are named pairs that join layer 0."""
    num_blocks = len(getattr(module, "blocks", ()))
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, p in [*module.named_parameters(), *stem_params]:
        if not p.requires_grad:
            continue
        scale = layer_decay ** (num_blocks + 1 - vit_layer_id(name, num_blocks))
        if name.startswith("patch_embed"):
            scale *= patch_embed_lr_mult
        wd = 0.0 if no_weight_decay(name) else weight_decay
        last = "last_layer" in name
        if (scale, wd, last) not in groups:
            label = f"{prefix}lr{scale:.4g}_wd{'' if wd else '0'}{'_last' if last else ''}"
            groups[(scale, wd, last)] = {"params": [], "weight_decay": wd, "lr_scale": scale,
                                         "last_layer": last, "name": label}  # fmt: skip
        groups[(scale, wd, last)]["params"].append(p)
    return list(groups.values())
