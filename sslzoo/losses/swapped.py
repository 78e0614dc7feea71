"""SwAV's swapped prediction: each crop predicts the equipartitioned cluster codes that
Sinkhorn-Knopp computes from the other crops' prototype scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslzoo.distributed import world_size


@torch.no_grad()
def distributed_sinkhorn(
    out: torch.Tensor,
    epsilon: float,
    iterations: int,
    batch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes Q (B x K) of prototype scores ``out`` (B x K) by Sinkhorn-Knopp, as in
    ``main_swav.py`` (and DINOv2's ``sinkhorn_knopp_teacher``): rows of Q^T are scaled to
    1/K, columns to 1/B, ``iterations`` times.

    Under torch.distributed the total and the row sums are all-reduced, so the
    equipartition constraint covers the global batch: B is the local rows x world size, or
    ``batch``, the global row count, where ranks hold different numbers of rows (DINOv2's
    masked patches: the all-reduced count).
    """
    q = torch.exp(out.float() / epsilon).t()
    world = world_size()
    num_prototypes = q.shape[0]
    batch = q.shape[1] * world if batch is None else batch

    total = q.sum()
    if world > 1:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(rows)
        q /= rows
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


class SwappedPredictionLoss(nn.Module):
    """The swapped-prediction loss of ``main_swav.py``.

    For each assignment crop the codes are the last B rows of Sinkhorn's output (queued
    embeddings' scores, when given, come first and their codes are dropped); the loss is the
    cross-entropy of every other crop's prediction ``softmax(scores / temperature)`` against
    them, averaged over the other crops, then over the assignment crops.

    Args:
        crops_for_assign: indices of the crops whose codes are predicted.
        temperature: softmax temperature of the predictions.
        epsilon: Sinkhorn entropy regularisation.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
    """

    def __init__(
        self,
        crops_for_assign: Sequence[int] = (0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        self.crops_for_assign = tuple(crops_for_assign)
        self.temperature, self.epsilon, self.sinkhorn_iterations = (
            temperature,
            epsilon,
            sinkhorn_iterations,
        )

    def forward(
        self,
        scores: Sequence[torch.Tensor],
        queue_scores: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``scores``: prototype scores of every crop, each B x K, in crop order;
        ``queue_scores``: per assignment crop, the scores of its queued embeddings."""
        batch = scores[0].shape[0]
        loss = scores[0].new_zeros((), dtype=torch.float32)
        for i, crop_id in enumerate(self.crops_for_assign):
            with torch.no_grad():
                out = scores[crop_id].detach().float()
                if queue_scores is not None:
                    out = torch.cat([queue_scores[i].float(), out])
                q = distributed_sinkhorn(out, self.epsilon, self.sinkhorn_iterations)[-batch:]
            subloss = scores[0].new_zeros((), dtype=torch.float32)
            for v, s in enumerate(scores):
                if v != crop_id:
                    log_p = F.log_softmax(s.float() / self.temperature, dim=1)
                    subloss = subloss - (q * log_p).sum(dim=1).mean()
            loss = loss + subloss / (len(scores) - 1)
        return loss / len(self.crops_for_assign)
