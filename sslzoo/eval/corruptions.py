"""The common corruptions of CIFAR-10-C, Tiny-ImageNet-C and ImageNet-C (Hendrycks & Dietterich
2019, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations"), applied
to a batch in torch: ``corrupt(images, name, severity, generator)``.

Per-severity parameters are the published ones (hendrycks/robustness, ImageNet-C/create_c/
make_cifar_c.py, make_tinyimagenet_c.py, make_imagenet_c.py). The table follows the image
size, ``min(H, W)``: up to 48 px the CIFAR-10-C table, up to 128 px the Tiny-ImageNet-C table
(64 px), beyond that the ImageNet-C table (224 px). Parameters in pixels (blur radii, glass
blur's swap distance, motion blur length) are used as published, not rescaled; elastic
transform's are fractions of the image size, as published (ImageNet-C's constants, written
for 244 px, are scaled by H / 224).

Differences from the official generator, all of them deliberate:
- everything runs in float on the (B, 3, H, W) batch, with the random draws from ``generator``
  (one independent draw per image); the official images pass through uint8 between steps and
  are saved as uint8 (ImageNet-C then as JPEG quality 85), which is not repeated here;
- ImageMagick's motion blur (motion_blur, snow) and OpenCV's Canny / distance transform /
  histogram equalisation (spatter) are restated from their definitions in
  :mod:`.corruption_ops`; the distance transform is exact where OpenCV's 5x5 mask is a close
  approximation;
- non-square images use each axis's own size where the official code assumed squares.

Severities follow the published tables, which do not always order the damage: by PSNR against
the clean image, glass blur's severities 1-3 trade less swapping for more blur, motion blur's
CIFAR severities 3 and 4 ((6, 2) and (8, 2)) differ by taps of weight e^-18, spatter switches
from water (1-3) to mud (4-5), saturate desaturates at 1-2 and oversaturates at 3-5, and elastic
transform's affine jitter shrinks while its elastic field grows (tests/test_corruptions.py
checks the orders that do hold).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from sslzoo.errors import ConfigError, DataError
from sslzoo.eval import corruption_ops as ops

Table = dict[str, list]  # size class -> five per-severity parameters

FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "fog", "brightness", "spatter"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
CORRUPTIONS: dict[str, str] = {n: fam for fam, names in FAMILIES.items() for n in names}
LEFT_OUT: dict[str, str] = {
    "frost": "overlays crops of six frost photographs shipped with the official code; "
    "the pictures cannot be shipped here",
}
SIZE_CLASSES = ("cifar", "tiny", "imagenet")


def corruption_names() -> list[str]:
    """Every implemented corruption, family by family (the ImageNet-C order within each)."""
    return [n for names in FAMILIES.values() for n in names]


def size_class(height: int, width: int) -> str:
    """The published table for this size: ``cifar`` up to 48 px, ``tiny`` up to 128 px, else
    ``imagenet`` (by the shorter side)."""
    side = min(height, width)
    return "cifar" if side <= 48 else "tiny" if side <= 128 else "imagenet"


def _arange(stop: float, step: float) -> list[float]:
    """numpy.arange(1, stop, step) as published (its float rounding keeps e.g. 1.06 in
    arange(1, 1.06, 0.01))."""
    return [float(z) for z in np.arange(1, stop, step)]


# Each entry: size class -> the five severities' parameters, as published.
PARAMS: dict[str, Table] = {
    "gaussian_noise": {
        "cifar": [0.04, 0.06, 0.08, 0.09, 0.10],
        "tiny": [0.04, 0.08, 0.12, 0.15, 0.18],
        "imagenet": [0.08, 0.12, 0.18, 0.26, 0.38],
    },
    "shot_noise": {
        "cifar": [500, 250, 100, 75, 50],
        "tiny": [250, 100, 50, 30, 15],
        "imagenet": [60, 25, 12, 5, 3],
    },
    "impulse_noise": {
        "cifar": [0.01, 0.02, 0.03, 0.05, 0.07],
        "tiny": [0.01, 0.02, 0.05, 0.08, 0.14],
        "imagenet": [0.03, 0.06, 0.09, 0.17, 0.27],
    },
    "speckle_noise": {
        "cifar": [0.06, 0.1, 0.12, 0.16, 0.2],
        "tiny": [0.15, 0.2, 0.25, 0.3, 0.35],
        "imagenet": [0.15, 0.2, 0.35, 0.45, 0.6],
    },
    "gaussian_blur": {  # sigma
        "cifar": [0.4, 0.6, 0.7, 0.8, 1.0],
        "tiny": [0.5, 0.75, 1.0, 1.25, 1.5],
        "imagenet": [1, 2, 3, 4, 6],
    },
    "glass_blur": {  # (sigma, max_delta, iterations)
        "cifar": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "tiny": [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
        "imagenet": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    },
    "defocus_blur": {  # (radius, alias_blur)
        "cifar": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "tiny": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        "imagenet": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    },
    "motion_blur": {  # (radius, sigma)
        "cifar": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "tiny": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
        "imagenet": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    },
    "zoom_blur": {  # zoom factors averaged with the image
        "cifar": [_arange(stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)],
        "tiny": [_arange(stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)],
        "imagenet": [
            _arange(1.11, 0.01),
            _arange(1.16, 0.01),
            _arange(1.21, 0.02),
            _arange(1.26, 0.02),
            _arange(1.31, 0.03),
        ],
    },
    "snow": {  # (mean, std, zoom, threshold, blur radius, blur sigma, image weight)
        "cifar": [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ],
        "tiny": [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.8),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6),
        ],
        "imagenet": [
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ],
    },
    "fog": {  # (strength, wibble decay)
        "cifar": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "tiny": [(0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)],
        "imagenet": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
    },
    "spatter": {  # (mean, std, sigma, threshold, intensity / mud sigma, mud?)
        "cifar": [
            (0.62, 0.1, 0.7, 0.7, 0.5, 0),
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1),
        ],
        "tiny": [
            (0.62, 0.1, 0.7, 0.7, 0.6, 0),
            (0.65, 0.1, 0.8, 0.7, 0.6, 0),
            (0.65, 0.3, 1, 0.69, 0.6, 0),
            (0.65, 0.1, 0.7, 0.68, 0.6, 1),
            (0.65, 0.1, 0.5, 0.67, 0.6, 1),
        ],
        "imagenet": [
            (0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1),
        ],
    },
    "brightness": {
        "cifar": [0.05, 0.1, 0.15, 0.2, 0.3],
        "tiny": [0.1, 0.2, 0.3, 0.4, 0.5],
        "imagenet": [0.1, 0.2, 0.3, 0.4, 0.5],
    },
    "contrast": {
        "cifar": [0.75, 0.5, 0.4, 0.3, 0.15],
        "tiny": [0.4, 0.3, 0.2, 0.1, 0.05],
        "imagenet": [0.4, 0.3, 0.2, 0.1, 0.05],
    },
    "saturate": {  # (scale, shift) of the HSV saturation
        "cifar": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "tiny": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
        "imagenet": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
    },
    "jpeg_compression": {  # quality
        "cifar": [80, 65, 58, 50, 40],
        "tiny": [65, 58, 50, 40, 25],
        "imagenet": [25, 18, 15, 10, 7],
    },
    "pixelate": {  # down-scaling factor
        "cifar": [0.95, 0.9, 0.85, 0.75, 0.65],
        "tiny": [0.9, 0.8, 0.7, 0.6, 0.5],
        "imagenet": [0.6, 0.5, 0.4, 0.3, 0.25],
    },
    "elastic_transform": {  # (alpha, sigma, affine jitter) as fractions of the image size
        "cifar": [
            (0, 0, 0.08),
            (0.05, 0.2, 0.07),
            (0.08, 0.06, 0.06),
            (0.1, 0.04, 0.05),
            (0.1, 0.03, 0.03),
        ],
        "tiny": [
            (0, 0, 0.08),
            (0.05, 0.3, 0.06),
            (0.1, 0.08, 0.06),
            (0.1, 0.03, 0.03),
            (0.16, 0.03, 0.02),
        ],
        "imagenet": [
            tuple(v * 244 / 224 for v in c)
            for c in [
                (2, 0.7, 0.1),
                (2, 0.08, 0.2),
                (0.05, 0.01, 0.02),
                (0.07, 0.01, 0.02),
                (0.12, 0.01, 0.02),
            ]
        ],
    },
}


def params(name: str, severity: int, height: int, width: int):
    """The published parameters of ``name`` at ``severity`` (1..5) for an image of this size."""
    return PARAMS[name][size_class(height, width)][severity - 1]


def _normal(shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device, dtype=like.dtype).to(like.device)


def _uniform(shape, low: float, high: float, g: torch.Generator, like: torch.Tensor):
    u = torch.rand(shape, generator=g, device=g.device, dtype=torch.float64).to(like.device)
    return u * (high - low) + low


# ---- noise -------------------------------------------------------------------------------


def gaussian_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """x + N(0, c^2) per pixel and channel."""
    return x + c * _normal(x.shape, g, x)


def shot_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """Poisson(c x) / c per pixel and channel (photon counting at ``c`` photons per unit)."""
    rate = (x * c).to(g.device)
    return (torch.poisson(rate, generator=g) / c).to(x.device, x.dtype)


def impulse_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """Salt and pepper (skimage random_noise 's&p'): each pixel and channel is replaced with
    probability ``c``, by 1 or 0 with equal odds."""
    flip = _uniform(x.shape, 0, 1, g, x) < c
    salt = _uniform(x.shape, 0, 1, g, x) < 0.5
    return torch.where(flip, salt.to(x.dtype), x)


def speckle_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """x + x N(0, c^2) per pixel and channel."""
    return x + x * c * _normal(x.shape, g, x)


# ---- blur --------------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    """skimage gaussian filter of std ``sigma`` (truncated at 4 sigma, edges repeated)."""
    return ops.gaussian_filter(x, sigma)


def glass_blur(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur, 8-bit quantisation, local pixel swaps (ops.local_pixel_swaps), blur again."""
    sigma, delta, iterations = c
    x = torch.floor(ops.gaussian_filter(x, sigma) * 255) / 255
    return ops.gaussian_filter(ops.local_pixel_swaps(x, delta, iterations, g), sigma)


