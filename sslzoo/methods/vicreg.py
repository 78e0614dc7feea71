"""VICReg (Bardes, Ponce and LeCun, 2022, "VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning").

for x in batch:
    x1, x2 = augment(x), augment(x)
    z1, z2 = h(f(x1)), h(f(x2))                 # f: backbone, h: expander
loss = lambda * mse(z1, z2)                     # invariance, this device's batch
     + mu * (v(z1) + v(z2)) / 2                 # variance: mean relu(1 - std), global batch
     + nu * (c(z1) + c(z2))                     # covariance: sum of off-diagonal cov^2 / D
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslzoo.augment.recipes import TwoViews
from sslzoo.losses.redundancy import VICRegLoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import mlp
from sslzoo.optim.settings import Optimization

# augmentations.py: Barlow Twins' views (bicubic crops, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
# grayscale 0.2, PIL blur p 1.0 / 0.1, solarisation 0 / 0.2)
VIEWS = TwoViews(crop_interpolation="bicubic")
# main_vicreg.py: LARS 0.2 per 256 images (``--base-lr``), wd 1e-6, biases and norms neither
# decayed nor adapted, 10 warmup epochs from 0, then a cosine to 0.001 of the peak
OPTIM = Optimization(
    optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=10.0, min_lr_ratio=0.001
)


class VICReg(SSLMethod):
    """VICReg with the official (facebookresearch/vicreg) ImageNet defaults.

    Variance and covariance are computed on the embeddings gathered from every device with
    their gradients (the official ``FullGatherLayer``), so W devices train like one process on
    the same global batch.

    Args:
        expander_dims: widths of the expander after the backbone (``--mlp 8192-8192-8192``):
            hidden Linear -> BN -> ReLU (with bias), the last Linear without bias.
        sim_coeff: invariance weight lambda (``--sim-coeff``).
        std_coeff: variance weight mu (``--std-coeff``).
        cov_coeff: covariance weight nu (``--cov-coeff``).
        views: the official views.
        optim: LARS 0.2 per 256 images, wd 1e-6, 10 warmup epochs, cosine to 0.001 x peak.
        backbone: backbone name (see :class:`SSLMethod`).
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        zero_init_residual: zero-initialised last BN of each residual block (the official
            ``resnet50(zero_init_residual=True)``).
        sync_batchnorm: synchronise BatchNorm across devices (``convert_sync_batchnorm``).
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    def __init__(
        self,
        expander_dims: tuple[int, ...] = (8192, 8192, 8192),
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
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
        self.expander = mlp([self.backbone.num_features, *expander_dims], hidden_bias=True)
        self.criterion = VICRegLoss(sim_coeff, std_coeff, cov_coeff)

    @property
    def projection_mlp(self) -> nn.Sequential:
        return self.expander

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        y1, y2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.expander(y1), self.expander(y2)
        loss = self.criterion(z1, z2)
        return self.training_outputs(loss, z1, y1, labels)
