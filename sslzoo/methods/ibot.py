"""iBOT (Zhou et al., 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer").

DINO's self-distillation on the [CLS] token plus masked image modelling on the patch tokens,
with the teacher as the online tokenizer::

    u, v = global crops; m_u, m_v = block masks (about 30% of each crop's patches by default;
                                   the README's pred_ratio (0, 0.3) leaves half the images unmasked)
    s_u = gs(u with masked patches -> e_mask), s_v = gs(v with masked patches -> e_mask)
    t_u, t_v = gt(u), gt(v)                      # the teacher sees unmasked crops
    s_l = [gs(local) for local in local crops]   # [CLS] only, never masked
    L_cls = DINO loss over (teacher global iq, student view j != iq), with centre C
    L_mim = for q in (u, v): mean over images of
              mean over masked patches i of H(t_q[i], s_q[i]), with centre C2
    loss = lambda1 * L_cls + lambda2 * L_mim
    EMA update of gt (backbone + head), centres updated after the loss

Masks are drawn in the view transform (the dataloader workers), one per global crop, as in the
official ``ImageFolderMask``; ``pred_start_epoch`` is applied in ``training_step`` by emptying
the masks of earlier epochs, which is what a prediction ratio of 0 yields officially.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslzoo.augment.recipes import MaskedGlobalLocalViews
from sslzoo.losses.distillation import MaskedSelfDistillationLoss
from sslzoo.methods.dino import DINO
from sslzoo.methods.dino import OPTIM as DINO_OPTIM
from sslzoo.nn.heads import PatchPrototypeHead
from sslzoo.nn.multicrop import forward_multicrop
from sslzoo.nn.vit import is_timm_vit, vit_tokens
from sslzoo.optim.schedules import teacher_temp_at
from sslzoo.optim.settings import Optimization

# main_ibot.py's defaults: 2 global crops at (0.14, 1), no local crops, block masks of ratio 0.3
VIEWS = MaskedGlobalLocalViews(
    global_crops_scale=(0.14, 1.0), local_crops_number=0, pred_ratio=(0.3,), pred_ratio_var=(0.0,)
)
OPTIM = DINO_OPTIM  # main_ibot.py's optimisation arguments are main_dino.py's


def head_pairs(
    student: PatchPrototypeHead, teacher: PatchPrototypeHead
) -> list[tuple[nn.Module, nn.Module]]:
    """Matching (student, teacher) parts of two heads whose sharing may differ, for the EMA
    update: the teacher's [CLS] layer follows the student's, and the teacher's own patch
    layer, if it has one, follows the student's patch layer."""
    pairs = [(student.mlp, teacher.mlp), (student.last_layer, teacher.last_layer)]
    if teacher.last_layer2 is not None:
        pairs.append((student.patch_layer, teacher.last_layer2))
    return pairs


def head_init_pairs(
    student: PatchPrototypeHead, teacher: PatchPrototypeHead
) -> list[tuple[nn.Module, nn.Module]]:
    """The (student, teacher) parts whose weights the teacher head starts from.

    main_ibot.py loads the student's state dict into the teacher by name (``strict=False``).
    A head that shares its last layer registers it twice, ``last_layer`` then
    ``last_layer2``, so in a sharing teacher the student's ``last_layer2`` is loaded last:
    the shared layer starts from the student's patch layer, not its [CLS] layer."""
    pairs = [(student.mlp, teacher.mlp), (student.patch_layer, teacher.patch_layer)]
    if teacher.last_layer2 is not None:
        pairs.append((student.last_layer, teacher.last_layer))
    return pairs


