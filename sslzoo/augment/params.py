"""Per-sample random parameters of the view augmentations, drawn on the images' device.

Each function draws one independent set of parameters per sample with the distributions of the
torchvision transforms that lightly's view recipes use, without reading anything back to the
host: data-dependent choices are made with ``torch.where``, never with Python branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
