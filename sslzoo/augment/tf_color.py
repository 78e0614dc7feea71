"""The colour jitter of the official SimCLR and BYOL pipelines, per sample on batched tensors.

torchvision's ``ColorJitter`` (lightly's, and MoCo v3's, SimSiam's, SwAV's and DINO's official
one) blends: brightness towards black, contrast towards the mean luma, saturation towards the
luma. The TensorFlow ops behind SimCLR (tf2/data_util.py ``color_jitter_rand``) and their JAX
copies in BYOL (utils/augmentations.py) differ in form:

- contrast moves each channel around its own mean: ``(x - mean_c) f + mean_c``
  (``tf.image.adjust_contrast``), so it never shifts the colour balance;
- saturation scales S in HSV and clips it to [0, 1] (``tf.image.adjust_saturation``), which
  keeps each pixel's value (its max channel) and hue: ``x' = v - min(f, v / c) (v - x)`` with
  ``v = max(r, g, b)`` and chroma ``c = v - min(r, g, b)``;
- BYOL's (and SimCLR v1's) brightness adds ``delta ~ U(-b, b)``; SimCLR v2's multiplies by
  ``f ~ U(max(0, 1 - b), 1 + b)`` as torchvision does;
- the hue rotation in HSV is torchvision's.

Each op is followed by a clip to [0, 1], and the four run in a random order per image.
"""

from __future__ import annotations

from typing import Literal

import torch

from sslzoo.augment import ops
from sslzoo.augment.params import jitter_ranges

ColorOps = Literal["torchvision", "simclr", "byol"]


def add_brightness(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``clip(x + delta, 0, 1)`` (BYOL's ``adjust_brightness``)."""
    return (images + delta.reshape(-1, 1, 1, 1)).clamp(0.0, 1.0)


def adjust_contrast_per_channel(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clip((x - mean_c) f + mean_c, 0, 1)`` with each channel's own spatial mean."""
    return ops.blend(images, images.mean(dim=(-2, -1), keepdim=True), factor)


def adjust_saturation_hsv(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale S of HSV by ``factor`` and clip it to [0, 1], keeping H and V."""
    v = images.amax(dim=-3, keepdim=True)
    c = v - images.amin(dim=-3, keepdim=True)
    ratio = torch.where(c > 0, v / torch.where(c > 0, c, 1.0), 0.0)  # grey pixels stay
    scale = torch.minimum(factor.reshape(-1, 1, 1, 1), ratio)
    return (v - scale * (v - images)).clamp(0.0, 1.0)


def color_ranges(
    color_ops: ColorOps, brightness: float, contrast: float, saturation: float, hue: float
) -> list[tuple[float, float]]:
    """The ranges of the four jitter parameters: torchvision's, with BYOL's brightness an
    additive shift in [-b, b]."""
    ranges = jitter_ranges(brightness, contrast, saturation, hue)
    if color_ops == "byol":
        ranges[0] = (-brightness, brightness)
    return ranges


def _steps(color_ops: ColorOps) -> tuple:
    """The four ops in jitter order: brightness, contrast, saturation, hue."""
    brightness = add_brightness if color_ops == "byol" else ops.adjust_brightness
    return brightness, adjust_contrast_per_channel, adjust_saturation_hsv, ops.adjust_hue


def jitter_in_order(
    images: torch.Tensor,
    factors: torch.Tensor,
    order: list[int],
    color_ops: ColorOps,
    use_hue: bool = True,
) -> torch.Tensor:
    """The ops of :func:`tf_color_jitter` for images that share one ``order`` (the PIL
    pipeline's one image), each op run once."""
    steps = _steps(color_ops)
    for k in order:
        if k < 3 or use_hue:
            images = steps[k](images, factors[:, k])
    return images


def tf_color_jitter(
    images: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    apply: torch.Tensor,
    color_ops: ColorOps,
    use_hue: bool = True,
) -> torch.Tensor:
    """The official SimCLR (``simclr``) or BYOL (``byol``) colour jitter with per-sample
    parameters ``factors`` (N, 4: brightness, contrast, saturation, hue) and order ``order``
    (N, 4, a permutation of 0..3 per sample), on the samples whose ``apply`` is true.

    As in :func:`~sslzoo.augment.ops.color_jitter`, the hue rotation, the costly op, runs once
    on the whole batch (:func:`~sslzoo.augment.ops.jitter_around_hue`). In a pass, brightness
    and contrast are one affine map ``x a + b`` per sample and channel (the identity for samples
    with another op), and saturation replaces it where it is the sample's op.
    """
    byol = color_ops == "byol"

    def one_op(
        x: torch.Tensor, factors: torch.Tensor, op: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        f = factors.gather(1, op[:, None])[:, 0]  # each sample's parameter for its op
        bright, contrast = active & (op == 0), active & (op == 1)
        scale = torch.where(contrast | (bright & (not byol)), f, 1.0)
        shift = torch.where(bright, f, 0.0) if byol else torch.zeros_like(f)
        mean = x.mean(dim=(-2, -1), keepdim=True)  # contrast: around each channel's mean
        offset = torch.where(contrast, 1.0 - f, 0.0).reshape(-1, 1, 1, 1) * mean
        affine = x * scale.reshape(-1, 1, 1, 1) + (offset + shift.reshape(-1, 1, 1, 1))
        affine = affine.clamp(0.0, 1.0)
        saturation = (active & (op == 2)).reshape(-1, 1, 1, 1)
        return torch.where(saturation, adjust_saturation_hsv(x, f), affine)

    return ops.jitter_around_hue(images, factors, order, apply, use_hue, one_op)
