"""Optimizers and parameter groups shared by every method."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, Literal

import torch
from torch import nn

from sslzoo.optim.lars import LARS, TrustRatio

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


def decay_groups(
    decay: list[nn.Parameter], no_decay: list[nn.Parameter], weight_decay: float, prefix: str = ""
) -> list[dict[str, Any]]:
    """The two parameter groups of :func:`split_decay`'s halves: the no-decay group (biases
    and norms) is excluded from LARS adaptation too, as the official recipes exclude them."""
    return [
        {"params": decay, "weight_decay": weight_decay, "name": f"{prefix}decay"},
        {"params": no_decay, "weight_decay": 0.0, "lars_adapt": False, "name": f"{prefix}no_decay"},
    ]


def use_fused(params: Iterable[torch.Tensor], device_types: Collection[str] = ("cuda",)) -> bool:
    """Whether to take torch's fused SGD/AdamW kernels: every parameter is a plain
    floating-point tensor (not a DTensor or another tensor subclass) on one of
    ``device_types`` (CUDA, where one fused kernel beats the foreach kernels)."""
    params = list(params)
    return bool(params) and all(
        type(p) in (torch.Tensor, nn.Parameter)
        and p.device.type in device_types
        and torch.is_floating_point(p)
        for p in params
    )


def build_optimizer(
    name: OptimizerName,
    groups: list[dict[str, Any]],
    lr: float,
    momentum: float,
    betas: tuple[float, float],
    trust_coefficient: float,
    *,
    trust_ratio: TrustRatio = "update",
    lr_in_momentum: bool = False,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer; each group carries its own ``weight_decay``.

    LARS is :class:`sslzoo.optim.lars.LARS` with ``trust_ratio`` and ``lr_in_momentum``; it
    adapts the groups that do not set ``lars_adapt=False`` (the official recipes exclude biases
    and norms from both decay and adaptation: the no-decay group says so).

    ``fused`` picks torch's fused SGD/AdamW kernels: ``None`` when :func:`use_fused` says so,
    ``False`` never (torch's default, foreach kernels on CUDA), ``True`` always (torch refuses
    parameters its fused kernels do not support). LARS has no fused kernel.
    """
    if fused is None:
        fused = name != "lars" and use_fused(p for g in groups for p in g["params"])
    # fused=False would also turn off torch's automatic foreach: pass None instead
    kernels: dict[str, Any] = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **kernels)
    if name == "lars":
        if fused:
            raise ValueError("LARS has no fused kernel; pass fused=None or False")
        return LARS(
            groups,
            lr=lr,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            trust_ratio=trust_ratio,
            lr_in_momentum=lr_in_momentum,
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **kernels)
    raise ValueError(f"unknown optimizer {name!r}; choose one of sgd, lars, adamw")
