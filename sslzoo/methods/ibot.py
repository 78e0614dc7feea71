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

import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sslzoo.augment.views import DeviceViews, ViewRecipe
from sslzoo.methods.base import LRScaling, ViewTransform, forward_multicrop, init_arguments
from sslzoo.methods.dino import (
    DINO,
    DINOHead,
    cross_view_loss,
    global_batch_mean,
    is_timm_vit,
    patch_size_of,
    teacher_probs,
    teacher_temp_at,
    update_center,
    weight_normed_linear,
)
from sslzoo.optim.lars import TrustRatio
from sslzoo.optim.optimizers import OptimizerName

PredShape = Literal["block", "rand"]

# ------------------------------------------------------------------------------------- head


class IBOTHead(DINOHead):
    """iBOT's head (``models/head.py`` ``iBOTHead``): one MLP for [CLS] and patch tokens; the
    [CLS] token goes through ``last_layer`` (``out_dim``), patch tokens through their own
    weight-normalised ``last_layer2`` (``patch_out_dim``) or, with ``shared_head``, through
    ``last_layer`` too."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        shared_head: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__(
            in_dim,
            out_dim,
            use_bn=False,
            norm_last_layer=norm_last_layer,
            nlayers=nlayers,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
        )
        self.last_layer2 = (
            None
            if shared_head
            else weight_normed_linear(bottleneck_dim, patch_out_dim, norm_last_layer)
        )

    @property
    def patch_layer(self) -> nn.Module:
        """The last layer applied to patch tokens."""
        return self.last_layer if self.last_layer2 is None else self.last_layer2

    def forward_tokens(
        self, tokens: torch.Tensor, num_prefix_tokens: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, prefix + N, D) ViT tokens -> ([CLS] output (B, K), patch outputs (B, N, K2))."""
        z = self.project(tokens)
        return self.last_layer(z[:, 0]), self.patch_layer(z[:, num_prefix_tokens:])


def head_pairs(student: IBOTHead, teacher: IBOTHead) -> list[tuple[nn.Module, nn.Module]]:
    """Matching (student, teacher) parts of two heads whose sharing may differ, for the EMA
    update: the teacher's [CLS] layer follows the student's, and the teacher's own patch
    layer, if it has one, follows the student's patch layer."""
    pairs = [(student.mlp, teacher.mlp), (student.last_layer, teacher.last_layer)]
    if teacher.last_layer2 is not None:
        pairs.append((student.patch_layer, teacher.last_layer2))
    return pairs


def head_init_pairs(student: IBOTHead, teacher: IBOTHead) -> list[tuple[nn.Module, nn.Module]]:
    """The (student, teacher) parts whose weights the teacher head starts from.

    main_ibot.py loads the student's state dict into the teacher by name (``strict=False``).
    A head that shares its last layer registers it twice, ``last_layer`` then
    ``last_layer2``, so in a sharing teacher the student's ``last_layer2`` is loaded last:
    the shared layer starts from the student's patch layer, not its [CLS] layer."""
    pairs = [(student.mlp, teacher.mlp), (student.patch_layer, teacher.patch_layer)]
    if teacher.last_layer2 is not None:
        pairs.append((student.last_layer, teacher.last_layer))
    return pairs


# ------------------------------------------------------------------------------------- loss


