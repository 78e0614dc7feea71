"""Multi-view augmentation of whole batches on their device, with per-sample parameters.

:class:`DeviceViews` maps a batch of images (uint8, or float in [0, 1]) to the list of augmented
views of a recipe. Every image of every view draws its own crop, flip, jitter factors and order,
grayscale, blur and solarisation, unlike a torchvision v2 transform applied to a batch, which
draws one set for the whole batch. The steps and their order are those of lightly's view
transforms: random resized crop, horizontal flip, colour jitter (random order) with probability,
grayscale, Gaussian blur, solarisation, normalisation.

The constructors :func:`twin_views`, :func:`asymmetric_views` and :func:`simsiam_views` take the
keyword arguments of lightly's ``SimCLRTransform``, ``BYOLTransform`` views and
``SimSiamTransform`` with the same defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sslzoo.augment import ops
from sslzoo.augment.params import CropSampler, bernoulli, jitter_params, sample_crop_boxes, uniform
from sslzoo.augment.tf_color import ColorOps, color_ranges, tf_color_jitter

PIL_SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize inverts uint8 values >= 128


@dataclass(frozen=True)
class ViewRecipe:
    """The augmentation of one view.

    Args:
        size: output side (or (height, width)).
        scale: area fraction range of the random resized crop.
        ratio: aspect ratio range of the crop (log-uniform).
        crop_sampler: how crop boxes are drawn: torchvision's ``RandomResizedCrop``, or the
            official ``simclr`` (TensorFlow's) or ``byol`` samplers
            (:mod:`sslzoo.augment.params`).
        interpolation: ``bilinear`` or ``bicubic`` resizing of the crop (both antialiased, as
            PIL's); bicubic results are clamped to [0, 1], as PIL's uint8 output is.
        hflip_prob: probability of a horizontal flip.
        jitter: colour jitter strengths (brightness, contrast, saturation, hue).
        color_ops: the form of the jitter ops: ``torchvision`` (blends), or the official
            ``simclr`` or ``byol`` TensorFlow forms (:mod:`sslzoo.augment.tf_color`).
        jitter_prob: probability of colour jitter.
        grayscale_prob: probability of grayscale.
        blur_prob: probability of Gaussian blur.
        blur_sigma: range of the blur sigma (uniform).
        blur_kernel_size: odd blur kernel side; ``None``: 2 ceil(3 sigma_max) + 1, the support
            of PIL's blur used by lightly. With reflect padding it is capped to fit the image.
        blur_padding: ``reflect`` (torchvision's) or ``zeros`` (the official SimCLR and BYOL
            SAME convolution).
        solarize_prob: probability of solarisation.
        solarize_threshold: pixels at or above it are inverted (PIL's 128 of 255 by default).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    size: int | tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_sampler: CropSampler = "torchvision"
    interpolation: ops.Interpolation = "bilinear"
    hflip_prob: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_ops: ColorOps = "torchvision"
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    blur_padding: ops.BlurPadding = "reflect"
    solarize_prob: float = 0.0
    solarize_threshold: float = PIL_SOLARIZE_THRESHOLD
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    @property
    def out_size(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    def kernel_size(self, height: int, width: int) -> int:
        """The blur kernel side for images of this size."""
        k = self.blur_kernel_size or 2 * math.ceil(3 * self.blur_sigma[1]) + 1
        return k if self.blur_padding == "zeros" else min(k, 2 * min(height, width) - 1)


class DeviceViews(nn.Module):
    """Augmented views of a batch, computed on the batch's device.

    ``forward(images)`` takes (N, 3, H, W) uint8 images (or float in [0, 1]) and returns one
    float32 tensor (N, 3, size, size) per recipe, normalised. It also takes a list with one
    batch per recipe of views already cropped and flipped (by :class:`CropViews` in dataloader
    workers) and then runs only the photometric steps. Nothing is read back to the host.
    """

    def __init__(self, recipes: Sequence[ViewRecipe]) -> None:
        super().__init__()
        self.recipes = list(recipes)
        # [start, end) of each run of consecutive identical recipes (DINO's local crops)
        bounds = [i for i in range(len(self.recipes)) if i == 0 or recipes[i] != recipes[i - 1]]
        self.runs = tuple(zip(bounds, [*bounds[1:], len(self.recipes)], strict=True))
        ranges = [color_ranges(r.color_ops, *r.jitter) for r in self.recipes]
        low = torch.tensor([[lo for lo, _ in rs] for rs in ranges])
        high = torch.tensor([[hi for _, hi in rs] for rs in ranges])
        # on the device with the module, so no step copies parameters from the host
        self.register_buffer("jitter_low", low, persistent=False)
        self.register_buffer("jitter_high", high, persistent=False)
        self.register_buffer("mean", torch.tensor([r.mean for r in self.recipes]), False)
        self.register_buffer("std", torch.tensor([r.std for r in self.recipes]), False)

    def extra_repr(self) -> str:
        return "\n".join(repr(r) for r in self.recipes)

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        cropped = not isinstance(images, torch.Tensor)
        if cropped and len(images) != len(self.recipes):
            raise ValueError(f"{len(images)} cropped views for {len(self.recipes)} recipes")
        views: list[torch.Tensor] = []
        with torch.autocast(_device_type(images), enabled=False):  # float32 inside autocast
            x = None if cropped else _unit_float(images)
            for start, end in self.runs:
                # a run of identical recipes (DINO's local crops) is one batch of k x N images
                k = end - start
                if cropped:
                    batch = torch.cat([_unit_float(v) for v in images[start:end]])
                    out = self.photometric(batch, start, generator)
                else:
                    batch = x if k == 1 else x.repeat(k, 1, 1, 1)
                    out = self.view(batch, start, generator)
                views += list(out.chunk(k))
        return views

    def view(
        self, x: torch.Tensor, index: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """View ``index`` of float images ``x`` in [0, 1]."""
        return self.photometric(self.crop(x, index, generator), index, generator)

    def crop(
        self, x: torch.Tensor, index: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The random resized crop and flip of view ``index``."""
        r = self.recipes[index]
        n, _, height, width = x.shape
        box = sample_crop_boxes(
            r.crop_sampler, n, height, width, r.scale, r.ratio, x.device, generator
        )
        flip = bernoulli(n, r.hflip_prob, x.device, generator)
        v = ops.resized_crop(
            x, box.top, box.left, box.height, box.width, r.out_size, flip,
            interpolation=r.interpolation,
        )  # fmt: skip
        return v.clamp_(0.0, 1.0) if r.interpolation == "bicubic" else v

    def photometric(
        self, v: torch.Tensor, index: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The colour steps and normalisation of view ``index`` on cropped views ``v``."""
        r = self.recipes[index]
        n, dev = v.shape[0], v.device
        if r.jitter_prob > 0 and any(r.jitter):
            apply = bernoulli(n, r.jitter_prob, dev, generator)
            factors, order = jitter_params(
                n, self.jitter_low[index], self.jitter_high[index], generator
            )
            if r.color_ops == "torchvision":
                v = ops.color_jitter(v, factors, order, apply, use_hue=r.jitter[3] > 0)
            else:
                v = tf_color_jitter(v, factors, order, apply, r.color_ops, r.jitter[3] > 0)
        if r.grayscale_prob > 0:
            v = ops.grayscale(v, bernoulli(n, r.grayscale_prob, dev, generator))
        if r.blur_prob > 0:
            apply = bernoulli(n, r.blur_prob, dev, generator)
            sigma = uniform(n, r.blur_sigma[0], r.blur_sigma[1], dev, generator)
            kernel_size = r.kernel_size(*v.shape[-2:])
            blurred = ops.gaussian_blur(v, sigma, kernel_size, r.blur_padding)
            v = torch.where(apply[:, None, None, None], blurred, v)
        if r.solarize_prob > 0:
            apply = bernoulli(n, r.solarize_prob, dev, generator)
            v = ops.solarize(v, apply, r.solarize_threshold)
        return ops.normalize(v, self.mean[index], self.std[index])


def _unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 in [0, 1]; float images as float32."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _device_type(images: torch.Tensor | Sequence[torch.Tensor]) -> str:
    first = images if isinstance(images, torch.Tensor) else images[0]
    return first.device.type


def lightly_view(
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    cj_prob: float,
    cj_strength: float,
    jitter: tuple[float, float, float, float],
    min_scale: float,
    random_gray_scale: float,
    gaussian_blur: float,
    sigmas: tuple[float, float],
    hf_prob: float,
    solarization_prob: float = 0.0,
    max_scale: float = 1.0,
    interpolation: ops.Interpolation = "bilinear",
    blur_kernel_size: int | None = None,
    blur_padding: ops.BlurPadding = "reflect",
    color_ops: ColorOps = "torchvision",
    crop_sampler: CropSampler = "torchvision",
) -> ViewRecipe:
    """One view of lightly's recipes: jitter strengths are ``cj_strength x jitter``."""
    return ViewRecipe(
        size=input_size,
        scale=(min_scale, max_scale),
        interpolation=interpolation,
        blur_kernel_size=blur_kernel_size,
        blur_padding=blur_padding,
        color_ops=color_ops,
        crop_sampler=crop_sampler,
        hflip_prob=hf_prob,
        jitter=tuple(cj_strength * j for j in jitter),
        jitter_prob=cj_prob,
        grayscale_prob=random_gray_scale,
        blur_prob=gaussian_blur,
        blur_sigma=tuple(sigmas),
        solarize_prob=solarization_prob,
        mean=tuple(mean),
        std=tuple(std),
    )


def twin_views(
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    cj_prob: float = 0.8,
    cj_strength: float = 1.0,
    cj_bright: float = 0.8,
    cj_contrast: float = 0.8,
    cj_sat: float = 0.8,
    cj_hue: float = 0.2,
    min_scale: float = 0.08,
    random_gray_scale: float = 0.2,
    gaussian_blur: float = 0.5,
    sigmas: tuple[float, float] = (0.1, 2.0),
    hf_prob: float = 0.5,
    **official: Any,
) -> DeviceViews:
    """Two views as lightly's ``SimCLRTransform``; ``official`` may set the recipe's
    ``interpolation``, ``crop_sampler``, ``blur_kernel_size``, ``blur_padding`` and
    ``color_ops``."""
    view = lightly_view(
        input_size, mean, std, cj_prob, cj_strength, (cj_bright, cj_contrast, cj_sat, cj_hue),
        min_scale, random_gray_scale, gaussian_blur, sigmas, hf_prob, **official,
    )  # fmt: skip
    return DeviceViews([view, view])


def asymmetric_views(
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    cj_prob: float = 0.8,
    cj_strength: float = 1.0,
    cj_bright: float = 0.4,
    cj_contrast: float = 0.4,
    cj_sat: float = 0.2,
    cj_hue: float = 0.1,
    min_scale: float = 0.08,
    random_gray_scale: float = 0.2,
    gaussian_blur: tuple[float, float] = (1.0, 0.1),
    solarization_prob: tuple[float, float] = (0.0, 0.2),
    sigmas: tuple[float, float] = (0.1, 2.0),
    hf_prob: float = 0.5,
    **official: Any,
) -> DeviceViews:
    """The asymmetric pair of lightly's ``BYOLView1Transform`` and ``BYOLView2Transform``
    (blur 1.0 / 0.1, solarisation 0 / 0.2); MoCo v3 uses it with its own jitter.
    ``official`` as for :func:`twin_views`."""
    common = dict(
        **official,
        input_size=input_size,
        mean=mean,
        std=std,
        cj_prob=cj_prob,
        cj_strength=cj_strength,
        jitter=(cj_bright, cj_contrast, cj_sat, cj_hue),
        min_scale=min_scale,
        random_gray_scale=random_gray_scale,
        sigmas=sigmas,
        hf_prob=hf_prob,
    )
    pairs = zip(gaussian_blur, solarization_prob, strict=True)
    return DeviceViews(
        [lightly_view(gaussian_blur=b, solarization_prob=s, **common) for b, s in pairs]
    )
