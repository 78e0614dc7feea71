"""Probes trained on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
