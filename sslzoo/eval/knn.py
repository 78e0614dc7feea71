"""Weighted kNN classification on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al. 2018; the DINO/lightly protocol).

    Query and bank features are L2-normalised; each of the ``k`` nearest bank items votes for
    its label with weight ``exp(cos_sim / temperature)``. Queries are processed in chunks of
    ``chunk_size`` so the similarity matrix never exceeds chunk_size x len(bank).
    Returns scores of shape (len(query), num_classes).
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for q in F.normalize(query.float(), dim=1).split(chunk_size):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(test_features, train_features, train_labels, num_classes, k, temperature)
    return (scores.argmax(1) == test_labels).float().mean().item()
