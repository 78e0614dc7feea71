"""Per-sample random parameters of the view augmentations, drawn on the images' device.

Each function draws one independent set of parameters per sample with the distributions of the
torchvision transforms that lightly's view recipes use, without reading anything back to the
host: data-dependent choices are made with ``torch.where``, never with Python branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Generator = torch.Generator | None


def uniform(
    n: int, low: float, high: float, device: torch.device, generator: Generator = None
) -> torch.Tensor:
    """``n`` samples of U[low, high)."""
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def bernoulli(n: int, p: float, device: torch.device, generator: Generator = None) -> torch.Tensor:
    """``n`` booleans, each true with probability ``p`` (``rand < p``, as torchvision's
    ``RandomApply`` and lightly's random transforms decide)."""
    return torch.rand(n, device=device, generator=generator) < p


@dataclass
class CropBoxes:
    """Integer crop boxes, one per sample, as float tensors of shape (N,)."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


def crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device,
    generator: Generator = None,
    tries: int = 10,
) -> CropBoxes:
    """``RandomResizedCrop.get_params`` for ``n`` samples at once.

    Each sample draws ``tries`` candidate boxes (area fraction uniform in ``scale``, aspect
    ratio log-uniform in ``ratio``, sides rounded) and keeps the first that fits in the image;
    a sample with no fitting candidate gets torchvision's fallback, the central crop with the
    aspect ratio clamped to ``ratio``. The box position is uniform over the valid offsets.
    """
    area = height * width
    target = uniform(n * tries, scale[0], scale[1], device, generator).view(n, tries) * area
    log_r = uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), device, generator)
    aspect = torch.exp(log_r).view(n, tries)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # first fitting try (0 if none fits)
    any_fits = fits.any(dim=1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(any_fits, w, torch.full_like(w, fallback_w))
    h = torch.where(any_fits, h, torch.full_like(h, fallback_h))
    u = torch.rand(2, n, device=device, generator=generator)
    top = torch.floor(u[0] * (height - h + 1))
    left = torch.floor(u[1] * (width - w + 1))
    top = torch.where(any_fits, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(any_fits, left, torch.div(width - w, 2, rounding_mode="floor"))
    return CropBoxes(top, left, h, w)


def jitter_ranges(
    brightness: float, contrast: float, saturation: float, hue: float
) -> list[tuple[float, float]]:
    """``ColorJitter``'s ranges: [max(0, 1 - x), 1 + x] for the three factors, [-hue, hue]."""
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue jitter must lie in [0, 0.5], got {hue}")
    ranges = [(max(0.0, 1.0 - x), 1.0 + x) for x in (brightness, contrast, saturation)]
    return ranges + [(-hue, hue)]


def jitter_params(
    n: int, low: torch.Tensor, high: torch.Tensor, generator: Generator = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample jitter factors (N, 4), uniform between ``low`` and ``high`` (shape (4,), on
    the device: building them from Python numbers on every call would copy from the host), and
    a uniformly random order (N, 4) of the four ops: each row is a permutation of 0..3, as
    ``torch.randperm(4)`` draws for each image."""
    factors = torch.rand(n, 4, device=low.device, generator=generator) * (high - low) + low
    order = torch.rand(n, 4, device=low.device, generator=generator).argsort(dim=1)
    return factors, order


CropSampler = Literal["torchvision", "simclr", "byol"]


def simclr_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device,
    generator: Generator = None,
    tries: int = 100,
    min_covered: float = 0.1,
) -> CropBoxes:
    """``tf.image.sample_distorted_bounding_box`` as SimCLR's ``crop_and_resize`` calls it
    (``min_object_covered=0.1``, the whole image as the box, 100 attempts), for ``n`` samples.

    Each attempt draws the aspect ratio w / h uniformly (not log-uniformly) in ``ratio``, then
    the height uniformly among the integers whose crop area fits ``scale`` (so the side, not the
    area, is uniform), nudges it by one if rounding leaves the area outside, and keeps the
    crop if it fits and covers ``min_covered`` of the image. The offsets are uniform in
    [0, H - h) and [0, W - w). No attempt kept: the whole image. Uniforms (n, tries, 4) hold
    each attempt's ratio, height, top and left draws, in that order.
    """
    u = torch.rand(n, tries, 4, device=device, generator=generator)
    aspect = ratio[0] + u[..., 0] * (ratio[1] - ratio[0])
    min_area, max_area = scale[0] * height * width, scale[1] * height * width
    h = torch.round(torch.sqrt(min_area / aspect))
    h_max = torch.round(torch.sqrt(max_area / aspect))
    too_wide = torch.round(h_max * aspect) > width
    h_max = torch.where(too_wide, torch.floor((width + 0.5 - 1e-7) / aspect), h_max)
    h_max = torch.where(too_wide & (torch.round(h_max * aspect) > width), h_max - 1, h_max)
    h_max = h_max.clamp(max=height)
    h = torch.minimum(h, h_max)
    h = h + torch.floor(u[..., 1] * (h_max - h + 1))
    w = torch.round(h * aspect)
    small = w * h < min_area  # rounding left the area short: one row taller
    h = torch.where(small, h + 1, h)
    w = torch.where(small, torch.round(h * aspect), w)
    large = w * h > max_area  # or too large: one row shorter
    h = torch.where(large, h - 1, h)
    w = torch.where(large, torch.round(h * aspect), w)
    area = w * h
    valid = (area >= min_area) & (area <= max_area) & (w <= width) & (h <= height)
    valid = valid & (w > 0) & (h > 0) & (area >= min_covered * height * width)
    top = torch.floor(u[..., 2] * (height - h))
    left = torch.floor(u[..., 3] * (width - w))
    first = valid.int().argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)

    def pick(values: torch.Tensor, whole: float) -> torch.Tensor:
        return torch.where(found, values.gather(1, first)[:, 0], whole)

    return CropBoxes(pick(top, 0.0), pick(left, 0.0), pick(h, height), pick(w, width))


def byol_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device,
    generator: Generator = None,
) -> CropBoxes:
    """BYOL's ``_decode_and_random_crop`` for ``n`` samples: one draw of the area fraction
    (uniform in ``scale``) and the aspect ratio (log-uniform in ``ratio``), sides rounded and
    clipped to the image (no rejection), offsets uniform in [0, W - w] and [0, H - h]. Uniforms
    (n, 4) hold the area, ratio, left and top draws, in that order."""
    u = torch.rand(n, 4, device=device, generator=generator)
    target = (scale[0] + u[:, 0] * (scale[1] - scale[0])) * height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    w = torch.round(torch.sqrt(target * aspect)).clamp(max=width)
    h = torch.round(torch.sqrt(target / aspect)).clamp(max=height)
    left = torch.floor(u[:, 2] * (width - w + 1))
    top = torch.floor(u[:, 3] * (height - h + 1))
    return CropBoxes(top, left, h, w)


def sample_crop_boxes(
    sampler: CropSampler,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device,
    generator: Generator = None,
) -> CropBoxes:
    """Crop boxes from torchvision's ``RandomResizedCrop`` sampler or an official one."""
    sample = {"torchvision": crop_boxes, "simclr": simclr_crop_boxes, "byol": byol_crop_boxes}
    return sample[sampler](n, height, width, scale, ratio, device, generator)
