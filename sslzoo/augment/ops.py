"""Batched image operations with per-sample parameters.

Every function takes float images of shape (N, C, H, W) in [0, 1] and one parameter per sample
(a tensor of shape (N,)), and matches the torchvision functional op of the same name applied to
each image with its own parameter: ``resized_crop`` (bilinear or bicubic, antialiased) and
``horizontal_flip``, ``adjust_brightness``, ``adjust_contrast``, ``adjust_saturation``,
``adjust_hue``, ``rgb_to_grayscale``, ``gaussian_blur`` (reflect padding; zero padding as
the official SimCLR and BYOL convolutions), ``solarize`` and
``normalize``. Nothing reads a tensor on the host, so a pipeline of these ops never waits for
the device.

Resizing and blurring are written as products with small per-sample matrices (one for rows, one
for columns), which run as batched matrix multiplications on any device. Under TF32 matmul
precision their inputs are rounded to about 5e-4 relative: a tenth of a uint8 grey level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def _column(values: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """Per-sample values shaped to broadcast against (N, C, H, W) images."""
    return values.reshape(-1, *([1] * (ndim - 1)))


Interpolation = Literal["bilinear", "bicubic"]
BlurPadding = Literal["reflect", "zeros"]


def resampling_filter(x: torch.Tensor, interpolation: Interpolation) -> torch.Tensor:
    """The resampling kernel at distances ``x`` (in filter units): the triangle for bilinear,
    Keys' cubic with a = -0.5 (PIL's and PyTorch's antialiased bicubic) for bicubic."""
    x = x.abs()
    if interpolation == "bilinear":
        return torch.clamp(1.0 - x, min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resize_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    in_size: int,
    out_size: int,
    antialias: bool = True,
    interpolation: Interpolation = "bilinear",
) -> torch.Tensor:
    """Interpolation matrices (N, out_size, in_size) that crop ``[start, start + length)`` of a
    line of ``in_size`` pixels and resize it to ``out_size`` pixels.

    This is PyTorch's resize with ``align_corners=False``: with ``antialias`` the kernel is
    widened by the downscaling factor (PIL's and torchvision's antialiased resize), without it
    the kernel keeps unit width (plain bilinear interpolation; bicubic needs ``antialias``).
    Weights falling outside the crop are dropped and the rest renormalised, as at an image
    border.
    """
    if interpolation == "bicubic" and not antialias:
        raise ValueError("bicubic resizing is implemented with antialias=True only (PIL's)")
    start, length = start.float(), length.float()
    scale = (length / out_size)[:, None, None]  # input pixels per output pixel
    support = torch.clamp(scale, min=1.0) if antialias else torch.ones_like(scale)
    center = scale * (torch.arange(out_size, device=start.device) + 0.5)[None, :, None]
    pixel = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]
    weights = resampling_filter((pixel + 0.5 - center) / support, interpolation)
    inside = (pixel >= 0) & (pixel < length[:, None, None])
    weights = weights * inside
    return weights / weights.sum(-1, keepdim=True)


