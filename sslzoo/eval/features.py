"""Features of a frozen backbone."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``(images, labels)`` batches; returns (features, labels).
    With ``desc``, a progress bar of that name."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, y in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        feats.append(model(images.to(device)).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)
