"""Losses that regress one view's prediction onto the other view's target, which carries no
gradient (BYOL, SimSiam)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormalizedMSELoss(nn.Module):
    """BYOL's regression loss: the squared distance of the L2-normalised prediction and target,
    ``2 - 2 cos(p, z)``, averaged over the batch."""

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class NegativeCosineLoss(nn.Module):
    """SimSiam's ``D(p, z) = -cos(p, stopgrad(z))``, averaged over the batch."""

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(p, z.detach(), dim=-1).mean()
