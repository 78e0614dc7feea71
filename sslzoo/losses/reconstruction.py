"""Masked image reconstruction losses (MAE)."""

from __future__ import annotations

import torch
from torch import nn


class MaskedReconstructionLoss(nn.Module):
    """MAE's ``forward_loss``: the mean squared error of each predicted patch, averaged over
    the masked patches only. With ``norm_pix`` each target patch is standardised by its own
    mean and (unbiased, as ``torch.var``) variance: ``(x - mean) / sqrt(var + 1e-6)``.

    Args:
        norm_pix: regress per-patch normalised pixels (``--norm_pix_loss``).
    """

    def __init__(self, norm_pix: bool = True) -> None:
        super().__init__()
        self.norm_pix = norm_pix

    def forward(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``target`` and ``pred``: (N, L, p*p*3) patches; ``mask``: (N, L), 1 where masked."""
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()
