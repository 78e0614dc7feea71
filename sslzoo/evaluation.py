"""Feature extraction, weighted kNN and linear probing on frozen features."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    model: nn.Module, batches: Iterable, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``(images, labels)`` batches; returns (features, labels)."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, y in batches:
        feats.append(model(images.to(device)).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


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


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Test top-1 of a linear classifier trained on frozen features, at the final epoch.

    Features are standardised with the training set's mean and std (an affine-free BatchNorm
    in front of the classifier, as in the MAE linear probe); the classifier is trained with
    AdamW on mini-batches of the training features only.
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for idx in order.split(batch_size):
            loss = F.cross_entropy(head(x_train[idx]), train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (head(x_test).argmax(1) == test_labels).float().mean().item()
