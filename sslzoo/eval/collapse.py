"""Collapse metrics of an embedding matrix."""

from __future__ import annotations

import torch


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained
    self-supervised representations by their rank"): the exponential of the entropy of the
    normalised singular values of the (N, D) embedding matrix,
    ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps``. A smooth effective
    rank between 1 (collapse to a line) and ``min(N, D)``."""
    sigma = torch.linalg.svdvals(embeddings.detach().double())
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(embeddings: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised embeddings (as ``train/embedding_std``):
    ``1/sqrt(D)`` for spread-out features, 0 under collapse."""
    z = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    return float(z.std(0).mean())
