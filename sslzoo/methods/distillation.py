"""Feature distillation from a frozen pretrained backbone into a student of any architecture
(lightly-train's ``distillationv2``, ``lightly_train/_methods/distillationv2``; the teacher sees
the student's images, as in Beyer et al., 2022, "Knowledge distillation: A good teacher is
patient and consistent")::

    T: frozen teacher (DINOv2 ViT-B/14), S: student backbone, P: Linear(dim_S, n * dim_T)
    for x in loader:                                  # one augmented view per image
        x = l * x + (1 - l) * x[randperm]             # mixup of the batch, l ~ U(0, 1)
        t = cat(last n blocks of T(x), normed)        # (B, n * dim_T, h, w) patch tokens
        s = resize(P(feature_map(S(x))), (h, w))      # bilinear, to the teacher's grid
        loss = mse(s, t)                              # no normalisation of either
        loss.backward(); clip total grad norm to 1; update(S, P)   # LARS

Released backbones have no heads, so the loss is on features. The teacher runs without
gradients (``inference_mode``), in bf16 on a GPU that has it; with fixed views and no mixup
its targets can be kept from the first epoch (``cache_teacher``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslzoo.augment.recipes import OneView
from sslzoo.backbones import Backbone, build_backbone
from sslzoo.errors import warn_user
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.feature_maps import feature_maps
from sslzoo.nn.input_cache import InputCache
from sslzoo.nn.teachers import frozen
from sslzoo.optim.settings import Optimization
from sslzoo.pretrained import load_backbone_weights

# distillationv2_transform.py: one view, crop area (0.14, 1), jitter (0.8, 0.8, 0.4, 0.2) at
# strength 0.5 with probability 0.8, grayscale 0.2, no solarisation; its blur (sigma in
# [0, 0.1] px, always) is a near no-op on 224 px images and is left out
VIEWS = OneView(
    crop_min_scale=0.14, color_jitter=(0.8, 0.8, 0.4, 0.2), color_jitter_strength=0.5,
    blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0),
)  # fmt: skip
# DistillationV2LARSArgs: LARS 1.5 per 256 images, momentum 0.9, wd 1e-6, trust coefficient
# 1e-3 in lightly's form (eta ||w|| / (||g|| + wd ||w||)); method.py: warmup 10 epochs, cosine
# to 0.001 x the peak (lightly's CosineWarmupScheduler)
OPTIM = Optimization(
    optimizer="lars", lr=1.5, weight_decay=1e-6, warmup_epochs=10.0, min_lr_ratio=0.001,
    lars_trust_ratio="larc",
)  # fmt: skip


class Distillation(SSLMethod):
    """Feature distillation with lightly-train's ``distillationv2`` defaults.

    The teacher is loaded when training starts from ``teacher_weights`` in any naming
    :mod:`sslzoo.pretrained` reads (DINOv2's hub file, DINOv3's, timm's, ``sslzoo export``'s,
    an sslzoo checkpoint) and saved with the run's checkpoints, so a resumed run does not
    depend on it. The student's features are evaluated (kNN, probes, export).

    Args:
        teacher: backbone name of the teacher (DINOv2 ViT-B/14 is timm's
            ``vit_base_patch14_dinov2``).
        teacher_kwargs: teacher constructor arguments for :func:`build_backbone`
            (``img_size`` the training images' size, ``cifar_stem``...).
        teacher_weights: the teacher's weights file; ``None`` leaves it random (tests only).
        n_teacher_blocks: the teacher's last blocks whose normed patch tokens are the target,
            concatenated along the channels.
        mixup: mix each batch with a shuffled copy of itself, one weight ~ U(0, 1) per batch.
        clip_grad: clip the total gradient norm to this; 0 disables.
        teacher_bf16: run the teacher in bf16 autocast on a GPU that supports it.
        cache_teacher: keep each image's teacher target in host memory and reuse it when the
            same input comes again (:class:`~sslzoo.nn.input_cache.InputCache`; exact): with
            ``views.fixed`` and ``mixup`` false the teacher runs in the first epoch only.
            Memory: ``n_teacher_blocks`` x the teacher's width x its patch grid floats per
            image (ViT-S/14 at 224 px: 768 KiB). Random views never repeat: a warning says so.
        views: one view: crop area (0.14, 1), flip, jitter at strength 0.5, grayscale 0.2;
            ``fixed``: resized and centre-cropped, nothing random.
        optim: LARS 1.5 per 256 images, weight decay 1e-6, warmup 10 epochs, cosine to 0.001
            x the peak.
        backbone: the student's backbone name (any architecture with a feature map:
            :func:`sslzoo.nn.feature_maps.feature_maps`).
        backbone_kwargs: student constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        zero_init_residual: zero-initialised last BN of each residual block (ResNets only).
        sync_batchnorm: synchronise the student's BatchNorm across devices.
        init_backbone: a weights file the student starts from: see :class:`SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the projection only.
    """

    # FSDP2: feature maps call the backbones' internals, not their forward
    fsdp_units = ("projection",)

    def __init__(
        self,
        teacher: str = "vit_base_patch14_dinov2",
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_weights: str | None = None,
        n_teacher_blocks: int = 2,
        mixup: bool = True,
        clip_grad: float = 1.0,
        teacher_bf16: bool = True,
        cache_teacher: bool = False,
        views: OneView = VIEWS,
        optim: Optimization = OPTIM,
        backbone: str = "resnet18",
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
        self.teacher: Backbone = frozen(build_backbone(teacher, **(teacher_kwargs or {})))
        self.teacher.eval()
        teacher_dim = n_teacher_blocks * self.teacher.num_features
        self.projection = nn.Linear(self.backbone.num_features, teacher_dim)
        nn.init.trunc_normal_(self.projection.weight, std=0.02)
        self.criterion = nn.MSELoss()
        if cache_teacher and mixup:
            raise ValueError("cache_teacher needs mixup=False: mixed images never come again")
        self.teacher_cache = InputCache() if cache_teacher else None

    def load_init_backbone(self) -> None:
        """The student's ``init_backbone`` and the teacher's ``teacher_weights``."""
        super().load_init_backbone()
        if self.hparams.teacher_weights is not None:
            load_backbone_weights(self.teacher.model, self.hparams.teacher_weights)

    def train(self, mode: bool = True) -> Distillation:
        """The teacher stays in evaluation mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Mixup of the batch with a random permutation of itself (drawn on the device)."""
        weight = torch.rand((), device=x.device)
        return weight * x + (1 - weight) * x[torch.randperm(len(x), device=x.device)]

    def teacher_target(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's last ``n_teacher_blocks`` normed patch-token maps, concatenated."""
        cuda = x.device.type == "cuda"
        bf16 = self.hparams.teacher_bf16 and cuda and torch.cuda.is_bf16_supported()
        with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            target = torch.cat(
                feature_maps(self.teacher.model, x, self.hparams.n_teacher_blocks), 1
            )
        # an inference tensor cannot be saved for the loss's backward: a plain copy can
        return target.float().clone()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x,), labels = batch
        if self.hparams.mixup:
            x = self.mix(x)
        cache = self.teacher_cache
        target = self.teacher_target(x) if cache is None else cache(self.teacher_target, x)
        fmap = feature_maps(self.backbone.model, x)[0]
        student = self.projection(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        student = F.interpolate(student, size=target.shape[-2:], mode="bilinear")
        loss = self.criterion(student, target)
        features = fmap.mean(dim=(2, 3))
        return self.training_outputs(loss, features, features, labels)

    def on_train_epoch_end(self) -> None:
        """Log the share of teacher targets taken from the cache; warn if none came again."""
        cache = self.teacher_cache
        if cache is None:
            return
        self.log_scalar("train/teacher_cache_hits", cache.hits / max(1, cache.hits + cache.misses))
        if self.current_epoch == 1 and cache.hits == 0:
            warn_user(
                "cache_teacher: no image came to the teacher twice in two epochs (random views?): "
                "the cache only grows; set --model.views.fixed true or cache_teacher false"
            )
        cache.reset_counts()

    def clip_method_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the total gradient norm at ``clip_grad``."""
        if self.hparams.clip_grad > 0:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.hparams.clip_grad)
