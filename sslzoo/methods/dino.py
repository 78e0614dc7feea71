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

iBOT subclasses it; the head, the loss with its centre, the clipping and the views recipe live
one floor down (:mod:`sslzoo.nn.heads`, :mod:`sslzoo.losses.distillation`,
:mod:`sslzoo.optim.clipping`, :mod:`sslzoo.augment.recipes`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslzoo.augment.recipes import GlobalLocalViews
from sslzoo.losses.distillation import SelfDistillationLoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import PrototypeHead
from sslzoo.nn.multicrop import forward_multicrop
from sslzoo.nn.teachers import frozen_copy
from sslzoo.nn.vit import dino_vit_setup, disable_drop_path, patch_size_of, vit_backbone_kwargs
from sslzoo.optim.clipping import clip_gradients_per_parameter
from sslzoo.optim.schedules import teacher_temp_at
from sslzoo.optim.settings import Optimization

# main_dino.py's DataAugmentationDINO with its default arguments
VIEWS = GlobalLocalViews()
# main_dino.py: AdamW 5e-4 per 256 images, wd 0.04 -> 0.4 (cosine), warmup 10 epochs, cosine
# to 1e-6; no decay on biases and 1-D parameters
OPTIM = Optimization(
    optimizer="adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, warmup_epochs=10.0,
    min_lr=1e-6,
)  # fmt: skip


def check_local_crops(backbone: nn.Module, views: GlobalLocalViews) -> None:
    """Refuse local crops smaller than the global crops for a ViT that takes one image size
    only (``dynamic_img_size`` off): its global crops are that size, its local crops would
    fail in the patch embedding at the first step."""
    vit = getattr(backbone, "model", backbone)
    embed = getattr(vit, "patch_embed", None)
    if views.local_crops_number == 0 or embed is None or getattr(vit, "dynamic_img_size", True):
        return
    size = int(embed.img_size[0])
    local = views.local_size(size)
    if local != size:
        raise ValueError(
            f"local crops of {local} px need a ViT that accepts other sizes than {size} px: "
            "set backbone_kwargs.dynamic_img_size: true"
        )


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
        backbone: backbone name (ViT-S/16 is timm's ``vit_small_patch16_224``).
        backbone_kwargs: backbone constructor arguments (``img_size``, ``patch_size``...).
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        sync_batchnorm: convert BatchNorm (if any) to SyncBatchNorm on several devices.
        zero_init_residual: zero-initialised last BN of each residual block (ResNets only).
        views: the official multi-crop (2 global crops at area (0.4, 1), 8 local crops of
            96 px per 224 at (0.05, 0.4), BYOL's colour steps, blur 1.0 / 0.1 / 0.5,
            solarisation 0.2 on the second global crop).
        optim: AdamW 5e-4 per 256 images, weight decay 0.04 rising to 0.4 on a cosine (not on
            biases and 1-D parameters), warmup 10 epochs, cosine to 1e-6.
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
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
        views: GlobalLocalViews = VIEWS,
        optim: Optimization = OPTIM,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool | None = None,
        sync_batchnorm: bool = True,
        init_backbone: str | None = None,
        freeze_backbone_steps: int = 0,
    ) -> None:
        kwargs = vit_backbone_kwargs(backbone, backbone_kwargs, drop_path_rate)
        super().__init__(
            backbone, kwargs, cifar_stem, zero_init_residual, sync_batchnorm, views, optim,
            init_backbone, freeze_backbone_steps,
        )  # fmt: skip
        if self.views.patch_size is None:  # local crops (and masks) align to the patches
            self.views = self.views.replace(patch_size=patch_size_of(self.backbone))
        check_local_crops(self.backbone, self.views)
        dino_vit_setup(self.backbone.model)
        self.head = self.build_head()
        self.teacher_backbone = disable_drop_path(frozen_copy(self.backbone))
        self.teacher_head = self.build_teacher_head()
        self.criterion = self.build_criterion()

    # ----------------------------------------------------------------- parts
    def build_head(self) -> nn.Module:
        """The student head."""
        hp = self.hparams
        return PrototypeHead(
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
        return SelfDistillationLoss(hp.out_dim, hp.student_temp, hp.center_momentum)

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
        super().on_before_optimizer_step(optimizer)
        if self.epoch < self.hparams.freeze_last_layer:
            for layer in self.last_layers():
                for p in layer.parameters():
                    p.grad = None

    def clip_method_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-parameter clipping at ``clip_grad``."""
        if self.hparams.clip_grad > 0:
            params = (p for group in optimizer.param_groups for p in group["params"])
            clip_gradients_per_parameter(params, self.hparams.clip_grad)
