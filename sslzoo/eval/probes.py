"""Probes trained on frozen features: a linear classifier, or a 2-layer MLP beside it."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Head = Literal["linear", "mlp"]


class Probe(nn.Module):
    """Standardisation with the training features' mean and std (an affine-free BatchNorm
    frozen after fitting, as in front of the MAE linear probe), then the classifier."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, classifier: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier((features - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted class of each row (eval mode)."""
        self.eval()
        return self(features).argmax(1)


def classifier(dim: int, num_classes: int, head: Head, hidden_dim: int | None = None) -> nn.Module:
    """``linear``: one linear layer. ``mlp``: linear -> BatchNorm -> ReLU -> linear, the
    hidden width ``hidden_dim`` (default: the feature width)."""
    if head == "linear":
        return nn.Linear(dim, num_classes)
    if head == "mlp":
        hidden = hidden_dim or dim
        return nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
    raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    head: Head = "linear",
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> Probe:
    """A probe trained with AdamW on mini-batches of ``features`` (frozen) and ``labels`` for
    ``epochs`` epochs; nothing is selected on held-out data: the final epoch's probe."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = classifier(features.shape[1], num_classes, head)
    last = net if head == "linear" else net[-1]
    with torch.no_grad():
        last.weight.normal_(0, 0.01, generator=generator)
        last.bias.zero_()
    probe = Probe(mean, std, net)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for idx in order.split(batch_size):
            if head == "mlp" and len(idx) < 2:
                continue  # BatchNorm needs two rows
            loss = F.cross_entropy(probe(features[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe.eval()


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
    head: Head = "linear",
) -> float:
    """Test top-1 of a probe (:func:`fit_probe`) trained on the training features only, at
    the final epoch."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = fit_probe(
        train_features, train_labels, num_classes, head, epochs, lr, weight_decay, batch_size, seed
    )
    return (probe.predict(test_features) == test_labels).float().mean().item()
