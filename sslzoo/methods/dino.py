"""DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Algorithm 1 of the paper, with multi-crop::

    gs, gt: student and teacher (backbone + DINOHead); C: center (K); tps, tpt: temperatures
    gt.params = gs.params
    for x in loader:
        views = [global_1, global_2, local_1, ..., local_n] = multicrop(x)
        s = [gs(v) for v in views]                  # the student sees every crop
        t = [gt(v) for v in views[:2]]              # the teacher sees the 2 global crops only
        loss = mean over pairs (iq, v), v != iq, of H(t[iq], s[v])
        loss.backward(); clip each gradient; update(gs)            # AdamW
        gt.params = l * gt.params + (1 - l) * gs.params            # l: 0.996 -> 1, cosine
        C = m * C + (1 - m) * mean(cat(t))                         # across all ranks

    def H(t, s):
        t = softmax((t - C) / tpt)                  # centre + sharpen; tpt warms up per epoch
        return -(t * log_softmax(s / tps)).sum(dim=1).mean()

The pieces iBOT reuses (head, centring, cross-view loss, gradient handling, multi-crop views)
live here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import timm.models
import torch
import torch.nn.functional as F
import torchvision
from lightly.transforms.dino_transform import DINOViewTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from timm.layers import DropPath
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from sslzoo.augment.views import MultiCropRecipe, dino_views
from sslzoo.methods.base import (
    LRScaling,
    SSLMethod,
    ViewTransform,
    forward_multicrop,
    frozen_copy,
    init_arguments,
)
from sslzoo.nn.vit import dino_vit_setup
from sslzoo.optim.lars import TrustRatio
from sslzoo.optim.optimizers import OptimizerName
from sslzoo.optim.schedules import linear_warmup

# ------------------------------------------------------------------------------------- head


def weight_normed_linear(in_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Linear:
    """DINO's last layer: ``weight_norm(Linear(in, out, bias=False))`` with the magnitude g
    filled with 1, and frozen when ``norm_last_layer`` (every prototype then has unit norm).

    Uses ``torch.nn.utils.parametrizations.weight_norm`` (g = ``original0``, v = ``original1``),
    which computes the same weight as the deprecated ``nn.utils.weight_norm`` and, unlike it,
    can be deep-copied into an EMA teacher.
    """
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    with torch.no_grad():
        g.fill_(1.0)
    g.requires_grad = not norm_last_layer
    return layer


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """The DINO projection head (``vision_transformer.py`` ``DINOHead``).

    ``nlayers`` Linear layers (width ``hidden_dim``, GELU between them, optional BatchNorm after
    each hidden Linear, whose bias is kept as in the official code), ending at
    ``bottleneck_dim``; L2 normalisation; then the weight-normalised last layer to ``out_dim``
    without bias. The MLP is initialised with trunc_normal(0.02) and zero biases; the last
    layer keeps PyTorch's default Linear init, as officially.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dim = in_dim
            for _ in range(nlayers - 1):
                layers.append(nn.Linear(dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                dim = hidden_dim
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_trunc_normal_init)
        self.last_layer = weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """MLP then L2 normalisation: the bottleneck the prototypes are compared with."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(x))


# ------------------------------------------------------------------------------------- loss


@torch.no_grad()
def global_batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of ``x`` across every rank (sum all-reduced, divided by the global
    count), as DINO's ``update_center``; keeps dim 0 with size 1."""
    total = x.float().sum(dim=0, keepdim=True)
    count = x.shape[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        count *= torch.distributed.get_world_size()
    return total / count


@torch.no_grad()
def update_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * batch_mean, in place."""
    center.mul_(momentum).add_(batch_mean.to(center.dtype), alpha=1.0 - momentum)


def teacher_probs(
    teacher_out: torch.Tensor, center: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The teacher's target distribution: centre then sharpen, no gradient."""
    return F.softmax((teacher_out.detach().float() - center) / temperature, dim=-1)


def cross_view_loss(
    student_out: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    student_temp: float,
) -> torch.Tensor:
    """Cross-entropy ``-sum(q * log_softmax(s / tps))`` averaged over the batch, for every
    (teacher global view iq, student view v) pair with v != iq, averaged over the pairs."""
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
    total = student_out[0].new_zeros((), dtype=torch.float32)
    terms = 0
    for iq, q in enumerate(teacher_targets):
        for v, log_p in enumerate(log_probs):
            if v == iq:
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            terms += 1
    return total / terms


class DINOLoss(nn.Module):
    """DINO's self-distillation loss; it owns the centre.

    ``center`` is a registered buffer (so it is saved in checkpoints), updated after each call
    with the teacher outputs of the call, averaged over the global batch of every rank.

    Args:
        out_dim: dimension K of the head outputs.
        student_temp: student temperature tps.
        center_momentum: momentum m of the centre's moving average.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_out: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        teacher_temp: float,
    ) -> torch.Tensor:
        """Loss of one step: ``student_out`` per view (globals first), ``teacher_out`` per
        global view, each of shape (batch, K). Updates the centre afterwards."""
        targets = [teacher_probs(t, self.center, teacher_temp) for t in teacher_out]
        loss = cross_view_loss(student_out, targets, self.student_temp)
        batch_mean = global_batch_mean(torch.cat(list(teacher_out)))
        update_center(self.center, batch_mean, self.center_momentum)
        return loss


def teacher_temp_at(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Teacher temperature of an epoch: ``np.linspace(warmup_temp, temp, warmup_epochs)[epoch]``
    during the warmup, ``temp`` afterwards (the official per-epoch schedule)."""
    if epoch >= warmup_epochs:
        return temp
    return linear_warmup(epoch, max(warmup_epochs - 1, 1), warmup_temp, temp)


# ------------------------------------------------------------------------- gradient handling


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[torch.Tensor], clip: float) -> None:
    """DINO's ``utils.clip_gradients``: every gradient tensor whose L2 norm exceeds ``clip`` is
    scaled by ``clip / (norm + 1e-6)``, each tensor on its own (not the global norm)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads, 2.0)
    scales = [(clip / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def disable_drop_path(module: nn.Module) -> nn.Module:
    """Set every timm ``DropPath`` in ``module`` to probability 0 (the teacher has none)."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    return module


def is_timm_vit(name: str) -> bool:
    """Whether :func:`sslzoo.backbones.build_backbone` builds a timm ``VisionTransformer``
    from ``name`` (torchvision names win when there is no ``timm/`` prefix, as there)."""
    library, _, bare = name.rpartition("/")
    if library == "tv":
        return False
    if library == "" and bare in torchvision.models.list_models(module=torchvision.models):
        return False
    return timm.models.is_model(bare) and timm.models.is_model_in_modules(
        bare, ["vision_transformer"]
    )


def vit_backbone_kwargs(
    backbone: str, backbone_kwargs: dict[str, Any] | None, drop_path_rate: float
) -> dict[str, Any]:
    """Backbone arguments with, for timm ViTs, the student's stochastic depth and
    ``dynamic_img_size`` (position embeddings interpolated for crops of another size, DINO's
    ``interpolate_pos_encoding``) unless given explicitly."""
    kwargs = dict(backbone_kwargs or {})
    if is_timm_vit(backbone):
        kwargs.setdefault("drop_path_rate", drop_path_rate)
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


# ------------------------------------------------------------------------------------ views


def patch_size_of(backbone: nn.Module) -> int:
    """The ViT patch size of a backbone, 1 for anything else."""
    patch_embed = getattr(getattr(backbone, "model", backbone), "patch_embed", None)
    return int(patch_embed.patch_size[0]) if patch_embed is not None else 1


def default_local_crop_size(image_size: int, multiple: int = 1) -> int:
    """DINO's 96 px for 224 px global crops, scaled to ``image_size`` and rounded to a
    multiple of the patch size (224 -> 96, 96 -> 48 with patch 16, 32 -> 12 with patch 4)."""
    return max(multiple, round(image_size * 96 / 224 / multiple) * multiple)


def multicrop_transform(recipe: MultiCropRecipe) -> MultiViewTransform:
    """DINO's ``DataAugmentationDINO`` (see :class:`~sslzoo.augment.views.MultiCropRecipe`)
    as PIL views, built from lightly's ``DINOViewTransform`` with every argument explicit
    (lightly's ``DINOTransform`` drops ``cj_strength`` for the second global view)."""
    r = recipe
    bright, contrast, sat, hue = r.color_jitter
    return MultiViewTransform(
        [
            DINOViewTransform(
                crop_size=size,
                crop_scale=tuple(scale),
                hf_prob=r.hflip_prob,
                cj_prob=r.color_jitter_prob,
                cj_strength=1.0,
                cj_bright=bright,
                cj_contrast=contrast,
                cj_sat=sat,
                cj_hue=hue,
                random_gray_scale=r.grayscale_prob,
                gaussian_blur=blur,
                sigmas=tuple(r.blur_sigma),
                solarization_prob=solarize,
                normalize={"mean": list(r.mean), "std": list(r.std)},
            )
            for size, scale, blur, solarize in r.crops()
        ]
    )


# ----------------------------------------------------------------------------------- method


class DINO(SSLMethod):
    """DINO with the official (facebookresearch/dino ``main_dino.py``) defaults.

    The README's better ViT-S/16 run ("boosting DINO") changes ``teacher_temp`` to 0.07 with
    ``warmup_teacher_temp_epochs`` 30 and ``norm_last_layer`` to False; see
    ``configs/imagenet/dino.yaml``. fp16 is the trainer's ``precision``, not a method argument.
    Evaluation (kNN, probes, export) uses the teacher backbone.

    Args:
        out_dim: head output dimension K (number of prototypes).
        hidden_dim: width of the head's hidden layers.
        bottleneck_dim: dimension of the L2-normalised bottleneck before the last layer.
        head_layers: Linear layers of the head MLP before the last layer (``nlayers``).
        use_bn_in_head: BatchNorm after each hidden Linear of the head (for convnets).
        norm_last_layer: freeze the last layer's weight-norm magnitude at 1.
        momentum_teacher: base EMA momentum of the teacher; rises to 1 on a cosine per step.
        warmup_teacher_temp: teacher temperature at epoch 0.
        teacher_temp: teacher temperature after the warmup (0.07 in the paper runs).
        warmup_teacher_temp_epochs: epochs of the linear teacher-temperature warmup.
        student_temp: student temperature.
        center_momentum: momentum of the teacher-output centre.
        clip_grad: clip each parameter's gradient norm to this (per tensor); 0 disables.
        freeze_last_layer: epochs during which the head's last layer gets no gradient.
        drop_path_rate: stochastic depth of the student ViT (timm ViTs only; the teacher has
            none). timm ViTs also get ``dynamic_img_size`` so local crops can be smaller, with
            DINO's position-embedding interpolation and [CLS] init (:mod:`dino_vit`).
        global_crops_scale: area range of the 2 global crops.
        local_crops_number: number of local crops (0 disables multi-crop).
        local_crops_scale: area range of the local crops.
        local_crop_size: side of local crops in px; ``None``: 96/224 of the datamodule's
            ``image_size`` (global crops use ``image_size``), a multiple of the ViT patch.
        color_jitter: (brightness, contrast, saturation, hue) of the colour jitter.
        color_jitter_prob: probability of colour jitter.
        grayscale_prob: probability of grayscale.
        blur_prob: Gaussian blur probability of (global 1, global 2, local crops).
        solarize_prob: solarisation probability of global crop 2.
        blur_sigma: range of the blur radius.
        hflip_prob: probability of a horizontal flip.
        backbone: backbone name (ViT-S/16 is timm's ``vit_small_patch16_224``).
        backbone_kwargs: backbone constructor arguments (``img_size``, ``patch_size``...).
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        optimizer: ``adamw`` (``sgd``/``lars`` for convnets).
        lr: learning rate per 256 images (linear scaling).
        lr_scaling: learning-rate scaling rule.
        weight_decay: weight decay at step 0 (not on biases and 1-D parameters).
        weight_decay_end: weight decay at the end of the cosine schedule; ``None``: constant.
        momentum: SGD/LARS momentum.
        betas: AdamW betas.
        warmup_epochs: linear learning-rate warmup, then cosine decay.
        min_lr: learning rate at the end of the cosine.
        lars_trust_coefficient: LARS eta.
        lars_trust_ratio: ``update``: eta ||w|| / ||g + wd w|| (DINO's ``utils.LARS``).
        lars_lr_in_momentum: False: momentum first, then the learning rate.
        exclude_bias_and_norm: no weight decay on biases and 1-D parameters (the official
            ``get_params_groups``).
        sync_batchnorm: convert BatchNorm (if any) to SyncBatchNorm on several devices.
    """

    linspace_warmup = True  # utils.cosine_scheduler warms up with np.linspace (iBOT's too)

    def __init__(
        self,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        momentum_teacher: float = 0.996,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        drop_path_rate: float = 0.1,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_number: int = 8,
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crop_size: int | None = None,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        hflip_prob: float = 0.5,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        optimizer: OptimizerName = "adamw",
        lr: float = 5e-4,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 0.04,
        weight_decay_end: float | None = 0.4,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 10.0,
        min_lr: float = 1e-6,
        lars_trust_coefficient: float = 1e-3,
        lars_trust_ratio: TrustRatio = "update",
        lars_lr_in_momentum: bool = False,
        exclude_bias_and_norm: bool = True,
        sync_batchnorm: bool = True,
    ) -> None:
        super().__init__(
            **init_arguments(
                SSLMethod,
                locals(),
                backbone_kwargs=vit_backbone_kwargs(backbone, backbone_kwargs, drop_path_rate),
            )
        )
        dino_vit_setup(self.backbone.model)
        self.head = self.build_head()
        self.teacher_backbone = disable_drop_path(frozen_copy(self.backbone))
        self.teacher_head = self.build_teacher_head()
        self.criterion = self.build_criterion()

    # ----------------------------------------------------------------- parts
    def build_head(self) -> nn.Module:
        """The student head."""
        hp = self.hparams
        return DINOHead(
            self.backbone.num_features,
            hp.out_dim,
            use_bn=hp.use_bn_in_head,
            norm_last_layer=hp.norm_last_layer,
            nlayers=hp.head_layers,
            hidden_dim=hp.hidden_dim,
            bottleneck_dim=hp.bottleneck_dim,
        )

    def build_teacher_head(self) -> nn.Module:
        """The teacher head, starting from the student's weights."""
        return frozen_copy(self.head)

    def build_criterion(self) -> nn.Module:
        hp = self.hparams
        return DINOLoss(hp.out_dim, hp.student_temp, hp.center_momentum)

    def last_layers(self) -> list[nn.Module]:
        """Layers whose gradients are dropped during the first ``freeze_last_layer`` epochs."""
        return [self.head.last_layer]

    # ----------------------------------------------------------------- contract
    @property
    def ema_base_momentum(self) -> float:
        return self.hparams.momentum_teacher

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    @property
    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone

    def local_crop_size(self, image_size: int) -> int:
        """Side of the local crops for global crops of ``image_size``."""
        size = self.hparams.local_crop_size
        return size or default_local_crop_size(image_size, patch_size_of(self.backbone))

    def multicrop_recipe(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> MultiCropRecipe:
        """The multi-crop recipe, shared by the PIL and the device views."""
        hp = self.hparams
        local_size = self.local_crop_size(image_size)
        vit = self.backbone.model
        if (
            hp.local_crops_number > 0
            and local_size != image_size
            and getattr(vit, "patch_embed", None) is not None
            and not getattr(vit, "dynamic_img_size", True)
        ):
            raise ValueError(
                f"local crops of {local_size} px need a ViT that accepts other sizes than "
                f"{image_size} px: set backbone_kwargs.dynamic_img_size: true"
            )
        return MultiCropRecipe(
            global_size=image_size,
            local_size=local_size,
            local_crops_number=hp.local_crops_number,
            global_crops_scale=tuple(hp.global_crops_scale),
            local_crops_scale=tuple(hp.local_crops_scale),
            color_jitter=tuple(hp.color_jitter),
            color_jitter_prob=hp.color_jitter_prob,
            grayscale_prob=hp.grayscale_prob,
            blur_prob=tuple(hp.blur_prob),
            solarize_prob=hp.solarize_prob,
            blur_sigma=tuple(hp.blur_sigma),
            hflip_prob=hp.hflip_prob,
            mean=tuple(mean),
            std=tuple(std),
        )

    def view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> ViewTransform:
        return multicrop_transform(self.multicrop_recipe(image_size, mean, std))

    def device_view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> nn.Module | None:
        return dino_views(self.multicrop_recipe(image_size, mean, std))

    # ----------------------------------------------------------------- schedules
    @property
    def epoch(self) -> int:
        """Epoch index from the optimizer step, for the per-epoch schedules (0 when no trainer
        is attached)."""
        if self._trainer is None:
            return 0
        return self.global_step // self.steps_per_epoch

    def teacher_temperature(self, epoch: int) -> float:
        hp = self.hparams
        return teacher_temp_at(
            epoch, hp.warmup_teacher_temp, hp.teacher_temp, hp.warmup_teacher_temp_epochs
        )

    # ----------------------------------------------------------------- step
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        views, labels = batch
        with torch.no_grad():
            teacher_features = forward_multicrop(self.teacher_backbone, views[:2])
            teacher_out = self.teacher_head(torch.cat(teacher_features)).chunk(2)
        student_out = self.head(torch.cat(forward_multicrop(self.backbone, views)))
        student_out = student_out.chunk(len(views))
        temp = self.teacher_temperature(self.epoch)
        loss = self.criterion(student_out, teacher_out, temp)
        self.log_scalar("train/teacher_temp", temp)
        # The probe watches the teacher's features: the teacher is what DINO evaluates.
        return self.training_outputs(loss, student_out[0], teacher_features[0], labels)

    # ----------------------------------------------------------------- gradients
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the last layer's gradients during the first ``freeze_last_layer`` epochs
        (``utils.cancel_gradients_last_layer``): AdamW then leaves it untouched."""
        if self.epoch < self.hparams.freeze_last_layer:
            for layer in self.last_layers():
                for p in layer.parameters():
                    p.grad = None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Per-parameter clipping at ``clip_grad`` (after AMP unscaling), then the trainer's
        own ``gradient_clip_val`` if one is set."""
        if self.hparams.clip_grad > 0:
            params = (p for group in optimizer.param_groups for p in group["params"])
            clip_gradients_per_parameter(params, self.hparams.clip_grad)
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