class IBOT(DINO):
    """iBOT with the official (bytedance/ibot ``main_ibot.py``) defaults.

    The released ViT-S/16 recipe (README) sets ``teacher_temp`` 0.07, ``norm_last_layer``
    False, ``shared_head`` True, 10 local crops at (0.05, 0.25), global crops (0.25, 1),
    ``pred_ratio`` (0, 0.3) and ``pred_ratio_var`` (0, 0.2); see ``configs/imagenet/ibot.yaml``.
    Needs a timm ViT backbone. Evaluation uses the teacher backbone.

    Fixed at the official defaults: 2 global crops (``--global_crops_number``), GELU and no
    norm in the head (``--act_in_head``, ``--norm_in_head``). As in main_ibot.py, a teacher
    that shares its head (the default) starts its one last layer from the student's patch
    layer and then follows the student's [CLS] layer by EMA. One deliberate difference: with
    ``shared_head`` and not ``shared_head_teacher``, the teacher's patch last layer follows the
    student's shared last layer by EMA; main_ibot.py updates only parameters whose names match,
    so there it keeps its initial weights.

    Args:
        patch_out_dim: patch head output dimension (must equal ``out_dim`` when the student or
            the teacher shares its head).
        shared_head: the student's patch tokens use the [CLS] last layer.
        shared_head_teacher: the teacher's patch tokens use the [CLS] last layer.
        warmup_teacher_patch_temp: patch teacher temperature at the start.
        teacher_patch_temp: patch teacher temperature after its warmup.
        center_momentum2: momentum of the patch centre ``center2``.
        use_masked_im_modeling: give the student masked crops (False: the student sees
            unmasked crops; the patch loss still uses the masked positions).
        pred_start_epoch: epoch from which images are masked; the patch temperature warmup
            starts there too.
        lambda1: weight of the [CLS] self-distillation loss.
        lambda2: weight of the masked-patch loss.
        out_dim: [CLS] head output dimension.
        hidden_dim: width of the head's hidden layers.
        bottleneck_dim: dimension of the L2-normalised bottleneck.
        head_layers: Linear layers of the head MLP before the last layers.
        norm_last_layer: freeze the last layers' weight-norm magnitudes at 1.
        momentum_teacher: base EMA momentum of the teacher; rises to 1 on a cosine per step.
        warmup_teacher_temp: [CLS] teacher temperature at epoch 0.
        teacher_temp: [CLS] teacher temperature after the warmup.
        warmup_teacher_temp_epochs: epochs of both teacher-temperature warmups.
        student_temp: student temperature.
        center_momentum: momentum of the [CLS] centre ``center``.
        clip_grad: clip each parameter's gradient norm to this (per tensor); 0 disables.
        freeze_last_layer: epochs during which the head's last layers get no gradient.
        drop_path_rate: stochastic depth of the student ViT (the teacher has none).
        backbone: a timm ViT name (ViT-S/16 is ``vit_small_patch16_224``).
        backbone_kwargs: backbone constructor arguments (``img_size``, ``patch_size``...).
        views: the official views: 2 global crops at area (0.14, 1), no local crops, one
            block mask per global crop of ratio 0.3 (``pred_ratio``, ``pred_ratio_var``,
            ``pred_shape``, ``pred_aspect_ratio``: main_ibot.py's masking arguments).
        optim: as DINO's (AdamW 5e-4 per 256 images, wd 0.04 -> 0.4, warmup 10 epochs).
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    # FSDP2: the ViT internals are called directly, not the backbone's forward, so backbones
    # and heads are not units of their own (their blocks are); see sslzoo.sharding.shard_method
    fsdp_units: tuple[str, ...] = ()

    def __init__(
        self,
        patch_out_dim: int = 8192,
        shared_head: bool = False,
        shared_head_teacher: bool = True,
        warmup_teacher_patch_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        center_momentum2: float = 0.9,
        use_masked_im_modeling: bool = True,
        pred_start_epoch: int = 0,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        momentum_teacher: float = 0.996,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        drop_path_rate: float = 0.1,
        views: MaskedGlobalLocalViews = VIEWS,
        optim: Optimization = OPTIM,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        init_backbone: str | None = None,
        freeze_backbone_steps: int = 0,
    ) -> None:
        if not is_timm_vit(backbone):
            raise ValueError(f"iBOT needs a timm VisionTransformer backbone, not {backbone!r}")
        if (shared_head or shared_head_teacher) and patch_out_dim != out_dim:
            raise ValueError(
                "a shared head gives patch tokens the [CLS] last layer: set patch_out_dim "
                f"= out_dim ({out_dim}) or shared_head and shared_head_teacher to false"
            )
        super().__init__(
            out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
            head_layers=head_layers, norm_last_layer=norm_last_layer,
            momentum_teacher=momentum_teacher, warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp, warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            student_temp=student_temp, center_momentum=center_momentum, clip_grad=clip_grad,
            freeze_last_layer=freeze_last_layer, drop_path_rate=drop_path_rate, views=views,
            optim=optim, backbone=backbone, backbone_kwargs=backbone_kwargs,
            init_backbone=init_backbone, freeze_backbone_steps=freeze_backbone_steps,
        )  # fmt: skip
        # only with masked image modelling: a parameter without gradient stops DDP
        self.masked_embed = (
            nn.Parameter(torch.zeros(1, self.backbone.num_features))
            if use_masked_im_modeling
            else None
        )

    # ----------------------------------------------------------------- parts
    def _ibot_head(self, shared_head: bool) -> PatchPrototypeHead:
        hp = self.hparams
        return PatchPrototypeHead(
            self.backbone.num_features, hp.out_dim, hp.patch_out_dim, shared_head=shared_head,
            norm_last_layer=hp.norm_last_layer, nlayers=hp.head_layers,
            hidden_dim=hp.hidden_dim, bottleneck_dim=hp.bottleneck_dim,
        )  # fmt: skip

    def build_head(self) -> nn.Module:
        return self._ibot_head(self.hparams.shared_head)

    def build_teacher_head(self) -> nn.Module:
        teacher = self._ibot_head(self.hparams.shared_head_teacher)
        for student_part, teacher_part in head_init_pairs(self.head, teacher):
            teacher_part.load_state_dict(student_part.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        return teacher

    def build_criterion(self) -> nn.Module:
        hp = self.hparams
        return MaskedSelfDistillationLoss(
            hp.out_dim, hp.patch_out_dim, hp.student_temp, hp.center_momentum,
            hp.center_momentum2, hp.lambda1, hp.lambda2,
        )  # fmt: skip

    def last_layers(self) -> list[nn.Module]:
        return [m for m in (self.head.last_layer, self.head.last_layer2) if m is not None]

    # ----------------------------------------------------------------- contract
    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), *head_pairs(self.head, self.teacher_head)]

    def teacher_patch_temperature(self, epoch: int) -> float:
        """The patch temperature warmup, delayed to start at ``pred_start_epoch``."""
        hp = self.hparams
        if epoch < hp.pred_start_epoch:
            return hp.warmup_teacher_patch_temp
        return teacher_temp_at(
            epoch - hp.pred_start_epoch,
            hp.warmup_teacher_patch_temp,
            hp.teacher_patch_temp,
            hp.warmup_teacher_temp_epochs,
        )

    # ----------------------------------------------------------------- step
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        crops, labels = batch
        views, masks = crops["views"], crops["masks"][:2]
        epoch = self.epoch
        if epoch < self.hparams.pred_start_epoch:
            masks = [torch.zeros_like(m) for m in masks]
        prefix = self.backbone.model.num_prefix_tokens
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_tokens = vit_tokens(self.teacher_backbone.model, global_views)
            teacher_cls, teacher_patch = self.teacher_head.forward_tokens(teacher_tokens, prefix)
        student_mask = torch.cat(masks) if self.hparams.use_masked_im_modeling else None
        student_tokens = vit_tokens(
            self.backbone.model, global_views, student_mask, self.masked_embed
        )
        student_cls, student_patch = self.head.forward_tokens(student_tokens, prefix)
        student_cls = list(student_cls.chunk(2))
        if len(views) > 2:
            local_features = torch.cat(forward_multicrop(self.backbone, views[2:]))
            student_cls += list(self.head(local_features).chunk(len(views) - 2))
        temp, patch_temp = self.teacher_temperature(epoch), self.teacher_patch_temperature(epoch)
        loss_cls, loss_patch = self.criterion(
            student_cls,
            teacher_cls.chunk(2),
            student_patch.chunk(2),
            teacher_patch.chunk(2),
            masks,
            temp,
            patch_temp,
        )
        self.log_dict(
            {
                "train/loss_cls": loss_cls,
                "train/loss_patch": loss_patch,
                "train/mask_ratio": torch.cat(masks).float().mean(),
            }
        )
        self.log_scalar("train/teacher_temp", temp)
        self.log_scalar("train/teacher_patch_temp", patch_temp)
        features = teacher_tokens[: len(labels), 0]
        return self.training_outputs(loss_cls + loss_patch, student_cls[0], features, labels)