def masked_patch_loss(
    student_patch: torch.Tensor,
    teacher_targets: torch.Tensor,
    mask: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """Cross-entropy between teacher targets and student patch outputs (B, N, K) of the same
    view, on masked positions only: averaged per image over its masked tokens (an unmasked
    image contributes 0), then over all images."""
    log_p = F.log_softmax(student_patch.float() / student_temp, dim=-1)
    ce = torch.sum(-teacher_targets * log_p, dim=-1)
    m = mask.flatten(1).to(ce.dtype)
    return (torch.sum(ce * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()


class IBOTLoss(nn.Module):
    """iBOT's loss (``main_ibot.py`` ``iBOTLoss``); it owns both centres.

    ``center`` (CLS, shape (1, K)) and ``center2`` (patches, shape (1, 1, K2)) are buffers,
    updated after each call from the teacher outputs (patches: each image's mean over all its
    patch tokens), averaged over the global batch.

    Args:
        out_dim: [CLS] output dimension K.
        patch_out_dim: patch output dimension K2.
        student_temp: student temperature of both terms.
        center_momentum: momentum of ``center``.
        center_momentum2: momentum of ``center2``.
        lambda1: weight of the [CLS] term.
        lambda2: weight of the masked-patch term.
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))

    def forward(
        self,
        student_cls: Sequence[torch.Tensor],
        teacher_cls: Sequence[torch.Tensor],
        student_patch: Sequence[torch.Tensor],
        teacher_patch: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        teacher_temp: float,
        teacher_patch_temp: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the weighted ([CLS] loss, patch loss).

        ``student_cls``: per view (globals first), (B, K); ``teacher_cls``: per global view;
        ``student_patch``/``teacher_patch``: per global view, (B, N, K2); ``masks``: per
        global view, (B, H, W) or (B, N), True where the student's patch was masked.
        """
        cls_targets = [teacher_probs(t, self.center, teacher_temp) for t in teacher_cls]
        loss_cls = cross_view_loss(student_cls, cls_targets, self.student_temp)
        loss_patch = sum(
            masked_patch_loss(
                s, teacher_probs(t, self.center2, teacher_patch_temp), m, self.student_temp
            )
            for s, t, m in zip(student_patch, teacher_patch, masks, strict=True)
        ) / len(teacher_patch)
        update_center(
            self.center, global_batch_mean(torch.cat(list(teacher_cls))), self.center_momentum
        )
        patch_means = torch.cat([t.float().mean(dim=1) for t in teacher_patch])
        update_center(self.center2, global_batch_mean(patch_means)[None], self.center_momentum2)
        return self.lambda1 * loss_cls, self.lambda2 * loss_patch


# ---------------------------------------------------------------------------------- masking


class IBOTMaskGenerator:
    """Per-image patch masks as in iBOT's ``loader.py`` ``ImageFolderMask``.

    Each call draws a prediction ratio: for every (``pred_ratio[i]``, ``pred_ratio_var[i]``) a
    value uniform in ratio +- var (or the ratio itself when var is 0), then one of them at
    random; ``(0, 0.3)`` with ``(0, 0.2)`` leaves half of the images unmasked and masks the
    rest 0.3 +- 0.2. ``block``: BEiT's block masking (rectangles of area at least
    ``(min(H, W) // 3) ** 2`` and aspect ratio log-uniform in ``pred_aspect_ratio``, added until
    the target is reached or nothing fits); ``rand``: exactly ``int(ratio * H * W)`` patches.
    Draws from Python's generator (seeded per item by the training loader) or a given one.
    """

    def __init__(
        self,
        pred_ratio: float | Sequence[float] = 0.3,
        pred_ratio_var: float | Sequence[float] = 0.0,
        pred_shape: PredShape = "block",
        pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    ) -> None:
        ratios = [float(r) for r in np.atleast_1d(pred_ratio)]
        variances = [float(v) for v in np.atleast_1d(pred_ratio_var)]
        if len(variances) == 1:
            variances *= len(ratios)
        if len(variances) != len(ratios):
            raise ValueError("pred_ratio_var needs one value or one per pred_ratio")
        if any(r < v for r, v in zip(ratios, variances, strict=True)):
            raise ValueError("each pred_ratio must be >= its pred_ratio_var")
        if pred_shape not in ("block", "rand"):
            raise ValueError(f"pred_shape must be 'block' or 'rand', not {pred_shape!r}")
        self.ratios, self.variances = ratios, variances
        self.pred_shape = pred_shape
        self.log_aspect_ratio = tuple(math.log(a) for a in pred_aspect_ratio)

    def sample_ratio(self, rng: random.Random | None = None) -> float:
        rng = rng or random
        choices = [
            rng.uniform(r - v, r + v) if v > 0 else r
            for r, v in zip(self.ratios, self.variances, strict=True)
        ]
        return rng.choice(choices)

    def __call__(self, height: int, width: int, rng: random.Random | None = None) -> torch.Tensor:
        """A boolean (height, width) mask, True where the patch is masked; draws from ``rng``
        (Python's global generator by default)."""
        rng = rng or random
        high = self.sample_ratio(rng) * height * width
        if self.pred_shape == "rand":
            mask = np.zeros(height * width, dtype=bool)
            mask[rng.sample(range(height * width), int(high))] = True
            return torch.from_numpy(mask.reshape(height, width))
        return torch.from_numpy(self._block_mask(height, width, high, rng))

    def _block_mask(self, height: int, width: int, high: float, rng: Any) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        mask_count = 0
        while mask_count < high:
            max_mask_patches = high - mask_count
            delta = 0
            for _ in range(10):
                low = (min(height, width) // 3) ** 2
                target_area = rng.uniform(low, max_mask_patches)
                aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < width and h < height:
                    top = rng.randint(0, height - h)
                    left = rng.randint(0, width - w)
                    block = mask[top : top + h, left : left + w]
                    num_new = h * w - int(block.sum())
                    if 0 < num_new <= max_mask_patches:
                        block[...] = True
                        delta += num_new
                if delta > 0:
                    break
            if delta == 0:
                break
            mask_count += delta
        return mask


class MultiCropWithMasks:
    """Multi-crop views plus one mask per global crop: ``{"views": [...], "masks": [...]}``;
    the datamodule collates both per position."""

    def __init__(
        self,
        crops: ViewTransform,
        grid: tuple[int, int],
        generator: IBOTMaskGenerator,
        num_masks: int = 2,
    ) -> None:
        self.crops = crops
        self.grid = grid
        self.generator = generator
        self.num_masks = num_masks

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        masks = [self.generator(*self.grid) for _ in range(self.num_masks)]
        return {"views": self.crops(image), "masks": masks}


class MaskedDeviceViews(nn.Module):
    """The device path of :class:`MultiCropWithMasks`: multi-crop views made on the device,
    plus one mask per global crop and image. The masks are drawn on the host (BEiT's rejection
    loop does not batch) from a seed taken from torch's CPU generator, which the method seeds
    per batch, and copied to the device without waiting for it."""

    def __init__(
        self,
        views: DeviceViews,
        grid: tuple[int, int],
        generator: IBOTMaskGenerator,
        num_masks: int = 2,
    ) -> None:
        super().__init__()
        self.views = views
        self.grid = grid
        self.generator = generator
        self.num_masks = num_masks

    @property
    def recipes(self) -> list[ViewRecipe]:
        return self.views.recipes

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        first = images if isinstance(images, torch.Tensor) else images[0]
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))  # a CPU draw: no device sync
        masks = torch.stack(
            [torch.stack([self.generator(*self.grid, rng) for _ in range(self.num_masks)])
             for _ in range(first.shape[0])]
        )  # fmt: skip
        if first.device.type == "cuda":
            masks = masks.pin_memory()
        masks = masks.to(first.device, non_blocking=True)
        return {"views": self.views(images), "masks": list(masks.unbind(1))}


# ----------------------------------------------------------------------------- ViT forward


def embed_patches(
    vit: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    masked_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embeddings of a timm ViT, (B, H, W, D) or (B, N, D), with masked positions
    replaced by ``masked_embed`` (iBOT's ``mask_model``, before the position embedding)."""
    x = vit.patch_embed(images)
    if mask is not None:
        m = mask.reshape(x.shape[:-1]).unsqueeze(-1)
        x = torch.where(m, masked_embed.to(x.dtype), x)
    return x


def vit_tokens(
    vit: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    masked_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every output token (B, prefix + N, D) of a timm ``VisionTransformer`` after its final
    norm: timm's ``forward_features`` with the mask token inserted after patch embedding."""
    x = embed_patches(vit, images, mask, masked_embed)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


# ----------------------------------------------------------------------------------- method


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
        pred_ratio: masking ratio(s); one is picked per image (0 in the list: unmasked images).
        pred_ratio_var: half-width of the uniform ratio range, one per ``pred_ratio``.
        pred_shape: ``block`` (BEiT block masking) or ``rand`` (random patches).
        pred_aspect_ratio: aspect-ratio range of the mask blocks.
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
        global_crops_scale: area range of the 2 global crops.
        local_crops_number: number of local crops (0 disables multi-crop).
        local_crops_scale: area range of the local crops.
        local_crop_size: side of local crops in px; ``None``: 96/224 of the datamodule's
            ``image_size``, a multiple of the patch size.
        color_jitter: (brightness, contrast, saturation, hue) of the colour jitter.
        color_jitter_prob: probability of colour jitter.
        grayscale_prob: probability of grayscale.
        blur_prob: Gaussian blur probability of (global 1, global 2, local crops).
        solarize_prob: solarisation probability of global crop 2.
        blur_sigma: range of the blur radius.
        hflip_prob: probability of a horizontal flip.
        backbone: a timm ViT name (ViT-S/16 is ``vit_small_patch16_224``).
        backbone_kwargs: backbone constructor arguments (``img_size``, ``patch_size``...).
        optimizer: ``adamw`` (``sgd``/``lars`` also possible).
        lr: learning rate per 256 images (linear scaling).
        lr_scaling: learning-rate scaling rule.
        weight_decay: weight decay at step 0 (not on biases and 1-D parameters).
        weight_decay_end: weight decay at the end of the cosine schedule; ``None``: constant.
        momentum: SGD/LARS momentum.
        betas: AdamW betas.
        warmup_epochs: linear learning-rate warmup, then cosine decay.
        min_lr: learning rate at the end of the cosine.
        lars_trust_coefficient: LARS eta.
        lars_trust_ratio: ``update``: eta ||w|| / ||g + wd w|| (iBOT's ``utils.LARS``).
        lars_lr_in_momentum: False: momentum first, then the learning rate.
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
        pred_ratio: float | tuple[float, ...] = 0.3,
        pred_ratio_var: float | tuple[float, ...] = 0.0,
        pred_shape: PredShape = "block",
        pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
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
        global_crops_scale: tuple[float, float] = (0.14, 1.0),
        local_crops_number: int = 0,
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
    ) -> None:
        if not is_timm_vit(backbone):
            raise ValueError(f"iBOT needs a timm VisionTransformer backbone, not {backbone!r}")
        if (shared_head or shared_head_teacher) and patch_out_dim != out_dim:
            raise ValueError(
                "a shared head gives patch tokens the [CLS] last layer: set patch_out_dim "
                f"= out_dim ({out_dim}) or shared_head and shared_head_teacher to false"
            )
        super().__init__(**init_arguments(DINO, locals(), use_bn_in_head=False, cifar_stem=False))
        # only with masked image modelling: a parameter without gradient stops DDP
        self.masked_embed = (
            nn.Parameter(torch.zeros(1, self.backbone.num_features))
            if use_masked_im_modeling
            else None
        )
        self.mask_generator = IBOTMaskGenerator(
            pred_ratio, pred_ratio_var, pred_shape, pred_aspect_ratio
        )

    # ----------------------------------------------------------------- parts
    def _ibot_head(self, shared_head: bool) -> IBOTHead:
        hp = self.hparams
        return IBOTHead(
            self.backbone.num_features,
            hp.out_dim,
            hp.patch_out_dim,
            shared_head=shared_head,
            norm_last_layer=hp.norm_last_layer,
            nlayers=hp.head_layers,
            hidden_dim=hp.hidden_dim,
            bottleneck_dim=hp.bottleneck_dim,
        )

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
        return IBOTLoss(
            hp.out_dim,
            hp.patch_out_dim,
            hp.student_temp,
            hp.center_momentum,
            hp.center_momentum2,
            hp.lambda1,
            hp.lambda2,
        )

    def last_layers(self) -> list[nn.Module]:
        return [m for m in (self.head.last_layer, self.head.last_layer2) if m is not None]

    # ----------------------------------------------------------------- contract
    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), *head_pairs(self.head, self.teacher_head)]

    def view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> ViewTransform:
        grid = image_size // patch_size_of(self.backbone)
        crops = super().view_transform(image_size, mean, std)
        return MultiCropWithMasks(crops, (grid, grid), self.mask_generator)

    def device_view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> nn.Module | None:
        grid = image_size // patch_size_of(self.backbone)
        views = super().device_view_transform(image_size, mean, std)
        return MaskedDeviceViews(views, (grid, grid), self.mask_generator)

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
