"""DINOv2 (Oquab et al., 2024, "DINOv2: Learning Robust Visual Features without Supervision").

DINO's [CLS] self-distillation plus iBOT's masked-patch distillation and the KoLeo
regulariser (``dinov2/train/ssl_meta_arch.py``)::

    u, v = global crops; l_1..l_n = local crops
    m = masks of the batch's 2B global crops: half of them masked, ratios stratified in
        [0.1, 0.5] (``collate_data_and_cast``)
    t = gt(u, v)                                     # teacher: unmasked global crops
    s = gs(u, v with masked patches -> mask token)   # student: masked global crops
    T_cls = targets(head_t(t[CLS]))                  # centring or Sinkhorn-Knopp
    T_patch = targets(head'_t(t[masked patches]))    # head' = head unless separate_head
    L_dino = sum over (teacher crop iq, student crop v != iq) of H(T_cls[iq], head_s(s_v[CLS]))
             / (2 + max(2n, 1))                      # local crops: their [CLS] only
    L_ibot = mean over images of the mean over its masked patches of H(T_patch, head'_s(s))
    L_koleo = sum over u, v of KoLeo(s[CLS] of the crop's B images)   # backbone output
    loss = w_dino L_dino + w_koleo L_koleo + w_ibot L_ibot
    clip each of backbone, heads to norm 3; AdamW with layer-wise lr decay; EMA of gt
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from sslzoo.augment.masks import MaskGenerator, stratified_masks
from sslzoo.augment.recipes import GlobalLocalViews
from sslzoo.losses.distillation import (
    Centering,
    TeacherTargets,
    cross_view_loss,
    masked_tokens_loss,
)
from sslzoo.losses.koleo import koleo_loss
from sslzoo.methods.base import SSLMethod
from sslzoo.methods.dino import check_local_crops
from sslzoo.nn.heads import PrototypeHead
from sslzoo.nn.multicrop import forward_multicrop
from sslzoo.nn.teachers import frozen_copy
from sslzoo.nn.vit import (
    dino_pos_embed_setup,
    disable_drop_path,
    is_timm_vit,
    patch_size_of,
    uniform_drop_path,
    vit_backbone_kwargs,
    vit_tokens,
)
from sslzoo.optim.clipping import clip_grad_norm_per_part
from sslzoo.optim.layer_decay import layer_decay_groups
from sslzoo.optim.schedules import teacher_temp_at
from sslzoo.optim.settings import Optimization

# ssl_default_config.yaml's crops: global (0.32, 1), 8 local crops (0.05, 0.32), DINO's colours
VIEWS = GlobalLocalViews(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32))
# base_lr 0.004 per 1024 images with scaling_rule sqrt_wrt_1024: 0.004 / sqrt(1024) x sqrt(B)
OPTIM = Optimization(
    optimizer="adamw", lr=0.004 / 32, lr_scaling="sqrt", weight_decay=0.04,
    weight_decay_end=0.4, warmup_epochs=10.0, min_lr=1e-6,
)  # fmt: skip


class DINOv2(SSLMethod):
    """DINOv2 with the official (facebookresearch/dinov2 ``ssl_default_config.yaml``) defaults,
    on a timm ViT (ViT-S/14 ``vit_small_patch14_dinov2`` at ``img_size`` 224) whose blocks
    carry LayerScale and stochastic depth of the same rate in every block. Evaluation uses
    the teacher backbone. Known differences: timm's DropPath drops each sample with the rate
    (DINOv2 keeps exactly (1 - rate) of the batch per branch above rate 0.1); fp16 is the
    trainer's ``precision``. ``backbone_kwargs: {ffn_layer: swiglu}`` gives DINOv2's SwiGLU
    feed-forward layers (its ViT-L/14 and ViT-g/14 configs).

    Args:
        dino_loss_weight: weight of the [CLS] loss.
        koleo_loss_weight: weight of the KoLeo regulariser on the student's global-crop
            [CLS] outputs (each crop's batch on its own, each rank on its own).
        ibot_loss_weight: weight of the masked-patch loss.
        out_dim: prototypes of the DINO head (``head_n_prototypes``).
        hidden_dim: width of the DINO head's hidden layers.
        bottleneck_dim: bottleneck of the DINO head.
        head_layers: Linear layers of the DINO head's MLP.
        separate_head: patch tokens go through a head of their own (the ``ibot_*`` sizes);
            False: through the DINO head.
        ibot_out_dim: prototypes of the separate patch head.
        ibot_hidden_dim: width of the separate patch head's hidden layers.
        ibot_bottleneck_dim: bottleneck of the separate patch head.
        ibot_head_layers: Linear layers of the separate patch head's MLP.
        mask_sample_probability: fraction of the global crops that are masked.
        mask_ratio_min_max: range of the masked fraction, stratified over the masked crops.
        centering: teacher targets by ``centering`` (a running centre of momentum
            ``center_momentum``) or ``sinkhorn_knopp`` (3 iterations over every rank).
        center_momentum: momentum of both centres.
        student_temp: student temperature.
        momentum_teacher: base EMA momentum; rises to 1 on a cosine per step.
        warmup_teacher_temp: teacher temperature at step 0.
        teacher_temp: teacher temperature after the warmup (per step, linear).
        warmup_teacher_temp_epochs: epochs of the teacher-temperature warmup.
        official_epoch_length: optimizer steps per epoch of the schedules (warmups, last-layer
            freeze; ``OFFICIAL_EPOCH_LENGTH``); None: the data's epoch. The run's length is
            the trainer's ``max_steps``.
        clip_grad: clip the gradient norm of the backbone and of each head to this; 0: off.
        freeze_last_layer: epochs during which the heads' last layers have learning rate 0.
        layerwise_decay: layer-wise learning-rate decay of the backbone.
        patch_embed_lr_mult: extra learning-rate factor of the patch embedding.
        drop_path_rate: stochastic depth of every student block (the teacher has none).
        layerscale: initial LayerScale gamma (timm's ``init_values``); None: no LayerScale.
        num_register_tokens: register tokens after the [CLS] token (no position embedding).
        backbone: a timm ViT name.
        backbone_kwargs: backbone constructor arguments (``img_size``, ``patch_size``...).
        views: 2 global crops at (0.32, 1), 8 local crops of 96 px per 224 at (0.05, 0.32),
            rounded to the patch size, DINO's colour steps.
        optim: AdamW, 0.004 x sqrt(batch / 1024) (``lr`` 0.004 / 32 with ``sqrt`` scaling),
            weight decay 0.04 -> 0.4 on a cosine, warmup 10 epochs, cosine to 1e-6.
        init_backbone: a weights file the backbone (and its teacher) start from, e.g. a
            released DINOv2 backbone: see :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    linspace_warmup = True  # CosineScheduler warms up with np.linspace
    fsdp_units: tuple[str, ...] = ()  # ViT internals are called directly (as iBOT's)

    def __init__(
        self,
        dino_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        ibot_loss_weight: float = 1.0,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        separate_head: bool = False,
        ibot_out_dim: int = 65536,
        ibot_hidden_dim: int = 2048,
        ibot_bottleneck_dim: int = 256,
        ibot_head_layers: int = 3,
        mask_sample_probability: float = 0.5,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        centering: Centering = "centering",
        center_momentum: float = 0.9,
        student_temp: float = 0.1,
        momentum_teacher: float = 0.992,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        official_epoch_length: int | None = 1250,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        layerwise_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        drop_path_rate: float = 0.3,
        layerscale: float | None = 1e-5,
        num_register_tokens: int = 0,
        views: GlobalLocalViews = VIEWS,
        optim: Optimization = OPTIM,
        backbone: str = "vit_small_patch14_dinov2",
        backbone_kwargs: dict[str, Any] | None = None,
        init_backbone: str | None = None,
        freeze_backbone_steps: int = 0,
    ) -> None:
        if not is_timm_vit(backbone):
            raise ValueError(f"DINOv2 needs a timm VisionTransformer backbone, not {backbone!r}")
        kwargs = vit_backbone_kwargs(backbone, backbone_kwargs, drop_path_rate)
        kwargs.setdefault("img_size", 224)  # global_crops_size (timm's DINOv2 ViTs: 518)
        kwargs.setdefault("init_values", layerscale)
        kwargs.setdefault("reg_tokens", num_register_tokens)
        super().__init__(
            backbone, kwargs, views=views, optim=optim, init_backbone=init_backbone,
            freeze_backbone_steps=freeze_backbone_steps,
        )  # fmt: skip
        if self.views.patch_size is None:  # local crops align to the patches
            self.views = self.views.replace(patch_size=patch_size_of(self.backbone))
        check_local_crops(self.backbone, self.views)
        vit = self.backbone.model
        dino_pos_embed_setup(vit)  # [CLS] with a position embedding, registers without
        uniform_drop_path(vit, kwargs["drop_path_rate"])
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))
        self.head = PrototypeHead(vit.embed_dim, out_dim, norm_last_layer=False,
                                  nlayers=head_layers, hidden_dim=hidden_dim,
                                  bottleneck_dim=bottleneck_dim)  # fmt: skip
        self.ibot_head = (
            PrototypeHead(vit.embed_dim, ibot_out_dim, norm_last_layer=False,
                          nlayers=ibot_head_layers, hidden_dim=ibot_hidden_dim,
                          bottleneck_dim=ibot_bottleneck_dim)
            if separate_head else None
        )  # fmt: skip
        self.teacher_backbone = disable_drop_path(frozen_copy(self.backbone))
        self.teacher_head = frozen_copy(self.head)
        self.teacher_ibot_head = frozen_copy(self.ibot_head) if separate_head else None
        patch_dim = ibot_out_dim if separate_head else out_dim
        self.cls_targets = TeacherTargets(out_dim, centering, center_momentum)
        self.patch_targets = TeacherTargets(patch_dim, centering, center_momentum)
        self.mask_generator = MaskGenerator(min_block_patches=4, max_block_fraction=0.5)

    # ----------------------------------------------------------------- contract
    @property
    def ema_base_momentum(self) -> float:
        return self.hparams.momentum_teacher

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]
        if self.ibot_head is not None:
            pairs.append((self.ibot_head, self.teacher_ibot_head))
        return pairs

    @property
    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone

    def student_parts(self) -> list[list[nn.Parameter]]:
        """The parameters of each student module, clipped and grouped on their own: the
        backbone (with the mask token) and each head."""
        parts = [[*self.backbone.parameters(), self.mask_token], [*self.head.parameters()]]
        return parts + ([[*self.ibot_head.parameters()]] if self.ibot_head is not None else [])

    def parameter_groups(self) -> list[dict[str, Any]]:
        """``get_params_groups_with_decay`` per student module: layer-wise decay in the
        backbone, scale 1 in the heads, whose last layers are marked ``last_layer``."""
        hp, wd = self.hparams, self.optim.weight_decay
        stem = [("mask_token", self.mask_token)]
        groups = layer_decay_groups(self.backbone.model, wd, hp.layerwise_decay,
                                    hp.patch_embed_lr_mult, stem, "backbone_")  # fmt: skip
        for name in ("head", "ibot_head"):
            if getattr(self, name) is not None:
                groups += layer_decay_groups(getattr(self, name), wd, 1.0, prefix=f"{name}_")
        return groups

    # ----------------------------------------------------------------- schedules
    @property
    def steps_per_epoch(self) -> int:
        return self.hparams.official_epoch_length or super().steps_per_epoch

    @property
    def freeze_steps(self) -> int:
        return self.hparams.freeze_last_layer * self.steps_per_epoch

    def teacher_temperature(self, step: int) -> float:
        """np.linspace warmup per step over ``warmup_teacher_temp_epochs``, then constant."""
        hp = self.hparams
        warmup = hp.warmup_teacher_temp_epochs * self.steps_per_epoch
        return teacher_temp_at(step, hp.warmup_teacher_temp, hp.teacher_temp, warmup)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The schedules, then learning rate 0 for the last layers during the freeze."""
        super().on_train_batch_start(batch, batch_idx)
        if self.global_step < self.freeze_steps:
            for g in self.optimizers(use_pl_optimizer=False).param_groups:
                if g.get("last_layer"):
                    g["lr"] = 0.0

    def clip_method_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """``clip_grad_norm_`` of each student module on its own."""
        if self.hparams.clip_grad > 0:
            clip_grad_norm_per_part(self.student_parts(), self.hparams.clip_grad)

    # ----------------------------------------------------------------- step
    def draw_masks(self, global_views: torch.Tensor) -> torch.Tensor:
        """Masks (2B, N) of the global crops, drawn on the host from torch's CPU generator
        (seeded per batch), copied to the device without waiting for it."""
        grid = tuple(s // self.views.patch_size for s in global_views.shape[-2:])
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))
        hp = self.hparams
        masks = stratified_masks(len(global_views), grid, tuple(hp.mask_ratio_min_max),
                                 hp.mask_sample_probability, self.mask_generator, rng)  # fmt: skip
        return masks.to(global_views.device, non_blocking=True)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        views, labels = batch
        hp, n_local = self.hparams, len(views) - 2
        global_views = torch.cat(views[:2])
        masks = self.draw_masks(global_views)
        prefix = self.backbone.model.num_prefix_tokens
        patch_head = self.head if self.ibot_head is None else self.ibot_head
        t_patch_head = self.teacher_head if self.ibot_head is None else self.teacher_ibot_head
        temp = self.teacher_temperature(self.global_step)
        with torch.no_grad():
            t_tokens = vit_tokens(self.teacher_backbone.model, global_views)
            t_cls = self.teacher_head(t_tokens[:, 0])
            t_patch = t_patch_head(t_tokens[:, prefix:][masks])
            cls_targets = self.cls_targets(t_cls, temp).chunk(2)
            patch_targets = self.patch_targets(t_patch, temp)
        s_tokens = vit_tokens(self.backbone.model, global_views, masks, self.mask_token)
        s_cls = s_tokens[:, 0]
        student_cls = list(self.head(s_cls).chunk(2))
        if n_local:
            local_cls = lambda x: vit_tokens(self.backbone.model, x)[:, 0]  # noqa: E731
            local = torch.cat(forward_multicrop(local_cls, views[2:]))
            student_cls += list(self.head(local).chunk(n_local))
        pairs = 2 * (len(views) - 1)
        loss_dino = cross_view_loss(student_cls, cls_targets, hp.student_temp) * pairs
        loss_dino = loss_dino / (2 + max(2 * n_local, 1))
        loss_koleo = sum(koleo_loss(c) for c in s_cls.chunk(2))
        s_patch = patch_head(s_tokens[:, prefix:][masks])
        loss_ibot = masked_tokens_loss(s_patch, patch_targets, masks, hp.student_temp)
        loss = (
            hp.dino_loss_weight * loss_dino
            + hp.koleo_loss_weight * loss_koleo
            + hp.ibot_loss_weight * loss_ibot
        )
        self.log_dict({"train/loss_dino": loss_dino, "train/loss_koleo": loss_koleo,
                       "train/loss_ibot": loss_ibot,
                       "train/mask_ratio": masks.float().mean()})  # fmt: skip
        self.log_scalar("train/teacher_temp", temp)
        features = t_tokens[: len(labels), 0]
        return self.training_outputs(loss, student_cls[0], features, labels)