def resized_crop(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    size: tuple[int, int],
    flip: torch.Tensor | None = None,
    antialias: bool = True,
    interpolation: Interpolation = "bilinear",
) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size``; then mirror it horizontally where
    ``flip`` is true. Equal to torchvision's ``resized_crop`` followed by ``horizontal_flip``
    on each image (bicubic results are not clamped, as torchvision's on float images)."""
    h_in, w_in = images.shape[-2:]
    rows = resize_weights(top, height, h_in, size[0], antialias, interpolation)
    cols = resize_weights(left, width, w_in, size[1], antialias, interpolation)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    return rows[:, None] @ images @ cols.transpose(1, 2)[:, None]


def horizontal_flip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose ``flip`` is true."""
    return torch.where(_column(flip), images.flip(-1), images)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images, shape (N, 1, H, W), with torchvision's weights."""
    r, g, b = images.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Replace the images whose ``apply`` is true by their luma on all three channels."""
    gray = rgb_to_grayscale(images).expand_as(images)
    return torch.where(_column(apply), gray, images)


def blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``clamp(factor * images + (1 - factor) * other, 0, 1)``,
    computed as one ``lerp`` (which returns ``images`` exactly where ``factor`` is 1)."""
    other = other.expand_as(images)
    return torch.lerp(other, images, _column(factor).expand_as(images)).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black."""
    return blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma."""
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's luma."""
    return blend(images, rgb_to_grayscale(images), factor)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` turns (in [-0.5, 0.5]), keeping saturation and value.

    torchvision's RGB -> HSV -> RGB round trip, written without the saturation division: with
    value ``v = max(r, g, b)`` and chroma ``c = v - min(r, g, b)``, hue sextant
    ``h6 = (g - b) / c`` (red max), ``2 + (b - r) / c`` (green) or ``4 + (r - g) / c`` (blue),
    channel n of the result is ``v - c clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + h6 + 6 factor) mod 6`` and n = 5, 3, 1 for red, green, blue.
    """
    r, g, b = images.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h6 = torch.where(
        v == r, (g - b) / safe, torch.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    h6 = h6 + 6.0 * factor.reshape(-1, 1, 1)
    n = (5.0 - 2.0 * torch.arange(3, device=images.device, dtype=images.dtype))[:, None, None]
    k = torch.remainder(n + h6.unsqueeze(-3), 6.0)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return (v.unsqueeze(-3) - c.unsqueeze(-3) * ramp).clamp(0.0, 1.0)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (N, kernel_size) with per-sample ``sigma``, sampled at
    integer offsets as torchvision's ``gaussian_blur`` does."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=sigma.device)
    pdf = torch.exp(-0.5 * (x[None, :] / sigma.float()[:, None]) ** 2)
    return pdf / pdf.sum(-1, keepdim=True)


def blur_matrices(
    kernels: torch.Tensor, size: int, padding: BlurPadding = "reflect"
) -> torch.Tensor:
    """Matrices (N, size, size) applying each 1-D kernel along a line of ``size`` pixels.

    ``reflect`` pads as torchvision's ``gaussian_blur``; ``zeros`` pads with zeros, as a SAME
    convolution (tf.nn.depthwise_conv2d in the official SimCLR and BYOL code) does, so pixels
    near the border lose the kernel mass that falls outside the image and darken.
    """
    n, k = kernels.shape
    radius = k // 2
    if padding == "reflect" and radius >= size:
        raise ValueError(f"blur kernel of size {k} is too large for reflect padding of {size} px")
    pos = torch.arange(size, device=kernels.device)[:, None] + torch.arange(
        -radius, radius + 1, device=kernels.device
    )
    weights = kernels[:, None, :].expand(n, size, k)
    if padding == "zeros":
        inside = (pos >= 0) & (pos < size)
        weights = weights * inside
        pos = pos.clamp(0, size - 1)  # the dropped taps add zero there
    else:
        pos = pos.abs()  # reflect at the start: -i -> i
        pos = torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)  # and at the end
    out = torch.zeros(n, size, size, device=kernels.device, dtype=kernels.dtype)
    return out.scatter_add_(2, pos.expand(n, -1, -1), weights)


def gaussian_blur(
    images: torch.Tensor, sigma: torch.Tensor, kernel_size: int, padding: BlurPadding = "reflect"
) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma``."""
    kernels = gaussian_kernels(sigma, kernel_size)
    rows = blur_matrices(kernels, images.shape[-2], padding)
    cols = blur_matrices(kernels, images.shape[-1], padding)
    return rows[:, None] @ images @ cols.transpose(1, 2)[:, None]


def solarize(images: torch.Tensor, apply: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` of the images whose ``apply`` is true."""
    return torch.where(_column(apply) & (images >= threshold), 1.0 - images, images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``; ``mean`` and ``std`` have shape (C,)."""
    return (images - mean[:, None, None]) / std[:, None, None]


def _blend_step(
    images: torch.Tensor, factors: torch.Tensor, op: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """One blend op per sample: brightness (``op`` 0, towards black), contrast (1, towards the
    mean luma) or saturation (2, towards the luma), with factor 1 where ``active`` is false."""
    factor = torch.where(active, factors.gather(1, op[:, None])[:, 0], 1.0)
    gray = rgb_to_grayscale(images)
    mean = gray.mean(dim=(-2, -1), keepdim=True)
    target = torch.where(_column(op == 0), torch.zeros_like(gray), gray)
    target = torch.where(_column(op == 1), mean, target)
    return blend(images, target, factor)


def color_jitter(
    images: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    apply: torch.Tensor,
    use_hue: bool = True,
) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with per-sample factors and per-sample random order.

    ``factors`` (N, 4) holds the brightness, contrast and saturation factors and the hue shift;
    ``order`` (N, 4) is each sample's permutation of the four ops (0 brightness, 1 contrast,
    2 saturation, 3 hue); samples whose ``apply`` is false are returned unchanged. The hue
    shift, the costly op, runs once on the whole batch: each sample's three blend ops, in its
    order, run in three passes before it (those its order puts before hue; factor 1 for the
    others) and three passes after it (the rest). Pass ``use_hue=False`` when the hue range is
    zero.
    """
    return jitter_around_hue(images, factors, order, apply, use_hue, _blend_step)


def jitter_around_hue(
    images: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    apply: torch.Tensor,
    use_hue: bool,
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run each sample's four jitter ops in its ``order`` with the hue shift once for the whole
    batch: ``step(x, factors, op, active)`` applies, per sample, its op ``op`` (0, 1 or 2)
    where ``active`` is true and leaves the other samples unchanged; three such passes run
    before the hue shift (the ops each sample's order puts before hue) and three after it."""
    is_hue = order == 3
    hue_at = is_hue.int().argmax(1)  # position of hue in each sample's order
    # each sample's other ops in its order: a stable sort moves hue to the end
    others = order.gather(1, torch.argsort(is_hue.int(), dim=1, stable=True))[:, :3]
    x = images
    if not use_hue:  # three passes, each sample's ops in its order
        for j in range(3):
            x = step(x, factors, others[:, j], apply)
        return x
    for j in range(3):
        x = step(x, factors, others[:, j], apply & (j < hue_at))
    x = torch.where(_column(apply), adjust_hue(x, factors[:, 3]), x)
    for j in range(3):
        x = step(x, factors, others[:, j], apply & (j >= hue_at))
    return x
