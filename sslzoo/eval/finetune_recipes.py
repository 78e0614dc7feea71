"""The two official fine-tuning recipes, each a frozen dataclass of typed settings with the
official defaults, and what each builds: the classifier around a pretrained backbone, its
parameter groups and optimizer, the learning rate at a step, the training transform, the batch
mixing and the loss.

- :class:`SimCLRv2Finetune` (convnets): SimCLR v2 (arXiv 2006.10029, appendix; the flags of
  google-research/simclr ``tf2/run.py``): LARS, no weight decay, no warmup, a cosine from
  0.005 x sqrt(batch) to 0, batch 1024, random crop and flip only, from the first layer of the
  projection head with 1 % / 10 % of the labels, from its input with all of them.
- :class:`MAEFinetune` (ViTs): MAE (facebookresearch/mae ``main_finetune.py``,
  ``FINETUNE.md``, ``util/lr_decay.py``): AdamW with layer-wise learning-rate decay, warmup and
  cosine, drop path, RandAugment, random erasing, mixup / cutmix, label smoothing, global pool.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from timm.data import Mixup, create_transform
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn

from sslzoo.augment.crops import SampledResizedCrop
from sslzoo.backbones import Backbone
from sslzoo.datamodules import SSLDataModule
from sslzoo.datamodules.images import Transform
from sslzoo.errors import ConfigError
from sslzoo.nn.vit import set_drop_path
from sslzoo.optim.lars import LARS
from sslzoo.optim.schedules import warmup_cosine

LRScaling = Literal["sqrt", "linear", "none"]


def scaled_lr(lr: float, scaling: LRScaling, batch_size: int) -> float:
    """``lr x sqrt(B)``, ``lr x B / 256`` or ``lr`` for a global batch of ``B`` images."""
    if scaling == "sqrt":
        return lr * math.sqrt(batch_size)
    if scaling == "linear":
        return lr * batch_size / 256
    return lr


def head_layers(head: nn.Sequential | None, count: int) -> nn.Sequential:
    """The first ``count`` layers of an MLP head (each a Linear and the norm and activation
    after it), copied; ``-1``: all of them, ``0``: none (``ft_proj_selector``'s meaning)."""
    layers: list[list[nn.Module]] = []
    for module in head if head is not None else []:
        if isinstance(module, nn.Linear) or not layers:
            layers.append([])
        layers[-1].append(module)
    count = len(layers) if count == -1 else count
    if not 0 <= count <= len(layers):
        raise ConfigError(
            f"from_head_layer={count}: the projection head has {len(layers)} layers "
            "(0 starts from the backbone's output, -1 takes the whole head)"
        )
    return nn.Sequential(*copy.deepcopy([m for layer in layers[:count] for m in layer]))


def out_features(backbone: Backbone, layers: nn.Sequential) -> int:
    """Width of the features after ``layers`` (the backbone's, when there are none)."""
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else backbone.num_features


def is_vit(backbone: Backbone) -> bool:
    """Whether the backbone is a timm VisionTransformer."""
    return isinstance(backbone.model, VisionTransformer)


@dataclass(frozen=True)
class SimCLRv2Finetune:
    """SimCLR v2's fine-tuning of the whole network (convnets).

    Args:
        epochs: training epochs; ``None``: 60 with 1 % of the labels or fewer, 30 above
            (the paper's 1 % / 10 % / 100 % ImageNet runs).
        batch_size: global batch (``train_batch_size=1024``).
        lr: learning rate per sqrt(batch) (``learning_rate=0.005``,
            ``learning_rate_scaling=sqrt``: 0.16 at 1024; the paper uses 0.002 for the wider
            and SK ResNets).
        lr_scaling: ``sqrt``, ``linear`` (per 256 images) or ``none``.
        momentum: LARS momentum, applied with the learning rate inside it
            (``classic_momentum``).
        weight_decay: none while fine-tuning (``weight_decay=0``).
        warmup_epochs: none while fine-tuning; the cosine decays to 0 over the run.
        trust_coefficient: LARS eta (``eeta=0.001``); biases, BatchNorm and the new linear
            head (``head_supervised``) are neither decayed nor adapted.
        from_head_layer: layers of the projection head kept under the classifier
            (``ft_proj_selector``); ``None``: the first one with fewer than all the labels,
            none with all of them, as the paper does. Methods without an MLP projection head
            start from the backbone's output.
        zero_init_head: start the linear classifier at zero (``zero_init_logits_layer``).
        crop_scale: area range of the random crop (SimCLR's crop sampler, bicubic); then a
            horizontal flip, no colour distortion.
    """

    epochs: int | None = None
    batch_size: int = 1024
    lr: float = 0.005
    lr_scaling: LRScaling = "sqrt"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    trust_coefficient: float = 1e-3
    from_head_layer: int | None = None
    zero_init_head: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)

    name = "simclrv2"

    def epochs_for(self, label_fraction: float) -> int:
        if self.epochs is not None:
            return self.epochs
        return 60 if label_fraction <= 0.01 else 30

    def head_layer_count(self, label_fraction: float) -> int:
        if self.from_head_layer is not None:
            return self.from_head_layer
        return 1 if label_fraction < 1 else 0

    def classifier(
        self, backbone: Backbone, head: nn.Sequential | None, num_classes: int, fraction: float
    ) -> nn.Module:
        layers = head_layers(head, self.head_layer_count(fraction))
        fc = nn.Linear(out_features(backbone, layers), num_classes)
        if self.zero_init_head:
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)
        return nn.Sequential(backbone, layers, fc)

    def param_groups(self, net: nn.Module) -> list[dict[str, Any]]:
        """Weights adapted by LARS; biases, norms and the classifier (``head_supervised``,
        the last module) plain momentum SGD; no weight decay anywhere by default."""
        fc = list(net.children())[-1]
        head = {id(p) for p in fc.parameters()}
        adapted, plain = [], []
        for p in net.parameters():
            if p.requires_grad:
                (plain if p.ndim <= 1 or id(p) in head else adapted).append(p)
        wd = self.weight_decay
        return [
            {"params": adapted, "weight_decay": wd, "lars_adapt": True, "lr_scale": 1.0},
            {"params": plain, "weight_decay": 0.0, "lars_adapt": False, "lr_scale": 1.0},
        ]

    def optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        return LARS(
            groups,
            lr=lr,
            momentum=self.momentum,
            trust_coefficient=self.trust_coefficient,
            trust_ratio="update",
            lr_in_momentum=True,
        )

    def peak_lr(self, global_batch: int) -> float:
        return scaled_lr(self.lr, self.lr_scaling, global_batch)

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int, peak: float) -> float:
        warmup = round(self.warmup_epochs * steps_per_epoch)
        return warmup_cosine(step, total_steps, warmup, peak, 0.0)

    def train_transform(self, data: SSLDataModule) -> Transform:
        size = (data.image_size, data.image_size)
        return T.Compose(
            [
                SampledResizedCrop(size, self.crop_scale, (3 / 4, 4 / 3), "bicubic", "simclr"),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(data.mean, data.std),
            ]
        )

    def mixing(self, num_classes: int) -> Mixup | None:
        return None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


