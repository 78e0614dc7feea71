"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent").

online:  y = f(x), z = g(y), p = q(z)          # backbone, projector, predictor
target:  y' = f'(x), z' = g'(y')               # own random init, EMA of (f, g), no gradient
loss = (2 - 2 cos(p(v1), z'(v2))) + (2 - 2 cos(p(v2), z'(v1)))
after each step: target <- tau * target + (1 - tau) * online, tau -> 1 on a cosine
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslzoo.augment.ops import BlurPadding, Interpolation
from sslzoo.augment.params import CropSampler
from sslzoo.augment.tf_color import ColorOps
from sslzoo.augment.tf_recipe import TFRecipe
from sslzoo.backbones import build_backbone
from sslzoo.methods.base import LRScaling, SSLMethod, frozen, frozen_copy, init_arguments
from sslzoo.methods.byol_views import BYOLPairViews
from sslzoo.optim.lars import TrustRatio
from sslzoo.optim.optimizers import OptimizerName

TargetInit = Literal["random", "copy"]


class BYOLMLP(nn.Sequential):
    """BYOL's projector and predictor (``networks.MLP``): Linear -> BN -> ReLU -> Linear, the
    last Linear without bias. (lightly's ``BYOLProjectionHead`` has a bias there, the official
    one does not; the first Linear's bias, which the BN after it cancels, is left out.)"""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__(
            nn.Linear(input_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, output_dim, bias=False),
        )


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE, ``2 - 2 cos(p, z)``, averaged over the batch; z gets no gradient."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class BYOL(BYOLPairViews, SSLMethod):
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
        crop_min_scale: smallest random-resized-crop area fraction.
        crop_sampler: how crop boxes are drawn: ``byol``: one draw clipped to the image
            (``_decode_and_random_crop``); ``torchvision``: ``RandomResizedCrop``'s
            (lightly's).
        crop_interpolation: resizing of the crop (``bicubic``: ``dataset.py``).
        color_jitter: colour jitter strengths (brightness, contrast, saturation, hue).
        color_jitter_prob: probability of colour jitter, applied in random order.
        color_ops: ``byol``: the official ops (additive brightness, contrast around each
            channel's mean, saturation in HSV); ``torchvision``: lightly's ``ColorJitter``.
        grayscale_prob: probability of grayscale.
        blur_prob: Gaussian blur probability of (view 1, view 2).
        solarize_prob: solarisation probability of (view 1, view 2).
        blur_sigma: range of the blur sigma.
        blur_kernel_fraction: blur kernel side as a fraction of the image side
            (``blur_divider=10`` officially); ``None``: PIL's blur as in lightly's BYOL views.
        blur_padding: ``zeros``: the official SAME convolution; ``reflect``: torchvision's.
        hflip_prob: probability of a horizontal flip.
        sync_batchnorm: synchronise BatchNorm across devices (``cross_replica_axis``).
        backbone: backbone name (see :class:`SSLMethod`).
        backbone_kwargs: backbone constructor arguments (``zero_init_residual: true`` for
            torchvision ResNets, as officially: haiku's ResNet-50 blocks zero-initialise
            their last BN).
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        optimizer: ``lars`` officially.
        lr: base learning rate per 256 images.
        lr_scaling: learning-rate scaling rule.
        weight_decay: weight decay.
        momentum: LARS momentum.
        warmup_epochs: linear warmup, then cosine decay.
        min_lr: final learning rate.
        lars_trust_coefficient: LARS eta.
        lars_trust_ratio: ``update``: eta ||w|| / ||g + wd w|| (``scale_by_lars``).
        lars_lr_in_momentum: False: momentum first, then the learning rate.
        exclude_bias_and_norm: no weight decay and no LARS adaptation for biases and BN (the
            official ``exclude_bias_and_norm``).
    """

    def __init__(
        self,
        projector_hidden_dim: int = 4096,
        projector_out_dim: int = 256,
        predictor_hidden_dim: int = 4096,
        ema_momentum: float = 0.996,
        target_init: TargetInit = "random",
        crop_min_scale: float = 0.08,
        crop_sampler: CropSampler = "byol",
        crop_interpolation: Interpolation = "bicubic",
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_prob: float = 0.8,
        color_ops: ColorOps = "byol",
        grayscale_prob: float = 0.2,
        blur_prob: tuple[float, float] = (1.0, 0.1),
        solarize_prob: tuple[float, float] = (0.0, 0.2),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_fraction: float | None = 0.1,
        blur_padding: BlurPadding = "zeros",
        hflip_prob: float = 0.5,
        sync_batchnorm: bool = True,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        optimizer: OptimizerName = "lars",
        lr: float = 0.2,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 1.5e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 10.0,
        min_lr: float = 0.0,
        lars_trust_coefficient: float = 1e-3,
        lars_trust_ratio: TrustRatio = "update",
        lars_lr_in_momentum: bool = False,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        super().__init__(**init_arguments(SSLMethod, locals()))
        dim = self.backbone.num_features
        self.projector = BYOLMLP(dim, projector_hidden_dim, projector_out_dim)
        self.predictor = BYOLMLP(projector_out_dim, predictor_hidden_dim, projector_out_dim)
        if target_init == "copy":
            self.target_backbone = frozen_copy(self.backbone)
            self.target_projector = frozen_copy(self.projector)
        elif target_init == "random":
            self.target_backbone = frozen(
                build_backbone(backbone, cifar_stem=cifar_stem, **(backbone_kwargs or {}))
            )
            self.target_projector = frozen(BYOLMLP(dim, projector_hidden_dim, projector_out_dim))
        else:
            raise ValueError(f"target_init must be 'random' or 'copy', not {target_init!r}")

    @property
    def ema_base_momentum(self) -> float:
        return self.hparams.ema_momentum

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def tf_recipe(self) -> TFRecipe:
        """The crop sampler and resizing, colour ops and blur kernel of the views."""
        return TFRecipe.from_hparams(self.hparams)

    def view_recipe(self, image_size: int) -> dict[str, Any]:
        """The settings both views share, in lightly's ``BYOLView1Transform`` keywords."""
        hp = self.hparams
        bright, contrast, sat, hue = hp.color_jitter
        return dict(
            input_size=image_size,
            cj_prob=hp.color_jitter_prob,
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
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(x1))
            t2 = self.target_projector(self.target_backbone(x2))
        loss = regression_loss(p1, t2) + regression_loss(p2, t1)
        return self.training_outputs(loss, z1, y1, labels)
