"""SimSiam (Chen and He, 2021, "Exploring Simple Siamese Representation Learning").

f: backbone + projector, h: predictor
for x in batch:
    x1, x2 = aug(x), aug(x)
    z1, z2 = f(x1), f(x2)
    p1, p2 = h(z1), h(z2)
    loss = D(p1, z2) / 2 + D(p2, z1) / 2
def D(p, z):
    return -cosine_similarity(p, z.detach())   # stop-gradient on z
the predictor keeps the initial learning rate (``--fix-pred-lr``); the rest follows a cosine,
set once per epoch
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from sslzoo.augment.recipes import TwoViews
from sslzoo.losses.regression import NegativeCosineLoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import mlp
from sslzoo.optim.optimizers import decay_groups, split_decay
from sslzoo.optim.settings import Optimization

LRUpdate = Literal["epoch", "step"]

# main_simsiam.py: MoCo v2's views (crops of at least 20%, jitter (0.4, 0.4, 0.4, 0.1), blur
# p 0.5 on both views, no solarisation)
VIEWS = TwoViews(
    crop_min_scale=0.2, color_jitter=(0.4, 0.4, 0.4, 0.1), blur_prob=(0.5, 0.5),
    solarize_prob=(0.0, 0.0),
)  # fmt: skip
# main_simsiam.py: SGD 0.05 per 256 images, wd 1e-4 on every parameter, no warmup
OPTIM = Optimization(optimizer="sgd", lr=0.05, weight_decay=1e-4, exclude_bias_and_norm=False)


def simsiam_projector(
    input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3
) -> nn.Sequential:
    """The official projector (simsiam/builder.py): ``num_layers - 1`` hidden layers of
    Linear(no bias) -> BN -> ReLU, then the encoder's original fc Linear, whose bias is kept but
    frozen, followed by ``BatchNorm1d(output_dim, affine=False)``."""
    dims = [input_dim, *[hidden_dim] * (num_layers - 1), output_dim]
    head = mlp(dims, last_bias=True, last_norm="no_affine")
    head[-2].bias.requires_grad = False
    return head


class SimSiam(SSLMethod):
    """SimSiam with the official (facebookresearch/simsiam) ImageNet defaults.

    Args:
        dim: projector output dimension (and predictor input/output).
        pred_dim: predictor hidden width.
        proj_hidden_dim: projector hidden width; ``None`` uses the backbone's width, as the
            official code does (2048 for ResNet-50).
        proj_layers: projector layers (3 officially).
        fix_pred_lr: the predictor keeps the constant (scaled) initial learning rate while the
            rest follows the cosine (``--fix-pred-lr``).
        lr_update: ``epoch``: the learning rate changes once per epoch, to the schedule's value
            at the epoch's first step, as the official ``adjust_learning_rate`` called at
            each epoch's start (``init_lr * 0.5 * (1 + cos(pi * epoch / epochs))``);
            ``step``: at every optimizer step.
        views: the official views (MoCo v2's).
        optim: SGD 0.05 per 256 images, wd 1e-4; the official SGD decays every parameter
            (``exclude_bias_and_norm: false``).
        backbone: backbone name (see :class:`SSLMethod`).
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        zero_init_residual: start the last BatchNorm of every residual block of a ResNet
            backbone (torchvision's or timm's) at zero scale, as officially
            (simsiam/builder.py builds its torchvision ResNet with
            ``zero_init_residual=True``); other backbones ignore it.
        sync_batchnorm: synchronise BatchNorm across devices (SyncBN officially).
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    def __init__(
        self,
        dim: int = 2048,
        pred_dim: int = 512,
        proj_hidden_dim: int | None = None,
        proj_layers: int = 3,
        fix_pred_lr: bool = True,
        lr_update: LRUpdate = "epoch",
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
        if lr_update not in ("epoch", "step"):
            raise ValueError(f"lr_update must be 'epoch' or 'step', not {lr_update!r}")
        super().__init__(
            backbone, backbone_kwargs, cifar_stem, zero_init_residual, sync_batchnorm, views, optim,
            init_backbone, freeze_backbone_steps,
        )  # fmt: skip
        width = self.backbone.num_features
        self.projector = simsiam_projector(width, proj_hidden_dim or width, dim, proj_layers)
        # builder.py's predictor: Linear(no bias) -> BN -> ReLU -> Linear
        self.predictor = mlp([dim, pred_dim, dim], last_bias=True)
        self.criterion = NegativeCosineLoss()

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Decay / no-decay groups for the encoder (backbone + projector) and, separately, for
        the predictor, whose groups carry ``fixed_lr`` when ``fix_pred_lr``."""
        st = self.optim
        predictor = {id(p) for p in self.predictor.parameters()}
        encoder = [(n, p) for n, p in self.named_parameters() if id(p) not in predictor]
        groups = []
        for prefix, params, fixed in (
            ("", encoder, False),
            ("predictor_", self.predictor.named_parameters(), self.hparams.fix_pred_lr),
        ):
            decay, no_decay = split_decay(params, st.exclude_bias_and_norm)
            groups += decay_groups(decay, no_decay, st.weight_decay, prefix)
            for g in groups[-2:]:
                g["fixed_lr"] = fixed
        return [g for g in groups if g["params"]]

    def learning_rate_at(self, step: int) -> float:
        """The schedule at ``step``, or at the first step of its epoch (``lr_update``)."""
        if self.hparams.lr_update == "epoch":
            step -= step % self.steps_per_epoch
        return super().learning_rate_at(step)

    @property
    def projection_mlp(self) -> nn.Sequential:
        return self.projector

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        y1, y2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(y1), self.projector(y2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (self.criterion(p1, z2) + self.criterion(p2, z1)) / 2
        return self.training_outputs(loss, z1, y1, labels)
