"""MoCo v3 (Chen, Xie and He, 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers").

    f_q, f_k: backbone + projector; f_k is an EMA of f_q (no gradient); h: predictor
    for k, x in enumerate(batches):
        f_k <- m_k f_k + (1 - m_k) f_q      # before the keys, step 0 included; m_k -> 1
        x1, x2 = aug1(x), aug2(x)
        q1, q2 = h(f_q(x1)), h(f_q(x2))
        k1, k2 = f_k(x1), f_k(x2)
        loss = ctr(q1, k2) + ctr(q2, k1)   # symmetric
    def ctr(q, k):
        logits = normalize(q) @ normalize(gather_all_ranks(k)).T / T
        labels = arange(N) + N * rank       # the positive is the same image's key
        return CrossEntropy(logits, labels) * 2T

The momentum update is the official code's order (``main_moco.py`` sets m_k from the
fractional epoch ``epoch + i / iters_per_epoch``, and ``MoCo.forward`` updates f_k before it
computes the keys), not the paper's pseudocode, which updates after the optimizer step.

For ViT backbones the official code also freezes the random patch projection
(``--stop-grad-conv1``), uses a fixed 2-D sin-cos position embedding and initialises the
query, key and value weights separately with xavier-uniform; see :func:`moco_vit_setup`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sslzoo.augment.recipes import TwoViews
from sslzoo.losses.contrastive import InfoNCELoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import mlp
from sslzoo.nn.teachers import TeacherUpdate, frozen_copy
from sslzoo.nn.vit import moco_vit_setup
from sslzoo.optim.settings import Optimization

# main_moco.py: BYOL's asymmetric pair (blur 1.0 / 0.1, solarisation 0 / 0.2) with
# torchvision's ops, crops of at least 20% (--crop-min=.2; 0.08 for ViTs)
VIEWS = TwoViews(crop_min_scale=0.2)
# CONFIG.md, ResNet-50 100 epochs: LARS 0.6 per 256 images, wd 1e-6, 10 warmup epochs
OPTIM = Optimization(optimizer="lars", lr=0.6, weight_decay=1e-6, warmup_epochs=10.0)


def moco_mlp(
    num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool
) -> nn.Sequential:
    """The MLP of the official ``_build_mlp``: hidden layers Linear(no bias) -> BN -> ReLU,
    then a last Linear(no bias), followed by ``BatchNorm1d(affine=False)`` when ``last_bn``."""
    dims = [input_dim, *[hidden_dim] * (num_layers - 1), output_dim]
    return mlp(dims, last_norm="no_affine" if last_bn else None)


class MoCoV3(SSLMethod):
    """MoCo v3 with the official (facebookresearch/moco-v3) defaults of the ResNet-50 100-epoch
    recipe (CONFIG.md). For ViTs the official recipe is ``optim: {optimizer: adamw, lr: 1.5e-4,
    weight_decay: 0.1, warmup_epochs: 40, exclude_bias_and_norm: false}``, 300 epochs,
    ``moco_t=0.2`` and ``views: {crop_min_scale: 0.08}`` (see configs/imagenet).

    Args:
        moco_dim: output dimension of the projector and the predictor.
        moco_mlp_dim: hidden width of the projector and predictor MLPs.
        moco_m: base momentum m0 of the momentum encoder (0.99; 0.996 for 1000 epochs).
        moco_m_cos: raise the momentum from m0 to 1 on a half cosine per step (``--moco-m-cos``,
            used by every official recipe); declared in :meth:`teacher_update`.
        moco_t: softmax temperature T; the loss is multiplied by 2T (1.0 ResNet, 0.2 ViT).
        proj_layers: projector layers; ``None`` picks the official 2 (ResNet) or 3 (ViT).
        pred_last_bn: affine-free BatchNorm after the predictor; ``None`` picks the official
            False (ResNet) or True (ViT).
        stop_grad_conv1: ViT only: freeze the random patch projection (``--stop-grad-conv1``).
        sincos_pos_embed: ViT only: fixed 2-D sin-cos position embedding instead of a learned one.
        gather_distributed: take negatives from every rank's keys (``concat_all_gather``).
        sync_batchnorm: synchronise BatchNorm across devices (``convert_sync_batchnorm``).
        backbone: backbone name (see :class:`SSLMethod`); a timm ``VisionTransformer`` gets the
            ViT setup. The official ViT-S has 12 heads: pass ``num_heads: 12`` to timm's
            ``vit_small_patch16_224``.
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        zero_init_residual: start the last BatchNorm of every residual block of a ResNet
            backbone (torchvision's or timm's) at zero scale, as officially (main_moco.py builds
            its torchvision ResNet with ``zero_init_residual=True``); other backbones ignore it.
        views: the official views: BYOL's asymmetric pair with torchvision's colour ops,
            bilinear crops and PIL's blur, crops of at least 20% of the image.
        optim: LARS 0.6 per 256 images (0.3 for 300 and 1000 epochs), wd 1e-6 (1.5e-6 for
            1000 epochs), warmup 10 epochs; no decay or adaptation of biases and BN.
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    def __init__(
        self,
        moco_dim: int = 256,
        moco_mlp_dim: int = 4096,
        moco_m: float = 0.99,
        moco_m_cos: bool = True,
        moco_t: float = 1.0,
        proj_layers: int | None = None,
        pred_last_bn: bool | None = None,
        stop_grad_conv1: bool = True,
        sincos_pos_embed: bool = True,
        gather_distributed: bool = True,
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
        is_vit = isinstance(self.backbone.model, VisionTransformer)
        if is_vit:
            moco_vit_setup(self.backbone.model, stop_grad_conv1, sincos_pos_embed)
        dim = self.backbone.num_features
        self.projector = moco_mlp(
            proj_layers or (3 if is_vit else 2), dim, moco_mlp_dim, moco_dim, True
        )
        pred_bn = is_vit if pred_last_bn is None else pred_last_bn
        self.predictor = moco_mlp(2, moco_dim, moco_mlp_dim, moco_dim, pred_bn)
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)
        self.criterion = InfoNCELoss(moco_t, gather_distributed)

    @property
    def ema_base_momentum(self) -> float:
        return self.hparams.moco_m

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.backbone, self.momentum_backbone),
            (self.projector, self.momentum_projector),
        ]

    def teacher_update(self) -> TeacherUpdate:
        """Before each step's forward, with that step's momentum, as the official
        ``MoCo.forward`` updates the momentum encoder before computing the keys."""
        hp = self.hparams
        return TeacherUpdate(hp.moco_m, cosine=hp.moco_m_cos, before_step=True)

    @property
    def projection_mlp(self) -> nn.Sequential:
        return self.projector

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        y1, y2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(y1), self.projector(y2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        loss = self.criterion(q1, k2) + self.criterion(q2, k1)
        return self.training_outputs(loss, z1, y1, labels)
