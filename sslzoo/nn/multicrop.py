"""Multi-crop forward passes: one backbone call per run of same-resolution views."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def forward_multicrop(
    module: nn.Module | Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Run ``module`` once per run of consecutive same-resolution views (DINO's
    ``MultiCropWrapper``, SwAV's grouping by crop size) and split the output back per view."""
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outputs += list(module(torch.cat(list(views[start:end]))).chunk(end - start))
        start = end
    return outputs
