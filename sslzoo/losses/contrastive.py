"""Contrastive losses: each sample's other view is its positive, the other samples (of every
rank) its negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.utils.dist import gather
from torch import nn

from sslzoo.distributed import is_distributed, rank


def _gathered(x: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, int]:
    """``x`` of every rank (with gradients) and the offset of this rank's rows in it."""
    if enabled and is_distributed():
        return torch.cat(gather(x)), x.shape[0] * rank()
    return x, 0


class NTXentLoss(nn.Module):
    """NT-Xent as in SimCLR's tf2 ``add_contrastive_loss``: ``mean(loss_a + loss_b)``.

    For sample i of view a, the positive is i of view b; the negatives are every other sample
    of both views across all ranks (gathered with gradients). The loss is the sum of the two
    directions, each averaged over the batch.

    Args:
        temperature: softmax temperature.
        normalize: L2-normalise the embeddings first (``hidden_norm``).
        gather_distributed: take negatives from every rank.
    """

    def __init__(
        self, temperature: float = 0.1, normalize: bool = True, gather_distributed: bool = True
    ) -> None:
        super().__init__()
        self.temperature, self.normalize, self.gather_distributed = (
            temperature,
            normalize,
            gather_distributed,
        )

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        k1, offset = _gathered(z1, self.gather_distributed)
        k2, _ = _gathered(z2, self.gather_distributed)
        t = self.temperature
        labels = torch.arange(z1.shape[0], device=z1.device) + offset
        self_mask = F.one_hot(labels, k1.shape[0]).bool()
        logits_ab = z1 @ k2.T / t
        logits_aa = (z1 @ k1.T / t).masked_fill(self_mask, float("-inf"))
        logits_ba = z2 @ k1.T / t
        logits_bb = (z2 @ k2.T / t).masked_fill(self_mask, float("-inf"))
        loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
        loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
        return loss_a + loss_b


class InfoNCELoss(nn.Module):
    """InfoNCE of queries against keys, times 2T (MoCo v3's ``contrastive_loss``): query i's
    positive is key i; its negatives are every other key of the batch and, when training on
    several ranks, of every rank (labels offset by rank). Keys carry no gradient here.

    Args:
        temperature: softmax temperature (``moco_t``).
        gather_distributed: take negatives from every rank's keys (``concat_all_gather``).
    """

    def __init__(self, temperature: float = 1.0, gather_distributed: bool = True) -> None:
        super().__init__()
        self.temperature, self.gather_distributed = temperature, gather_distributed

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        k, offset = _gathered(k, self.gather_distributed)
        logits = q @ k.T / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels) * (2 * self.temperature)
