"""Two ways to try an idea on sslzoo, each trained by ``sslzoo fit`` without changing sslzoo:

- ``DecoupledSimCLR`` keeps SimCLR and changes its loss only: a method's loss is its
  ``self.criterion``, which ``training_step`` calls.
- ``TinySiamese`` is a whole method on the contract: its views and optimisation settings are
  the defaults of its ``views`` and ``optim`` arguments (every field a config key), its heads
  come from ``sslzoo.nn``, and its step returns ``self.training_outputs(...)``.

Train them from the folder that holds this file (or from the repository root as
``examples.my_idea.DecoupledSimCLR``)::

    sslzoo fit --config configs/quickstart/simclr.yaml --model my_idea.DecoupledSimCLR
    sslzoo fit --config configs/quickstart/simclr.yaml --model my_idea.TinySiamese
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslzoo.augment.recipes import TwoViews
from sslzoo.losses.regression import NegativeCosineLoss
from sslzoo.methods import SimCLR
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import mlp
from sslzoo.optim.settings import Optimization


class DecoupledNTXent(nn.Module):
    """NT-Xent without the positive in the denominator (Yeh et al., 2022, "Decoupled
    Contrastive Learning"), both directions, on this device's batch."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        n = z1.shape[0]
        z = torch.cat([z1, z2])
        sim = z @ z.T / self.temperature
        positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        drop = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        drop[torch.arange(2 * n, device=z.device), positive] = True  # self and positive
        negatives = torch.logsumexp(sim.masked_fill(drop, float("-inf")), dim=1)
        return (negatives - sim[torch.arange(2 * n), positive]).mean() * 2


class DecoupledSimCLR(SimCLR):
    """SimCLR with the decoupled contrastive loss; every SimCLR argument still applies.

    Args:
        decoupled: use the decoupled loss (false: SimCLR's own).
    """

    def __init__(self, decoupled: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if decoupled:
            self.criterion = DecoupledNTXent(self.hparams.temperature)


class TinySiamese(SSLMethod):
    """A SimSiam-like method in a few lines: a projector, a predictor, a stop-gradient.

    Args:
        dim: projection width.
        views: two views (BYOL's asymmetric blur and solarisation by default).
        optim: SGD 0.05 per 256 images, wd 1e-4 on every parameter.
        backbone: backbone name.
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for small images.
        zero_init_residual: zero-initialised last BN of each residual block.
        sync_batchnorm: synchronise BatchNorm across devices.
    """

    def __init__(
        self,
        dim: int = 128,
        views: TwoViews = TwoViews(),
        optim: Optimization = Optimization(
            optimizer="sgd", lr=0.05, weight_decay=1e-4, exclude_bias_and_norm=False
        ),
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool | None = None,
        sync_batchnorm: bool = False,
    ) -> None:
        super().__init__(
            backbone, backbone_kwargs, cifar_stem, zero_init_residual, sync_batchnorm, views, optim
        )
        width = self.backbone.num_features
        self.projector = mlp([width, width, dim], last_norm="affine")
        self.predictor = mlp([dim, dim // 4, dim], last_bias=True)
        self.criterion = NegativeCosineLoss()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        h1, h2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (self.criterion(p1, z2) + self.criterion(p2, z1)) / 2
        return self.training_outputs(loss, z1, h1, labels)
