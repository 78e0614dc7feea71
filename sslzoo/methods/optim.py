"""Optimizers and parameter groups shared by every method."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightly.utils.lars import LARS
from torch import nn

OptimizerName = Literal["sgd", "lars", "adamw"]


def split_decay(
    named_params: Iterable[tuple[str, nn.Parameter]], exclude_bias_and_norm: bool = True
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (decayed, not decayed).

    Biases and normalisation parameters (every tensor with ndim <= 1) are not decayed, as in
    the official SimCLR, BYOL, MoCo v3, DINO and MAE code.
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_and_norm and p.ndim <= 1 else decay).append(p)
    return decay, no_decay


def build_optimizer(
    name: OptimizerName,
    groups: list[dict[str, Any]],
    lr: float,
    momentum: float,
    betas: tuple[float, float],
    trust_coefficient: float,
) -> torch.optim.Optimizer:
    """Build the optimizer; each group carries its own ``weight_decay``.

    LARS is lightly's, which skips the trust-ratio adaptation for groups whose weight decay is
    0: with biases and norms in the no-decay group this is the official SimCLR/BYOL/MoCo v3
    rule of excluding them from both decay and adaptation.
    """
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}; choose one of sgd, lars, adamw")
