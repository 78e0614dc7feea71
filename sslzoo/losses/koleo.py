"""The Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., 2019, "Spreading vectors
for similarity search"): it pushes each L2-normalised embedding away from its nearest
neighbour in the batch, spreading the batch over the sphere."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)`` over the rows of ``x`` after L2
    normalisation, in float32.

    The nearest neighbour is the row of largest dot product (the diagonal set to -1), and the
    distance is ``torch.nn.PairwiseDistance(2, eps)``'s, which adds ``eps`` to the difference,
    as DINOv2's ``KoLeoLoss``. The batch is this process's rows: DINOv2 does not gather it.
    """
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
