"""Losses that decorrelate the embedding's dimensions instead of contrasting samples.

Barlow Twins (Zbontar et al., 2021): the cross-correlation matrix of the two views' embeddings,
each standardised per dimension over the global batch, is pulled towards the identity.
VICReg (Bardes et al., 2022): invariance (mean squared distance between the views), variance
(a hinge keeping each dimension's std above 1) and covariance (off-diagonal covariances
pushed to 0), each view's statistics over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.utils.dist import gather
from torch import nn

from sslzoo.distributed import all_reduce_sum, is_distributed, world_size


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class CrossCorrelationLoss(nn.Module):
    """Barlow Twins' objective: ``sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2``.

    ``C = BN(z1)^T BN(z2) / N`` over the global batch of N, with ``BN`` a BatchNorm without
    affine parameters (owned here: it becomes a SyncBatchNorm with the method's, so both views
    are standardised with global-batch statistics). As in the official code, every rank adds
    the others' share of ``C`` outside autograd (``all_reduce`` of the matrix): a rank's
    gradient flows through its own share only, so with DDP's averaging the gradient is
    ``1 / world_size`` of a single process's on the same global batch (the loss is the same).

    Args:
        dim: embedding dimension.
        lambd: weight of the off-diagonal terms (0.0051, ``--lambd``).
    """

    def __init__(self, dim: int, lambd: float = 0.0051) -> None:
        super().__init__()
        self.lambd = lambd
        self.bn = nn.BatchNorm1d(dim, affine=False)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        c = self.bn(z1).T @ self.bn(z2) / (z1.shape[0] * world_size())
        if is_distributed():  # the other ranks' shares, without their gradient
            c = c + (all_reduce_sum(c.detach()) - c.detach())
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        return on_diag + self.lambd * off_diagonal(c).pow(2).sum()


class VICRegLoss(nn.Module):
    """VICReg's objective: ``sim * invariance + std * variance + cov * covariance``.

    Invariance is the mean squared error between the views on this rank's batch; variance and
    covariance use the embeddings gathered from every rank (with gradients, as the official
    ``FullGatherLayer``): ``mean(relu(1 - sqrt(var + eps)))`` per view, halved, and the sum of
    squared off-diagonal covariances divided by the dimension, per view.

    Args:
        sim_coeff: invariance weight (25).
        std_coeff: variance weight (25).
        cov_coeff: covariance weight (1).
        eps: added to the variance under the square root (1e-4).
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff, self.eps = (
            sim_coeff,
            std_coeff,
            cov_coeff,
            eps,
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        invariance = F.mse_loss(x, y)
        if is_distributed():
            x, y = torch.cat(gather(x)), torch.cat(gather(y))
        return (
            self.sim_coeff * invariance
            + self.std_coeff * (self.variance(x) + self.variance(y)) / 2
            + self.cov_coeff * (self.covariance(x) + self.covariance(y))
        )

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """Hinge on each dimension's std: ``mean(relu(1 - sqrt(var + eps)))``."""
        return F.relu(1 - torch.sqrt(x.var(dim=0) + self.eps)).mean()

    @staticmethod
    def covariance(x: torch.Tensor) -> torch.Tensor:
        """Sum of squared off-diagonal covariances, divided by the dimension."""
        x = x - x.mean(dim=0)
        cov = x.T @ x / (x.shape[0] - 1)
        return off_diagonal(cov).pow(2).sum() / x.shape[1]
