"""The student of self-training: its backbone (by default the teacher's architecture, freshly
initialised), the noise Noisy Student trains it with, and the datasets it reads."""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms as T
from torch import nn
from torch.utils.data import Dataset

from sslzoo.backbones import Backbone
from sslzoo.errors import ConfigError


def backbone_arguments(net: nn.Module) -> dict[str, Any]:
    """``build_backbone`` arguments (``name``, ``cifar_stem``, ``kwargs``) of the first
    backbone inside ``net``, from the spec it records."""
    backbone = next((m for m in net.modules() if isinstance(m, Backbone)), None)
    if backbone is None:
        raise ConfigError("the teacher holds no sslzoo backbone to copy the architecture of")
    spec = backbone.spec
    prefix = "timm" if spec["library"] == "timm" else "tv"
    kwargs = {k: v for k, v in spec["kwargs"].items() if k != "num_classes"}
    return {"name": f"{prefix}/{spec['name']}", "cifar_stem": spec["cifar_stem"], "kwargs": kwargs}


def with_drop_path(arguments: dict[str, Any], rate: float) -> dict[str, Any]:
    """The backbone arguments with stochastic depth ``rate`` (timm's ``drop_path_rate``: the
    last block drops with that probability, linearly less before); only timm models take it."""
    if rate <= 0:
        return arguments
    if not arguments["name"].startswith("timm/"):
        raise ConfigError(
            f"--drop_path {rate}: stochastic depth needs a timm backbone, not {arguments['name']}"
            " (set --drop_path 0)"
        )
    return {**arguments, "kwargs": {**arguments["kwargs"], "drop_path_rate": rate}}


def noisy(transform: T.Compose, num_ops: int, magnitude: int) -> T.Compose:
    """``transform`` with RandAugment (``num_ops`` operations of ``magnitude`` on a 0-30
    scale, torchvision's 31 bins) before the image becomes a tensor."""
    steps = list(transform.transforms)
    at = next(i for i, s in enumerate(steps) if isinstance(s, T.ToTensor))
    rand = T.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=31)
    return T.Compose([*steps[:at], rand, *steps[at:]])


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class Unlabeled(Dataset):
    """Images of ``dataset`` at ``indices``, each with its index instead of its label (the
    label is never read into training)."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor) -> None:
        self.dataset, self.indices = dataset, indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[self.indices[i]][0], self.indices[i]


class PseudoLabeled(Unlabeled):
    """Images of ``dataset`` at ``indices``, each with its pseudo-label (a probability row)."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, targets: torch.Tensor) -> None:
        super().__init__(dataset, indices)
        self.targets = targets

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        return self.dataset[self.indices[i]][0], self.targets[i]