@dataclass(frozen=True)
class MAEFinetune:
    """MAE's fine-tuning of a ViT (``main_finetune.py`` with ``FINETUNE.md``'s ViT-B command).

    Args:
        epochs: training epochs (100 for ViT-B; FINETUNE.md trains ViT-L/H for 50).
        batch_size: global batch (32 per GPU x 32 GPUs in FINETUNE.md).
        lr: base learning rate per 256 images (``blr``; 5e-4 for ViT-B, 1e-3 for ViT-L/H).
        lr_scaling: ``linear`` (``lr = blr x batch / 256``), ``sqrt`` or ``none``.
        betas: AdamW betas (torch's defaults, as ``main_finetune.py`` leaves them).
        weight_decay: AdamW weight decay of weights; biases, norms, the position embedding and
            the class token get none.
        layer_decay: layer-wise learning-rate decay: block ``i`` of a depth-``L`` ViT learns at
            ``layer_decay^(L - i)`` of the rate, the patch embedding at ``layer_decay^(L + 1)``,
            the final norm and the classifier at the full rate; ``None``: 0.65 for ViT-B
            (FINETUNE.md), 0.75 otherwise (the code's default, FINETUNE.md's ViT-L/H value).
        drop_path: stochastic depth of the last block (linear in depth from 0).
        warmup_epochs: linear warmup, then a cosine to ``min_lr``, per step.
        min_lr: the cosine's end.
        label_smoothing: smoothing of the targets (``smoothing``), also inside mixup.
        mixup: mixup alpha (FINETUNE.md; 0 turns it off, the code's default).
        cutmix: cutmix alpha (FINETUNE.md; 0 turns it off).
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of cutmix rather than mixup when both are on.
        mixup_mode: ``batch``, ``pair`` or ``elem``.
        auto_augment: timm's RandAugment policy (``aa``).
        reprob: random erasing probability; ``remode``, ``recount``: its mode and count.
        global_pool: average the patch tokens and normalise them (a new ``fc_norm``, the
            pretrained final norm dropped) rather than take the class token.
        head_init_std: the classifier starts from trunc_normal(std) weights and zero bias.
    """

    epochs: int = 100
    batch_size: int = 1024
    lr: float = 5e-4
    lr_scaling: LRScaling = "linear"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    layer_decay: float | None = None
    drop_path: float = 0.1
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    global_pool: bool = True
    head_init_std: float = 2e-5

    name = "mae"

    def epochs_for(self, label_fraction: float) -> int:
        return self.epochs

    def head_layer_count(self, label_fraction: float) -> int:
        return 0

    def decay_for(self, vit: VisionTransformer) -> float:
        if self.layer_decay is not None:
            return self.layer_decay
        return 0.65 if (len(vit.blocks), vit.embed_dim) == (12, 768) else 0.75

    def classifier(
        self, backbone: Backbone, head: nn.Sequential | None, num_classes: int, fraction: float
    ) -> nn.Module:
        """The timm ViT itself, its classifier (``head``) set: ``forward`` gives logits."""
        vit = backbone.model
        if self.global_pool:
            vit.global_pool = "avg"
            vit.fc_norm = nn.LayerNorm(vit.embed_dim, eps=1e-6)
            vit.norm = nn.Identity()
        else:
            vit.global_pool = "token"
        vit.head = nn.Linear(vit.embed_dim, num_classes)
        vit.num_classes = num_classes
        trunc_normal_(vit.head.weight, std=self.head_init_std)
        nn.init.zeros_(vit.head.bias)
        set_drop_path(vit, self.drop_path)
        return backbone

    def param_groups(self, net: nn.Module) -> list[dict[str, Any]]:
        """timm's ``param_groups_layer_decay`` on the ViT with its classifier inside: timm
        groups the stem (patch embedding, class token, position embedding) as layer 0, block
        ``i`` as ``i + 1`` and everything after the blocks (norm, classifier) as ``L + 1``,
        which is ``util/lr_decay.py``'s ``get_layer_id_for_vit``."""
        vit = net.model
        groups = param_groups_layer_decay(
            vit,
            weight_decay=self.weight_decay,
            no_weight_decay_list=vit.no_weight_decay(),
            layer_decay=self.decay_for(vit),
        )
        return groups

    def optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=lr, betas=self.betas)

    def peak_lr(self, global_batch: int) -> float:
        return scaled_lr(self.lr, self.lr_scaling, global_batch)

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int, peak: float) -> float:
        warmup = round(self.warmup_epochs * steps_per_epoch)
        return warmup_cosine(step, total_steps, warmup, peak, self.min_lr)

    def train_transform(self, data: SSLDataModule) -> Transform:
        return create_transform(
            input_size=data.image_size,
            is_training=True,
            color_jitter=None,
            auto_augment=self.auto_augment,
            interpolation="bicubic",
            re_prob=self.reprob,
            re_mode=self.remode,
            re_count=self.recount,
            mean=tuple(data.mean),
            std=tuple(data.std),
        )

    def mixing(self, num_classes: int) -> Mixup | None:
        if self.mixup <= 0 and self.cutmix <= 0:
            return None
        return Mixup(
            mixup_alpha=self.mixup,
            cutmix_alpha=self.cutmix,
            prob=self.mixup_prob,
            switch_prob=self.mixup_switch_prob,
            mode=self.mixup_mode,
            label_smoothing=self.label_smoothing,
            num_classes=num_classes,
        )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Soft-target cross-entropy of mixed targets, else label-smoothed cross-entropy."""
        if targets.ndim == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)


Recipe = SimCLRv2Finetune | MAEFinetune
RECIPES: dict[str, type[SimCLRv2Finetune] | type[MAEFinetune]] = {
    "simclrv2": SimCLRv2Finetune,
    "mae": MAEFinetune,
}


def choose_recipe(
    recipe: str | Recipe, backbone: Backbone, **overrides: Any
) -> SimCLRv2Finetune | MAEFinetune:
    """The recipe named (``auto``: MAE's for a ViT, SimCLR v2's otherwise), with the settings
    in ``overrides`` that are not None replaced."""
    if isinstance(recipe, str):
        if recipe == "auto":
            recipe = "mae" if is_vit(backbone) else "simclrv2"
        if recipe not in RECIPES:
            raise ConfigError(f"recipe={recipe!r}: choose auto, {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]()
    if isinstance(recipe, MAEFinetune) and not is_vit(backbone):
        raise ConfigError("recipe=mae fine-tunes a timm VisionTransformer backbone only")
    given = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(recipe)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ConfigError(
            f"{', '.join('--' + k for k in unknown)}: not a setting of the {recipe.name} recipe "
            f"(its settings: {', '.join(sorted(fields))})"
        )
    return dataclasses.replace(recipe, **given)
