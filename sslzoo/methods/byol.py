"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent").

online:  y = f(x), z = g(y), p = q(z)          # backbone, projector, predictor
target:  y' = f'(x), z' = g'(x)                # EMA of (f, g), no gradient
loss = (2 - 2 cos(p(v1), z'(v2))) + (2 - 2 cos(p(v2), z'(v1)))
after each step: target <- tau * target + (1 - tau) * online, tau -> 1 on a cosine
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from sslzoo.augment.recipes import TwoViews
from sslzoo.losses.regression import NormalizedMSELoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import mlp
from sslzoo.nn.teachers import frozen, frozen_copy
from sslzoo.optim.settings import Optimization

TargetInit = Literal["random", "copy"]

# byol/utils/augmentations.py and dataset.py: BYOL's crop sampler and colour ops, bicubic crops,
# blur 1.0 / 0.1 with a kernel of a tenth of the image (zero padded), solarisation 0 / 0.2
VIEWS = TwoViews(
    crop_sampler="byol", crop_interpolation="bicubic", color_ops="byol",
    blur_kernel_fraction=0.1, blur_padding="zeros",
)  # fmt: skip
# byol/configs/byol.py, 1000 epochs: LARS 0.2 per 256 images, wd 1.5e-6, 10 warmup epochs
OPTIM = Optimization(optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10.0)


def byol_mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    """BYOL's projector and predictor (``networks.MLP``): Linear -> BN -> ReLU -> Linear, the
    last Linear without bias. (lightly's ``BYOLProjectionHead`` has a bias there, the official
    one does not; the first Linear's bias, which the BN after it cancels, is left out.)"""
    return mlp([input_dim, hidden_dim, output_dim])


class BYOL(SSLMethod):
    """BYOL with the official (deepmind-research/byol) defaults of the 1000-epoch config.

    The official presets by epochs are: lr {40: 0.45, 100: 0.45, 300: 0.3, 1000: 0.2} per 256,
    EMA base {40: 0.97, 100: 0.99, 300: 0.99, 1000: 0.996}, weight decay 1e-6 (1.5e-6 at 1000).

    Args:
        projector_hidden_dim: projector MLP hidden width.
        projector_out_dim: projection dimension.
        predictor_hidden_dim: predictor MLP hidden width.
        ema_momentum: base EMA momentum tau_base; rises to 1 on a cosine over the run.
        target_init: how the target backbone and projector start: ``random``: their own random
            initialisation, drawn after the online network's from the seeded generator (the
            official ``_make_initial_state`` initialises online and target parameters from
            two keys split from one); ``copy``: a copy of the online network.
        views: the official views (``crop_sampler: torchvision``, ``crop_interpolation:
            bilinear``, ``color_ops: torchvision`` and ``blur_kernel_fraction: null`` give
            lightly's BYOL views).
        optim: LARS 0.2 per 256 images, wd 1.5e-6, warmup 10 epochs, no decay or adaptation of
            biases and BN (``exclude_bias_and_norm``).
        backbone: backbone name (see :class:`SSLMethod`).
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        zero_init_residual: zero-initialised last BN of each residual block (haiku's ResNet-50
            blocks do it: pass true for torchvision ResNets).
        sync_batchnorm: synchronise BatchNorm across devices (``cross_replica_axis``).
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    def __init__(
        self,
        projector_hidden_dim: int = 4096,
        projector_out_dim: int = 256,
        predictor_hidden_dim: int = 4096,
        ema_momentum: float = 0.996,
        target_init: TargetInit = "random",
        views: TwoViews = VIEWS,
        optim: Optimization = OPTIM,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool | None = None,
        sync_batchnorm: bool = True,
        init_backbone: str | None = None,
        freeze_backbone_steps: int = 0,
    ) -> None:
        super().__init__(
            backbone, backbone_kwargs, cifar_stem, zero_init_residual, sync_batchnorm, views, optim,
            init_backbone, freeze_backbone_steps,
        )  # fmt: skip
        dim = self.backbone.num_features
        self.projector = byol_mlp(dim, projector_hidden_dim, projector_out_dim)
        self.predictor = byol_mlp(projector_out_dim, predictor_hidden_dim, projector_out_dim)
        if target_init == "copy":
            self.target_backbone = frozen_copy(self.backbone)
            self.target_projector = frozen_copy(self.projector)
        elif target_init == "random":
            self.target_backbone = frozen(self.new_backbone())
            self.target_projector = frozen(byol_mlp(dim, projector_hidden_dim, projector_out_dim))
        else:
            raise ValueError(f"target_init must be 'random' or 'copy', not {target_init!r}")
        self.criterion = NormalizedMSELoss()

    @property
    def ema_base_momentum(self) -> float:
        return self.hparams.ema_momentum

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    @property
    def projection_mlp(self) -> nn.Sequential:
        return self.projector

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        y1, y2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(y1), self.projector(y2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(x1))
            t2 = self.target_projector(self.target_backbone(x2))
        loss = self.criterion(p1, t2) + self.criterion(p2, t1)
        return self.training_outputs(loss, z1, y1, labels)
