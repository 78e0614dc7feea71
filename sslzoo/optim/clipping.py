"""Gradient clipping of the official recipes that is not the global-norm clipping Lightning
does."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[torch.Tensor], clip: float) -> None:
    """DINO's ``utils.clip_gradients``: every gradient tensor whose L2 norm exceeds ``clip`` is
    scaled by ``clip / (norm + 1e-6)``, each tensor on its own (not the global norm)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads, 2.0)
    scales = [(clip / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


@torch.no_grad()
def clip_grad_norm_per_part(parts: Sequence[Iterable[torch.Tensor]], clip: float) -> None:
    """``clip_grad_norm_`` of each part's gradients on its own (DINOv2 clips its backbone and
    each head separately, ``clip_grad_norm_`` of each FSDP student module)."""
    for part in parts:
        params = [p for p in part if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, clip)