def defocus_blur(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """Filter with an anti-aliased disk of the published radius (ops.disk_kernel)."""
    return ops.filter2d(x, ops.disk_kernel(*c))


def motion_blur(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """ImageMagick motion blur (radius, sigma) at an angle uniform in [-45, 45) degrees."""
    angle = _uniform((x.shape[0],), -45, 45, g, x)
    return ops.motion_blur(x, c[0], c[1], angle)


def zoom_blur(x: torch.Tensor, factors: list[float], g: torch.Generator) -> torch.Tensor:
    """Mean of the image and its centre zooms by each factor (ops.clipped_zoom)."""
    total = x.clone()
    for z in factors:
        total += ops.clipped_zoom(x, z)
    return total / (len(factors) + 1)


# ---- weather -----------------------------------------------------------------------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    """cv2 RGB2GRAY: 0.299 R + 0.587 G + 0.114 B, keeping a channel axis."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return (x * w[None, :, None, None]).sum(1, keepdim=True)


def snow(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """A snow layer N(mean, std) zoomed in, thresholded, 8-bit quantised and motion blurred at
    an angle in [-135, -45) degrees, added to the image twice (as is and turned by 180 degrees)
    after the image is lifted towards 1.5 gray + 0.5 with weight 1 - c[6]."""
    mean, std, zoom, threshold, radius, sigma, weight = c
    b, _, h, w = x.shape
    layer = mean + std * _normal((b, 1, h, w), g, x)
    layer = ops.clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255
    layer = ops.motion_blur(layer, radius, sigma, _uniform((b,), -135, -45, g, x))
    x = weight * x + (1 - weight) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)


def fog(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """Add c[0] times a plasma fractal (decay c[1], side the next power of two >= the image,
    cropped) and rescale by max / (max + c[0]), max over each image."""
    strength, decay = c
    b, _, h, w = x.shape
    side = 1 << (max(h, w) - 1).bit_length()
    plasma = ops.plasma_fractal(b, side, decay, g)[:, None, :h, :w].to(x)
    peak = x.amax((1, 2, 3), keepdim=True)
    return (x + strength * plasma) * peak / (peak + strength)


def brightness(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """HSV value + c, clipped to 1."""
    hsv = ops.rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return ops.hsv_to_rgb(hsv)


def spatter(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """A liquid layer N(mean, std), Gaussian blurred and thresholded. Water (c[5] == 0): the
    layer's edges (Canny 50/150), their distance map truncated at 20, box blurred, histogram
    equalised, embossed and box blurred again, times the layer, scaled to peak c[4], adds pale
    turquoise (175, 238, 238). Mud (c[5] == 1): where the thresholded layer, blurred by c[4],
    exceeds 0.8, the image is replaced by mud brown (63, 42, 20)."""
    mean, std, sigma, threshold, intensity, mud = c
    b, _, h, w = x.shape
    layer = ops.gaussian_filter(mean + std * _normal((b, 1, h, w), g, x).double(), sigma)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    if mud:
        m = ops.gaussian_filter((layer > threshold).double(), intensity)
        m = torch.where(m < 0.8, torch.zeros_like(m), m).to(x)
        color = torch.tensor([63, 42, 20], dtype=x.dtype, device=x.device)[None, :, None, None]
        return x * (1 - m) + color / 255 * m
    liquid = torch.floor(layer.clamp(0, 1) * 255)[:, 0]  # 8-bit levels (clipped, not wrapped)
    dist = ops.distance_to(ops.canny(liquid, 50, 150), 20)[:, None]
    box = torch.full((3, 3), 1 / 9, dtype=torch.float64)
    dist = torch.floor(ops.filter2d(dist, box))
    dist = ops.equalize_hist(dist[:, 0])[:, None]
    emboss = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=torch.float64)
    dist = ops.filter2d(dist, emboss).round().clamp(0, 255)
    dist = ops.filter2d(dist, box)
    m = liquid[:, None] * dist
    m = m / m.amax((2, 3), keepdim=True).clamp_min(1e-12) * intensity
    color = torch.tensor([175, 238, 238], dtype=torch.float64)[None, :, None, None] / 255
    return x + (m * color.to(m.device)).to(x)


# ---- digital -----------------------------------------------------------------------------


def contrast(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """(x - mean) c + mean, the mean per image and channel."""
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * c + mean


def saturate(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """HSV saturation * c[0] + c[1], clipped to [0, 1]."""
    hsv = ops.rgb_to_hsv(x)
    hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
    return ops.hsv_to_rgb(hsv)


def jpeg_compression(x: torch.Tensor, quality: int, g: torch.Generator) -> torch.Tensor:
    """Round to 8 bits, encode with PIL's JPEG at ``quality`` (its default 4:2:0 chroma
    subsampling, as the official code), decode."""
    u8 = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image in u8:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


def pixelate(x: torch.Tensor, factor: float, g: torch.Generator) -> torch.Tensor:
    """Box-resize to int(factor H) x int(factor W) and back (PIL BOX both ways)."""
    h, w = x.shape[-2:]
    small = ops.box_resize(x, (int(h * factor), int(w * factor)))
    return ops.box_resize(small, (h, w))


def elastic_transform(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """A random affine warp (three points around the centre moved by U(-c[2], c[2]) H, bilinear,
    OpenCV's reflect-101 border), then a displacement field: U(-1, 1) noise smoothed by a
    Gaussian of std c[1] H (truncated at 3 std, symmetric border) times c[0] H, sampled
    bilinearly with a symmetric border (scipy map_coordinates order 1, mode 'reflect')."""
    b, _, h, w = x.shape
    alpha, sigma, jitter = (v * h for v in c)
    dev = x.device
    ctr = torch.tensor([w // 2, h // 2], dtype=torch.float64)  # (x, y), as the official code
    sq = min(h, w) // 3
    src = torch.stack([ctr + sq, torch.stack([ctr[0] + sq, ctr[1] - sq]), ctr - sq])  # (3, 2)
    dst = src + _uniform((b, 3, 2), -jitter, jitter, g, x).cpu()
    # The affine map sends src to dst; each output pixel samples the input at its preimage.
    ones = torch.ones(b, 3, 1, dtype=torch.float64)
    fwd = torch.linalg.solve(torch.cat([src.expand(b, 3, 2), ones], 2), dst)  # (B, 3, 2)
    a = torch.cat([fwd.transpose(1, 2), torch.tensor([[[0, 0, 1.0]]]).expand(b, 1, 3)], 1)
    inv = torch.linalg.inv(a).to(dev)
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=dev),
        torch.arange(w, dtype=torch.float64, device=dev),
        indexing="ij",
    )
    pts = torch.stack([xx, yy, torch.ones_like(xx)], 0).reshape(3, -1)
    pre = (inv @ pts).reshape(b, 3, h, w)
    warped = ops.bilinear_sample(x.double(), pre[:, 1], pre[:, 0], "reflect101")
    noise = _uniform((b, 2, h, w), -1, 1, g, x)
    field = ops.gaussian_filter(noise, sigma, truncate=3.0, border="symmetric") * alpha
    dx, dy = field[:, 0], field[:, 1]
    return ops.bilinear_sample(warped, yy + dy, xx + dx, "symmetric").to(x.dtype)


_FUNCTIONS: dict[str, Callable[[torch.Tensor, object, torch.Generator], torch.Tensor]] = {
    name: globals()[name] for name in CORRUPTIONS
}


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator):
    """``images`` (B, 3, H, W) in [0, 1] corrupted by ``name`` at ``severity`` (1..5; 0 returns
    them unchanged), clipped to [0, 1]. Random draws come from ``generator`` (any device), so a
    seed fixes the result. The parameter table follows the size (see :func:`size_class`)."""
    if name not in CORRUPTIONS:
        reason = f" ({LEFT_OUT[name]})" if name in LEFT_OUT else ""
        raise ConfigError(f"unknown corruption {name!r}{reason}; known: {corruption_names()}")
    if severity not in range(6):
        raise ConfigError(f"corruption severity must be 0..5, got {severity}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"corrupt: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if severity == 0:
        return images
    c = params(name, severity, images.shape[-2], images.shape[-1])
    return _FUNCTIONS[name](images, c, generator).clamp(0, 1)
