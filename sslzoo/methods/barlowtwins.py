"""Barlow Twins (Zbontar et al., 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction").

for x in batch:
    y1, y2 = augment(x), augment(x)
    z1, z2 = g(f(y1)), g(f(y2))                 # f: backbone, g: projector
c = BN(z1).T @ BN(z2) / N                       # cross-correlation over the global batch of N
loss = sum_i (1 - c_ii)^2 + lambda * sum_{i != j} c_ij^2
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslzoo.augment.recipes import TwoViews
from sslzoo.losses.redundancy import CrossCorrelationLoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import mlp
from sslzoo.optim.settings import Optimization

# main.py ``Transform``: torchvision's RandomResizedCrop (bicubic), ColorJitter(0.4, 0.4, 0.2,
# 0.1) with p 0.8, grayscale 0.2, PIL blur sigma U(0.1, 2) with p 1.0 / 0.1, solarisation
# 0 / 0.2
VIEWS = TwoViews(crop_interpolation="bicubic")
# main.py: LARS, weights 0.2 per 256 images, wd 1e-6; biases and BN parameters neither decayed
# nor adapted; 10 warmup epochs from 0, then a cosine to 0.001 of the peak
OPTIM = Optimization(
    optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=10.0, min_lr_ratio=0.001
)


class BarlowTwins(SSLMethod):
    """Barlow Twins with the official (facebookresearch/barlowtwins) ImageNet defaults.

    The loss follows main.py exactly, including its distributed form: every rank adds the
    others' share of the cross-correlation matrix outside autograd (``all_reduce``), so on W
    devices the gradient DDP averages is ``1 / W`` of a single process's on the same global
    batch (the loss is the same) -- the official training ran that way on 32 GPUs.

    Args:
        projector_dims: widths of the projector after the backbone (``--projector
            8192-8192-8192``): hidden Linear(no bias) -> BN -> ReLU, the last Linear without
            bias.
        lambd: weight of the off-diagonal terms (``--lambd``).
        bias_lr: learning rate of the biases and BatchNorm parameters, per 256 images like
            ``optim.lr`` (``--learning-rate-biases``; ``optim.lr`` is
            ``--learning-rate-weights``); it follows the same warmup and cosine. It applies to
            the parameters ``optim.exclude_bias_and_norm`` sets apart.
        views: the official views.
        optim: LARS 0.2 per 256 images, wd 1e-6, 10 warmup epochs, cosine to 0.001 x peak.
        backbone: backbone name (see :class:`SSLMethod`).
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        zero_init_residual: zero-initialised last BN of each residual block (torchvision's
            ``resnet50(zero_init_residual=True)`` officially).
        sync_batchnorm: synchronise BatchNorm across devices, the loss's BatchNorm included
            (``convert_sync_batchnorm`` officially).
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    def __init__(
        self,
        projector_dims: tuple[int, ...] = (8192, 8192, 8192),
        lambd: float = 0.0051,
        bias_lr: float = 0.0048,
        views: TwoViews = VIEWS,
        optim: Optimization = OPTIM,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool = True,
        sync_batchnorm: bool = True,
        init_backbone: str | None = None,
        freeze_backbone_steps: int = 0,
    ) -> None:
        super().__init__(
            backbone, backbone_kwargs, cifar_stem, zero_init_residual, sync_batchnorm, views, optim,
            init_backbone, freeze_backbone_steps,
        )  # fmt: skip
        self.projector = mlp([self.backbone.num_features, *projector_dims])
        self.criterion = CrossCorrelationLoss(projector_dims[-1], lambd)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """main.py's two groups: weights at ``optim.lr``, biases and norms at ``bias_lr``."""
        groups = super().parameter_groups()
        for g in groups:
            if g["name"] == "no_decay":
                g["lr_scale"] = self.hparams.bias_lr / self.optim.lr
        return groups

    @property
    def projection_mlp(self) -> nn.Sequential:
        return self.projector

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (y1, y2), labels = batch
        h1, h2 = self.backbone(y1), self.backbone(y2)
        z1, z2 = self.projector(h1), self.projector(h2)
        loss = self.criterion(z1, z2)
        return self.training_outputs(loss, z1, h1, labels)
