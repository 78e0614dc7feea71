"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"; v2: "Big Self-Supervised Models are Strong Semi-Supervised Learners").

    for x in batch:
        x1, x2 = augment(x), augment(x)
        z1, z2 = g(f(x1)), g(f(x2))          # f: backbone, g: projection head
    loss = NT-Xent(z1, z2, temperature)      # in-batch negatives, both directions
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightly.transforms import SimCLRTransform
from lightly.utils.dist import gather
from torch import nn

from sslzoo.augment.ops import BlurPadding, Interpolation
from sslzoo.augment.params import CropSampler
from sslzoo.augment.tf_color import ColorOps
from sslzoo.augment.tf_recipe import TFRecipe
from sslzoo.augment.views import simclr_views
from sslzoo.methods.base import LRScaling, SSLMethod, ViewTransform, init_arguments
from sslzoo.optim.lars import TrustRatio
from sslzoo.optim.optimizers import OptimizerName


class SimCLRProjectionHead(nn.Sequential):
    """The SimCLR v2 projection head (tf2/model.py ``ProjectionHead``, nonlinear mode).

    ``num_layers - 1`` hidden layers of Linear(no bias) -> BN -> ReLU with width equal to the
    input, then Linear(no bias) -> BN without beta (``center=False``): the last BN keeps its
    scale but its shift is fixed at zero. Linear weights start from N(0, ``init_std``^2)
    (``LinearLayer``'s ``RandomNormal(stddev=0.01)``); ``None`` keeps PyTorch's default.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        init_std: float | None = 0.01,
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
        last_bn = nn.BatchNorm1d(output_dim)
        last_bn.bias.requires_grad = False
        layers += [nn.Linear(dim, output_dim, bias=False), last_bn]
        super().__init__(*layers)
        if init_std is not None:
            for layer in self:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=init_std)


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    normalize: bool = True,
    gather_distributed: bool = True,
) -> torch.Tensor:
    """NT-Xent as in the official tf2 ``add_contrastive_loss``: ``mean(loss_a + loss_b)``.

    For sample i of view a, the positive is i of view b; the negatives are every other sample
    of both views across all ranks (gathered with gradients). The loss is the sum of the two
    directions, each averaged over the batch.
    """
    if normalize:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n, offset = z1.shape[0], 0
    k1, k2 = z1, z2
    if (
        gather_distributed
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        k1, k2 = torch.cat(gather(z1)), torch.cat(gather(z2))
        offset = n * torch.distributed.get_rank()
    labels = torch.arange(n, device=z1.device) + offset
    self_mask = F.one_hot(labels, k1.shape[0]).bool()
    logits_ab = z1 @ k2.T / temperature
    logits_aa = (z1 @ k1.T / temperature).masked_fill(self_mask, float("-inf"))
    logits_ba = z2 @ k1.T / temperature
    logits_bb = (z2 @ k2.T / temperature).masked_fill(self_mask, float("-inf"))
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


class SimCLR(SSLMethod):
    """SimCLR with the official (google-research/simclr, tf2) defaults.

    The learning-rate schedule counts steps as tf2/model.py does, from the N training images of
    an epoch and the global batch B: a linear warmup over ``round(warmup_epochs * N // B)``
    steps (``WarmUpAndCosineDecay``), then a cosine to ``min_lr`` over the rest of
    ``N * max_epochs // B + 1`` steps (``get_train_steps``), or of ``max_steps`` (the
    official ``train_steps``) where that ends the run first. The official input pipeline
    repeats the data before batching it, so its steps run across epoch boundaries; our
    epochs are whole epochs of full batches, and the trainer's step count is left at
    ``max_epochs * (N // B)``: 31200 steps where the schedule spans 31279 (ImageNet at 4096,
    100 epochs), so the last step's learning rate is 2e-5 of the peak rather than 0. (The
    official run's own length is set by its loop, not by the schedule: tf2/run.py trains in
    loops of ``checkpoint_epochs * round(N / B)`` steps, 313 by default, until it reaches
    31279, that is 31300 steps, the last 21 at learning rate 0.)

    Args:
        temperature: NT-Xent temperature (0.1 ImageNet; the README uses 0.5 for CIFAR-10).
        hidden_norm: L2-normalise projections before the dot product.
        num_proj_layers: layers of the projection head (3 in v2, 2 in v1).
        proj_hidden_dim: width of hidden head layers; ``None`` uses the backbone's width.
        proj_out_dim: projection output dimension.
        proj_init_std: standard deviation of the head's initial Linear weights (0.01 officially;
            None: PyTorch's default).
        crop_min_scale: smallest random-resized-crop area fraction.
        crop_sampler: how crop boxes are drawn: ``simclr``: TensorFlow's
            ``sample_distorted_bounding_box`` as ``crop_and_resize`` calls it;
            ``torchvision``: ``RandomResizedCrop``'s (lightly's).
        crop_interpolation: resizing of the crop (``bicubic``: ``crop_and_resize``).
        color_jitter_strength: colour distortion strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s).
        color_jitter_prob: probability of colour jitter (applied in random order).
        color_ops: ``simclr``: the official TensorFlow ops (contrast around each channel's
            mean, saturation in HSV); ``torchvision``: lightly's ``ColorJitter``.
        grayscale_prob: probability of converting to grayscale.
        blur_prob: probability of Gaussian blur (0 for 32x32 images).
        blur_sigma: range of the blur sigma.
        blur_kernel_fraction: blur kernel side as a fraction of the image side (``height // 10``
            officially); ``None``: PIL's blur as in lightly's ``SimCLRTransform``.
        blur_padding: ``zeros``: the official SAME convolution; ``reflect``: torchvision's.
        hflip_prob: probability of a horizontal flip.
        sync_batchnorm: synchronise BatchNorm across devices (``global_bn``).
        backbone: see :class:`SSLMethod`; the same for the remaining arguments.
        backbone_kwargs: backbone constructor arguments (``zero_init_residual: true`` for
            torchvision ResNets, as officially: tf2/resnet.py zero-initialises the last
            BN of each block).
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        optimizer: ``lars`` officially.
        lr: 0.3 per 256 images with linear scaling (or 0.075 with ``sqrt`` scaling).
        lr_scaling: ``linear`` or ``sqrt`` (better for small batches, per the README).
        weight_decay: 1e-6 (v1; the v2 ImageNet command uses 1e-4).
        momentum: LARS momentum.
        warmup_epochs: linear warmup, then cosine decay.
        min_lr: final learning rate.
        lars_trust_coefficient: LARS eta.
        lars_trust_ratio: ``update``: eta ||w|| / ||g + wd w|| (``lars_optimizer.py``).
        lars_lr_in_momentum: SimCLR's ``classic_momentum``: the learning rate enters the momentum
            buffer.
        exclude_bias_and_norm: no weight decay and no LARS adaptation for biases and BN
            (``exclude_from_weight_decay``).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        hidden_norm: bool = True,
        num_proj_layers: int = 3,
        proj_hidden_dim: int | None = None,
        proj_out_dim: int = 128,
        proj_init_std: float | None = 0.01,
        crop_min_scale: float = 0.08,
        crop_sampler: CropSampler = "simclr",
        crop_interpolation: Interpolation = "bicubic",
        color_jitter_strength: float = 1.0,
        color_jitter_prob: float = 0.8,
        color_ops: ColorOps = "simclr",
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_fraction: float | None = 0.1,
        blur_padding: BlurPadding = "zeros",
        hflip_prob: float = 0.5,
        sync_batchnorm: bool = True,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        optimizer: OptimizerName = "lars",
        lr: float = 0.3,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 10.0,
        min_lr: float = 0.0,
        lars_trust_coefficient: float = 1e-3,
        lars_trust_ratio: TrustRatio = "update",
        lars_lr_in_momentum: bool = True,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        super().__init__(**init_arguments(SSLMethod, locals()))
        dim = self.backbone.num_features
        self.projection_head = SimCLRProjectionHead(
            dim, proj_hidden_dim or dim, proj_out_dim, num_proj_layers, proj_init_std
        )

    def view_recipe(self, image_size: int) -> dict[str, Any]:
        """The view settings, in lightly's ``SimCLRTransform`` keywords."""
        hp = self.hparams
        return dict(
            input_size=image_size,
            cj_prob=hp.color_jitter_prob,
            cj_strength=hp.color_jitter_strength,
            min_scale=hp.crop_min_scale,
            random_gray_scale=hp.grayscale_prob,
            gaussian_blur=hp.blur_prob,
            sigmas=tuple(hp.blur_sigma),
            hf_prob=hp.hflip_prob,
        )

    def tf_recipe(self) -> TFRecipe:
        """The crop sampler and resizing, colour ops and blur kernel of the views."""
        return TFRecipe.from_hparams(self.hparams)

    def view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> ViewTransform:
        normalize = {"mean": list(mean), "std": list(std)}
        transform = SimCLRTransform(normalize=normalize, **self.view_recipe(image_size))
        recipe = self.tf_recipe()
        for view in transform.transforms:
            recipe.adapt(view, image_size)
        return transform

    def device_view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> nn.Module:
        settings = self.tf_recipe().device_settings(image_size)
        return simclr_views(mean=mean, std=std, **self.view_recipe(image_size), **settings)

    @property
    def examples_per_epoch(self) -> int:
        """The official ``num_examples``: the training images, or those of the batches an epoch
        is cut to (``limit_train_batches``)."""
        trainer = self.trainer
        loader = trainer.train_dataloader
        batches = trainer.num_training_batches
        if batches < len(loader):
            return int(batches) * loader.batch_size * trainer.world_size
        return len(loader.dataset)

    @property
    def total_steps(self) -> int:
        """``get_train_steps``: ``train_steps or N * epochs // B + 1`` (see the class)."""
        trainer = self.trainer
        if trainer.max_epochs == -1:
            return trainer.max_steps
        steps = self.examples_per_epoch * trainer.max_epochs // self.global_batch_size + 1
        return steps if trainer.max_steps == -1 else min(steps, trainer.max_steps)

    @property
    def warmup_steps(self) -> int:
        """``WarmUpAndCosineDecay``'s ``round(warmup_epochs * N // B)``: floored, then rounded."""
        examples = self.settings.warmup_epochs * self.examples_per_epoch
        return round(examples // self.global_batch_size)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        h = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projection_head(h).chunk(2)
        loss = nt_xent_loss(z1, z2, self.hparams.temperature, self.hparams.hidden_norm)
        return self.training_outputs(loss, z1, h[: len(x1)], labels)
