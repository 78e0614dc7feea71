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

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightly.utils.dist import gather
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sslzoo.methods.base import (
    LRScaling,
    SSLMethod,
    TeacherUpdate,
    frozen_copy,
    init_arguments,
)
from sslzoo.methods.byol_views import BYOLPairViews
from sslzoo.optim.lars import TrustRatio
from sslzoo.optim.optimizers import OptimizerName


class MoCoV3MLP(nn.Sequential):
    """The MLP of the official ``_build_mlp``: hidden layers Linear(no bias) -> BN -> ReLU,
    then a last Linear(no bias), followed by ``BatchNorm1d(affine=False)`` when ``last_bn``."""

    def __init__(
        self,
        num_layers: int,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        last_bn: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        dim = input_dim
        for _ in range(num_layers - 1):
            layers += [
                nn.Linear(dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(),
            ]
            dim = hidden_dim
        layers.append(nn.Linear(dim, output_dim, bias=False))
        if last_bn:
            layers.append(nn.BatchNorm1d(output_dim, affine=False))
        super().__init__(*layers)


def contrastive_loss(
    q: torch.Tensor, k: torch.Tensor, temperature: float, gather_distributed: bool = True
) -> torch.Tensor:
    """InfoNCE of queries ``q`` against keys ``k`` (official ``contrastive_loss``), times 2T.

    Query i's positive is key i; its negatives are every other key in the batch and, when
    torch.distributed is initialised, on every other rank (labels offset by rank).
    """
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    n, offset = q.shape[0], 0
    if (
        gather_distributed
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        k = torch.cat(gather(k))
        offset = n * torch.distributed.get_rank()
    logits = q @ k.T / temperature
    labels = torch.arange(n, device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def sincos_2d_position_embedding(
    grid_size: tuple[int, int], dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """The official ``build_2d_sincos_position_embedding`` without the class-token row:
    (grid_h * grid_w, dim) rows ``[sin(a w), cos(a w), sin(b w), cos(b w)]`` where a is the
    token's row, b its column and ``w_d = 1 / temperature ** (d / (dim / 4))``."""
    if dim % 4:
        raise ValueError(f"the embedding dimension must be divisible by 4 (got {dim})")
    h, w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_a = rows.flatten()[:, None] * omega[None]
    out_b = cols.flatten()[:, None] * omega[None]
    return torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)


@torch.no_grad()
def moco_vit_setup(
    vit: VisionTransformer, stop_grad_conv1: bool = True, sincos_pos_embed: bool = True
) -> None:
    """Apply the official ``VisionTransformerMoCo`` changes to a timm ViT, in place.

    Every Linear gets xavier-uniform weights and zero biases, with the qkv projection treated
    as three separate (dim x dim) matrices; the class token is drawn with std 1e-6; the patch
    projection is xavier-uniform over its flattened weight and, with ``stop_grad_conv1``,
    frozen. With ``sincos_pos_embed`` the position embedding becomes the fixed 2-D sin-cos
    table (zeros for the class token), a parameter with ``requires_grad=False``.
    """
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if vit.cls_token is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        fan_in = proj.in_channels * math.prod(proj.kernel_size)
        val = math.sqrt(6.0 / float(fan_in + proj.out_channels))
        nn.init.uniform_(proj.weight, -val, val)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        if stop_grad_conv1:
            for p in proj.parameters():
                p.requires_grad = False
    if sincos_pos_embed:
        if vit.pos_embed is None or vit.num_prefix_tokens != 1 or vit.no_embed_class:
            raise ValueError(
                "the fixed sin-cos position embedding needs a ViT with a class token, no "
                "register tokens and a learned position embedding that includes the class token"
            )
        table = sincos_2d_position_embedding(tuple(vit.patch_embed.grid_size), vit.embed_dim)
        table = torch.cat([torch.zeros(1, vit.embed_dim), table])[None]
        vit.pos_embed = nn.Parameter(table.to(vit.pos_embed.dtype), requires_grad=False)


class MoCoV3(BYOLPairViews, SSLMethod):
    """MoCo v3 with the official (facebookresearch/moco-v3) defaults of the ResNet-50 100-epoch
    recipe (CONFIG.md). For ViTs the official recipe is ``optimizer=adamw``, ``lr=1.5e-4``,
    ``weight_decay=0.1``, ``warmup_epochs=40``, 300 epochs, ``moco_t=0.2``,
    ``crop_min_scale=0.08`` and ``exclude_bias_and_norm=False`` (see configs/imagenet).

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
        crop_min_scale: smallest random-resized-crop area (0.2 ResNet ``--crop-min=.2``, 0.08
            ViT).
        color_jitter: colour jitter (brightness, contrast, saturation, hue).
        color_jitter_prob: probability of colour jitter.
        grayscale_prob: probability of grayscale.
        blur_prob: Gaussian blur probability of (view 1, view 2).
        solarize_prob: solarisation probability of (view 1, view 2).
        blur_sigma: range of the blur sigma.
        hflip_prob: probability of a horizontal flip.
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
        optimizer: ``lars`` (ResNet) or ``adamw`` (ViT).
        lr: base learning rate per 256 images (0.6 for 100 epochs, 0.3 for 300/1000 epochs;
            1.5e-4 for ViT with AdamW).
        lr_scaling: learning-rate scaling rule (``linear``: lr x batch / 256).
        weight_decay: weight decay (1e-6; 1.5e-6 for 1000 epochs; 0.1 for ViT).
        momentum: LARS momentum.
        betas: AdamW betas.
        warmup_epochs: linear warmup (10 ResNet, 40 ViT), then cosine decay to 0.
        min_lr: final learning rate.
        lars_trust_coefficient: LARS eta.
        lars_trust_ratio: ``update``: eta ||w|| / ||g + wd w|| (``moco/optimizer.py``).
        lars_lr_in_momentum: False: momentum first, then the learning rate (as torch's SGD).
        exclude_bias_and_norm: no weight decay and no LARS adaptation for parameters with
            ndim <= 1 (the official LARS); the official AdamW decays every parameter (False).
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
        crop_min_scale: float = 0.2,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: tuple[float, float] = (1.0, 0.1),
        solarize_prob: tuple[float, float] = (0.0, 0.2),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        hflip_prob: float = 0.5,
        gather_distributed: bool = True,
        sync_batchnorm: bool = True,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool = True,
        optimizer: OptimizerName = "lars",
        lr: float = 0.6,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 10.0,
        min_lr: float = 0.0,
        lars_trust_coefficient: float = 1e-3,
        lars_trust_ratio: TrustRatio = "update",
        lars_lr_in_momentum: bool = False,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        super().__init__(**init_arguments(SSLMethod, locals()))
        is_vit = isinstance(self.backbone.model, VisionTransformer)
        if is_vit:
            moco_vit_setup(self.backbone.model, stop_grad_conv1, sincos_pos_embed)
        self.projector = MoCoV3MLP(
            proj_layers or (3 if is_vit else 2),
            self.backbone.num_features,
            moco_mlp_dim,
            moco_dim,
            last_bn=True,
        )
        self.predictor = MoCoV3MLP(
            2,
            moco_dim,
            moco_mlp_dim,
            moco_dim,
            last_bn=is_vit if pred_last_bn is None else pred_last_bn,
        )
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)

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

    def view_recipe(self, image_size: int) -> dict[str, Any]:
        """The settings both views share, in lightly's ``BYOLView1Transform`` keywords."""
        hp = self.hparams
        bright, contrast, sat, hue = hp.color_jitter
        return dict(
            input_size=image_size,
            cj_prob=hp.color_jitter_prob,
            cj_strength=1.0,
            cj_bright=bright,
            cj_contrast=contrast,
            cj_sat=sat,
            cj_hue=hue,
            min_scale=hp.crop_min_scale,
            random_gray_scale=hp.grayscale_prob,
            sigmas=tuple(hp.blur_sigma),
            hf_prob=hp.hflip_prob,
        )

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        y1, y2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(y1), self.projector(y2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        t, gather_all = self.hparams.moco_t, self.hparams.gather_distributed
        loss = contrastive_loss(q1, k2, t, gather_all) + contrastive_loss(q2, k1, t, gather_all)
        return self.training_outputs(loss, z1, y1, labels)
