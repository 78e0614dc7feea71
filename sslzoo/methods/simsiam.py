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

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import SimSiamPredictionHead
from lightly.transforms import SimSiamTransform
from torch import nn

from sslzoo.augment.views import simsiam_views
from sslzoo.methods.base import LRScaling, SSLMethod, ViewTransform, init_arguments
from sslzoo.optim.optimizers import OptimizerName, decay_groups, split_decay

LRUpdate = Literal["epoch", "step"]


class SimSiamProjector(nn.Sequential):
    """The official projector (simsiam/builder.py): ``num_layers - 1`` hidden layers of
    Linear(no bias) -> BN -> ReLU, then the encoder's original fc Linear, whose bias is kept but
    frozen, followed by ``BatchNorm1d(output_dim, affine=False)``."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3
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
        fc = nn.Linear(dim, output_dim)
        fc.bias.requires_grad = False
        layers += [fc, nn.BatchNorm1d(output_dim, affine=False)]
        super().__init__(*layers)


def negative_cosine_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """``-(cos(p1, z2) + cos(p2, z1)) / 2``, each averaged over the batch; z gets no gradient."""
    return (
        -(
            F.cosine_similarity(p1, z2.detach(), dim=1).mean()
            + F.cosine_similarity(p2, z1.detach(), dim=1).mean()
        )
        * 0.5
    )


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
        crop_min_scale: smallest random-resized-crop area fraction.
        color_jitter: colour jitter (brightness, contrast, saturation, hue).
        color_jitter_prob: probability of colour jitter.
        grayscale_prob: probability of grayscale.
        blur_prob: probability of Gaussian blur (0 for 32x32 images).
        blur_sigma: range of the blur sigma.
        hflip_prob: probability of a horizontal flip.
        sync_batchnorm: synchronise BatchNorm across devices (SyncBN officially).
        backbone: backbone name (see :class:`SSLMethod`).
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        zero_init_residual: start the last BatchNorm of every residual block of a ResNet
            backbone (torchvision's or timm's) at zero scale, as officially
            (simsiam/builder.py builds its torchvision ResNet with
            ``zero_init_residual=True``); other backbones ignore it.
        optimizer: ``sgd`` officially.
        lr: base learning rate per 256 images (0.05).
        lr_scaling: learning-rate scaling rule (``linear``: lr x batch / 256).
        weight_decay: weight decay (1e-4).
        momentum: SGD momentum.
        warmup_epochs: linear warmup length (none officially), then cosine decay.
        min_lr: final learning rate.
        exclude_bias_and_norm: no weight decay on biases and norms; the official SGD decays
            every parameter (False).
    """

    def __init__(
        self,
        dim: int = 2048,
        pred_dim: int = 512,
        proj_hidden_dim: int | None = None,
        proj_layers: int = 3,
        fix_pred_lr: bool = True,
        lr_update: LRUpdate = "epoch",
        crop_min_scale: float = 0.2,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        hflip_prob: float = 0.5,
        sync_batchnorm: bool = True,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool = True,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        exclude_bias_and_norm: bool = False,
    ) -> None:
        if lr_update not in ("epoch", "step"):
            raise ValueError(f"lr_update must be 'epoch' or 'step', not {lr_update!r}")
        super().__init__(**init_arguments(SSLMethod, locals()))
        width = self.backbone.num_features
        self.projector = SimSiamProjector(width, proj_hidden_dim or width, dim, proj_layers)
        self.predictor = SimSiamPredictionHead(dim, pred_dim, dim)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Decay / no-decay groups for the encoder (backbone + projector) and, separately, for
        the predictor, whose groups carry ``fixed_lr`` when ``fix_pred_lr``."""
        st = self.settings
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

    def view_recipe(self, image_size: int) -> dict[str, Any]:
        """The view settings, in lightly's ``SimSiamTransform`` keywords."""
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
            gaussian_blur=hp.blur_prob,
            sigmas=tuple(hp.blur_sigma),
            hf_prob=hp.hflip_prob,
        )

    def view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> ViewTransform:
        normalize = {"mean": list(mean), "std": list(std)}
        return SimSiamTransform(normalize=normalize, **self.view_recipe(image_size))

    def device_view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> nn.Module:
        return simsiam_views(mean=mean, std=std, **self.view_recipe(image_size))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        y1, y2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(y1), self.projector(y2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = negative_cosine_loss(p1, p2, z1, z2)
        return self.training_outputs(loss, z1, y1, labels)
