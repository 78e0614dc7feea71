"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"; v2: "Big Self-Supervised Models are Strong Semi-Supervised Learners").

    for x in batch:
        x1, x2 = augment(x), augment(x)
        z1, z2 = g(f(x1)), g(f(x2))          # f: backbone, g: projection head
    loss = NT-Xent(z1, z2, temperature)      # in-batch negatives, both directions
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslzoo.augment.recipes import TwoViews
from sslzoo.losses.contrastive import NTXentLoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import mlp
from sslzoo.optim.settings import Optimization

# tf2/data_util.py: TensorFlow's crop sampler and colour ops, bicubic crops, blur p 0.5 with a
# kernel of a tenth of the image as a zero-padded SAME convolution, strength-1 jitter
VIEWS = TwoViews(
    crop_sampler="simclr", crop_interpolation="bicubic", color_jitter=(0.8, 0.8, 0.8, 0.2),
    color_ops="simclr", blur_prob=(0.5, 0.5), blur_kernel_fraction=0.1, blur_padding="zeros",
    solarize_prob=(0.0, 0.0),
)  # fmt: skip
# tf2/run.py: LARS 0.3 per 256 images (linear scaling), wd 1e-6, 10 warmup epochs, the
# learning rate inside the momentum (classic_momentum), no decay or adaptation of biases and BN
OPTIM = Optimization(
    optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10.0, lars_lr_in_momentum=True
)


def projection_head(
    input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, init_std: float | None
) -> nn.Sequential:
    """SimCLR v2's projection head (tf2/model.py ``ProjectionHead``, nonlinear): ``num_layers
    - 1`` hidden layers Linear(no bias) -> BN -> ReLU, then Linear(no bias) -> BN without beta
    (``center=False``); Linear weights start from N(0, ``init_std``^2) (``LinearLayer``'s
    ``RandomNormal(stddev=0.01)``; ``None``: PyTorch's default)."""
    head = mlp([input_dim, *[hidden_dim] * (num_layers - 1), output_dim], last_norm="no_shift")
    if init_std is not None:
        for layer in head:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=init_std)
    return head


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
        views: the official views (``crop_sampler``, ``color_ops`` and ``blur_kernel_fraction``
            set to ``torchvision``, ``torchvision`` and ``None``, with ``crop_interpolation:
            bilinear``, give lightly's ``SimCLRTransform``); ``color_jitter_strength`` is
            SimCLR's colour distortion strength (0.5 in the README's CIFAR-10 command).
        optim: LARS 0.3 per 256 images (``lr_scaling: sqrt`` with lr 0.075 is the README's
            choice for small batches), wd 1e-6 (the v2 ImageNet command uses 1e-4).
        backbone: see :class:`SSLMethod` (``zero_init_residual: true`` as tf2/resnet.py).
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        zero_init_residual: zero-initialised last BN of each residual block.
        sync_batchnorm: synchronise BatchNorm across devices (``global_bn``).
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        hidden_norm: bool = True,
        num_proj_layers: int = 3,
        proj_hidden_dim: int | None = None,
        proj_out_dim: int = 128,
        proj_init_std: float | None = 0.01,
        views: TwoViews = VIEWS,
        optim: Optimization = OPTIM,
        backbone: str = "resnet50",
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
        dim = self.backbone.num_features
        self.projection_head = projection_head(
            dim, proj_hidden_dim or dim, proj_out_dim, num_proj_layers, proj_init_std
        )
        self.criterion = NTXentLoss(temperature, hidden_norm)

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
        examples = self.optim.warmup_epochs * self.examples_per_epoch
        return round(examples // self.global_batch_size)

    @property
    def projection_mlp(self) -> nn.Sequential:
        return self.projection_head

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x1, x2), labels = batch
        h = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projection_head(h).chunk(2)
        loss = self.criterion(z1, z2)
        return self.training_outputs(loss, z1, h[: len(x1)], labels)
