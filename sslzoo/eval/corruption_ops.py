"""Batched image operations the common corruptions are built from (:mod:`.corruptions`).

Each one restates, in torch and for a (B, C, H, W) batch, the library call the official
ImageNet-C / CIFAR-10-C code makes (scipy/skimage Gaussian filters, OpenCV filters, Canny and
histogram equalisation, ImageMagick's motion blur, scipy's zoom, PIL's box resize); the
docstrings name the call and say where the restatement differs.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BORDERS = ("nearest", "symmetric", "reflect101")


def pad_index(n: int, before: int, after: int, border: str, device: torch.device) -> torch.Tensor:
    """Source index of each position of ``range(-before, n + after)`` under a border rule:
    ``nearest`` (edge repeated; scipy 'nearest', OpenCV BORDER_REPLICATE), ``symmetric``
    (``dcba|abcd``; scipy 'reflect') or ``reflect101`` (``dcb|abcd``; OpenCV's default).
    Works for any padding width, folding as often as needed."""
    i = torch.arange(-before, n + after, device=device)
    if border == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    if border == "symmetric":
        m = i.remainder(2 * n)
        return torch.where(m >= n, 2 * n - 1 - m, m)
    if border == "reflect101":
        m = i.remainder(2 * n - 2)
        return torch.where(m >= n, 2 * n - 2 - m, m)
    raise ValueError(f"border must be one of {BORDERS}, got {border!r}")


def pad2d(x: torch.Tensor, r: int, border: str) -> torch.Tensor:
    """Pad the last two dimensions by ``r`` on every side under ``border`` (see pad_index)."""
    rows = pad_index(x.shape[-2], r, r, border, x.device)
    cols = pad_index(x.shape[-1], r, r, border, x.device)
    return x[..., rows[:, None], cols[None, :]]


def gaussian_kernel1d(sigma: float, radius: int, dtype=torch.float64) -> torch.Tensor:
    """Normalised samples of exp(-t^2 / 2 sigma^2) at t = -radius..radius."""
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def filter1d(x: torch.Tensor, kernel: torch.Tensor, dim: int, border: str) -> torch.Tensor:
    """Correlate axis ``dim`` (-1 or -2) of ``x`` with an odd 1-D kernel under ``border``.

    Applied as an (n, n) matrix (padding folded in), so a kernel wider than the image, as
    ImageNet-C's elastic transform draws, costs no more than a narrow one."""
    n, r = x.shape[dim], kernel.numel() // 2
    src = pad_index(n, r, r, border, x.device).unfold(0, 2 * r + 1, 1)  # (n, 2r + 1)
    matrix = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    matrix.scatter_add_(1, src, kernel.to(x.device, torch.float64).expand(n, -1).contiguous())
    matrix = matrix.to(x.dtype)
    return x @ matrix.T if dim == -1 else matrix @ x


def gaussian_filter(
    x: torch.Tensor, sigma: float, truncate: float = 4.0, border: str = "nearest"
) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter over the last two axes (what ``skimage.filters.gaussian``
    calls, channels left alone): radius ``int(truncate * sigma + 0.5)``; sigma 0 is identity."""
    if sigma <= 0:
        return x
    kernel = gaussian_kernel1d(sigma, int(truncate * sigma + 0.5))
    return filter1d(filter1d(x, kernel, -1, border), kernel, -2, border)


def filter2d(x: torch.Tensor, kernel: torch.Tensor, border: str = "reflect101") -> torch.Tensor:
    """cv2.filter2D: correlate every channel with a square odd kernel (anchor at its centre)."""
    r = kernel.shape[-1] // 2
    shape = x.shape
    flat = pad2d(x.reshape(-1, 1, *shape[-2:]), r, border)
    return F.conv2d(flat, kernel.to(x)[None, None]).reshape(shape)


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The defocus kernel of ImageNet-C: the indicator of x^2 + y^2 <= radius^2 on the grid
    -8..8 (or -radius..radius beyond 8), normalised, then smoothed by cv2.GaussianBlur with a
    3x3 (5x5 beyond radius 8) kernel of std ``alias_blur`` (BORDER_REFLECT_101)."""
    half, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    g = gaussian_kernel1d(alias_blur, ksize // 2)
    return filter1d(filter1d(disk, g, -1, "reflect101"), g, -2, "reflect101")


def motion_blur(x: torch.Tensor, radius: float, sigma: float, angle: torch.Tensor) -> torch.Tensor:
    """ImageMagick's MotionBlurImage(radius, sigma, angle) on each image of a batch.

    Width ``2 * ceil(radius) + 1`` taps of a one-sided Gaussian exp(-i^2 / 2 sigma^2), tap i
    reading the pixel ``(round(i sin a), round(i cos a))`` rows/columns away (round = ceil(v -
    0.5)), edge pixels repeated outside the image; ``angle`` (B,) in degrees, one per image.
    Differs from Wand only by working in float (ImageMagick rounds to 8 bits at the end)."""
    b, _, h, w = x.shape
    width = 2 * math.ceil(radius) + 1
    weights = gaussian_kernel1d(sigma, width - 1)[width - 1 :].to(x)
    weights = weights / weights.sum()
    a = torch.deg2rad(angle.double()).to(x.device)
    steps = torch.arange(width, device=x.device, dtype=torch.float64)
    dr = torch.ceil(steps[:, None] * torch.sin(a)[None] - 0.5).long()  # (width, B)
    dc = torch.ceil(steps[:, None] * torch.cos(a)[None] - 0.5).long()
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    flat = x.reshape(b, x.shape[1], h * w)
    out = torch.zeros_like(flat)
    for i in range(width):
        r = (rows[None, :] + dr[i][:, None]).clamp(0, h - 1)  # (B, H)
        c = (cols[None, :] + dc[i][:, None]).clamp(0, w - 1)  # (B, W)
        idx = (r[:, :, None] * w + c[:, None, :]).reshape(b, 1, h * w).expand_as(flat)
        out += weights[i] * flat.gather(2, idx)
    return out.reshape(x.shape)


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by ``factor`` keeping the size (ImageNet-C's clipped_zoom): crop
    the central ceil(H / factor) x ceil(W / factor), scipy.ndimage.zoom(order=1) it by
    ``factor`` (output round(size * factor), corners aligned) and crop the centre back."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    oh, ow = round(ch * factor), round(cw * factor)
    shape = crop.shape
    zoomed = F.interpolate(
        crop.reshape(-1, 1, ch, cw), size=(oh, ow), mode="bilinear", align_corners=True
    ).reshape(*shape[:-2], oh, ow)
    t, lft = (oh - h) // 2, (ow - w) // 2
    return zoomed[..., t : t + h, lft : lft + w]


def plasma_fractal(
    n: int, mapsize: int, wibbledecay: float, generator: torch.Generator
) -> torch.Tensor:
    """``n`` diamond-square height maps (mapsize a power of two) scaled to [0, 1], as ImageNet-C's
    plasma_fractal: each new point is the mean of its four parents plus wibble * U(-wibble,
    wibble), wibble starting at 100 and divided by ``wibbledecay`` per level; maps wrap around."""
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        u = torch.rand(total.shape, generator=generator, device=generator.device)
        return total / 4 + wibble * (u.double().cpu() * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        total = corners + corners.roll(-1, 1)
        total = total + total.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(total)
        centres, corners = m[:, half::step, half::step], m[:, ::step, ::step]
        left = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        m[:, ::step, half::step] = wibbled_mean(left)
        top = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        m[:, half::step, ::step] = wibbled_mean(top)
        step //= 2
        wibble /= wibbledecay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def bilinear_sample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, border: str):
    """Bilinear interpolation of ``x`` (B, C, H, W) at fractional ``rows``/``cols`` (B, H', W'),
    the four neighbours of a point outside the image read through ``border`` (pad_index); the
    order-1 case of scipy's map_coordinates and of cv2.warpAffine's INTER_LINEAR."""
    b, c, h, w = x.shape
    r0, c0 = rows.floor(), cols.floor()
    fr, fc = (rows - r0)[:, None], (cols - c0)[:, None]
    big = 2 * max(h, w) + 2  # enough folding for any displacement the corruptions draw
    rmap = pad_index(h, big, big, border, x.device)
    cmap = pad_index(w, big, big, border, x.device)
    r0, c0 = r0.long().clamp(-big, h + big - 2), c0.long().clamp(-big, w + big - 2)
    flat = x.reshape(b, c, h * w)

    def at(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        idx = (rmap[r + big] * w + cmap[q + big]).reshape(b, 1, -1).expand(b, c, -1)
        return flat.gather(2, idx).reshape(b, c, *rows.shape[1:])

    top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
    bottom = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
    return top * (1 - fr) + bottom * fr


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """skimage.color.rgb2hsv on (B, 3, H, W): hue in [0, 1), 0 where the pixel is grey."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    d = delta.clamp_min(1e-12)
    h = (g - b) / d
    h = torch.where(g == v, 2.0 + (b - r) / d, h)
    h = torch.where(b == v, 4.0 + (r - g) / d, h)
    h = torch.where(delta == 0, torch.zeros_like(h), (h / 6.0).remainder(1.0))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """skimage.color.hsv2rgb on (B, 3, H, W)."""
    h, s, v = x.unbind(1)
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = hi.long().remainder(6)[:, None].expand(-1, 3, -1, -1)
    table = torch.stack(
        [
            torch.stack(c, 1)
            for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
        ]
    )  # (6, B, 3, H, W)
    return table.gather(0, sector[None]).squeeze(0)


@functools.lru_cache(maxsize=32)
def box_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """PIL's BOX resampling along one axis as an (n_out, n_in) matrix: output pixel j averages,
    with equal weights, the input pixels whose centres fall in its footprint [j s, (j + 1) s)
    (s = n_in / n_out; upsampling takes the one input pixel under the output's centre)."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    pos = (torch.arange(n_in, dtype=torch.float64) + 0.5)[None] - centre[:, None]
    inside = ((pos >= -support) & (pos < support)).double()
    return inside / inside.sum(1, keepdim=True)


def box_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the last two axes of ``x`` to ``size`` with PIL's BOX filter (in float)."""
    rows = box_resize_matrix(x.shape[-2], size[0]).to(x)
    cols = box_resize_matrix(x.shape[-1], size[1]).to(x)
    return rows @ x @ cols.T


def local_pixel_swaps(
    x: torch.Tensor, max_delta: int, iterations: int, generator: torch.Generator
) -> torch.Tensor:
    """Glass blur's pixel shuffle, exactly: for each pixel (h, w) with d < h <= H - d, d < w <=
    W - d, visited bottom-right to top-left, swap it with (h + dy, w + dx), dx, dy uniform in
    [-d, d - 1] (numpy's randint(-d, d)); repeated ``iterations`` times.

    The sequential swaps are replayed in wavefronts: pixel (h, w) goes in wave 2d (H - d - h) +
    (W - d - w), so the swaps of one wave touch disjoint pixels and every pair of swaps that
    share a pixel keeps its original order. Done on an index map, then gathered once."""
    b, c, h, w = x.shape
    d = max_delta
    positions, order, bounds = _swap_waves(h, w, d)
    positions, order = positions.to(x.device), order.to(x.device)
    perm = torch.arange(h * w, device=x.device).repeat(b, 1)
    for _ in range(iterations):
        offsets = torch.randint(
            -d, d, (b, order.numel(), 2), generator=generator, device=generator.device
        ).to(x.device)  # (dx, dy) per visited pixel, in visiting order
        partners = positions + (offsets[..., 1] * w + offsets[..., 0])[:, order]
        for start, stop in bounds:
            p = positions[:, start:stop].expand(b, -1)
            q = partners[:, start:stop]
            vp, vq = perm.gather(1, p), perm.gather(1, q)
            perm.scatter_(1, p, vq)
            perm.scatter_(1, q, vp)
    return x.reshape(b, c, h * w).gather(2, perm[:, None].expand(-1, c, -1)).reshape(x.shape)


@functools.lru_cache(maxsize=16)
def _swap_waves(h: int, w: int, d: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The visited pixels sorted by wave: flat positions (1, N), their indices in the visiting
    order (N,), and each wave's [start, stop) in that sorted list."""
    n_rows, n_cols = max(h - 2 * d, 0), max(w - 2 * d, 0)
    r = torch.arange(n_rows)[:, None].expand(n_rows, n_cols).reshape(-1)  # visiting order
    k = torch.arange(n_cols)[None, :].expand(n_rows, n_cols).reshape(-1)
    wave = 2 * d * r + k
    order = torch.argsort(wave, stable=True)
    positions = ((h - d - r) * w + (w - d - k))[order][None]
    counts = torch.bincount(wave).tolist() if wave.numel() else []
    ends = torch.tensor(counts).cumsum(0).tolist() if counts else []
    bounds = [(e - n, e) for n, e in zip(counts, ends, strict=True) if n]
    return positions, order, bounds


def canny(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(image, low, high) (3x3 Sobel with edge pixels repeated, L1 magnitude) on 8-bit
    valued images (B, H, W); returns a bool edge map. Non-maximum suppression along the
    gradient direction binned at 22.5 / 67.5 degrees, as OpenCV; hysteresis grows the strong
    edges (magnitude > high) through 8-connected candidates (> low) until nothing changes."""
    p = pad2d(x.double()[:, None], 1, "nearest")[:, 0]
    sm = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # vertical smoothing, (B, H, W + 2)
    gx = sm[..., 2:] - sm[..., :-2]
    sm = p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]  # (B, H + 2, W)
    gy = sm[:, 2:] - sm[:, :-2]
    mag = gx.abs() + gy.abs()
    m = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape[-2:]

    def nb(dr: int, dc: int) -> torch.Tensor:
        return m[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]

    ax, ay = gx.abs(), gy.abs()
    tan22 = math.tan(math.radians(22.5))
    horizontal = ay < ax * tan22
    vertical = ~horizontal & (ay > ax * (tan22 + 2))
    s = torch.where((gx < 0) ^ (gy < 0), -1, 1)
    diag_keep = torch.where(
        s > 0, (mag > nb(-1, -1)) & (mag > nb(1, 1)), (mag > nb(-1, 1)) & (mag > nb(1, -1))
    )
    keep = torch.where(
        horizontal,
        (mag > nb(0, -1)) & (mag >= nb(0, 1)),
        torch.where(vertical, (mag > nb(-1, 0)) & (mag >= nb(1, 0)), diag_keep),
    )
    candidate = keep & (mag > low)
    edges = candidate & (mag > high)
    while True:
        grown = F.max_pool2d(edges[:, None].double(), 3, 1, 1)[:, 0] > 0
        grown = grown & candidate
        if torch.equal(grown, edges):
            return edges
        edges = grown


def distance_to(mask: torch.Tensor, cap: int) -> torch.Tensor:
    """Euclidean distance of every pixel to the nearest True pixel of ``mask`` (B, H, W),
    truncated at ``cap`` (cv2.distanceTransform then threshold(..., cap, THRESH_TRUNC)).
    Exact (two separable passes over offsets -cap..cap); OpenCV's 5x5 mask is a chamfer
    approximation of the same distance."""
    inf = float(4 * cap * cap + 1)
    f = torch.where(mask, 0.0, inf).double()
    for dim in (-1, -2):
        n = f.shape[dim]
        best = f.clone()
        for k in range(1, min(cap, n - 1) + 1):
            shifted = torch.full_like(f, inf)
            shifted.narrow(dim, 0, n - k).copy_(f.narrow(dim, k, n - k))
            best = torch.minimum(best, shifted + k * k)
            shifted = torch.full_like(f, inf)
            shifted.narrow(dim, k, n - k).copy_(f.narrow(dim, 0, n - k))
            best = torch.minimum(best, shifted + k * k)
        f = best
    return f.sqrt().clamp(max=cap)


def equalize_hist(x: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist on 8-bit valued images (B, H, W): the lowest occupied level maps to 0,
    level k to round(255 * (#pixels in (lowest, k]) / (#pixels above the lowest level))."""
    b = x.shape[0]
    levels = x.reshape(b, -1).long()
    hist = torch.zeros(b, 256, dtype=torch.float64, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float64))
    lowest = (hist > 0).double().argmax(1, keepdim=True)
    first = hist.gather(1, lowest)
    total = float(levels.shape[1])
    scale = 255.0 / (total - first).clamp_min(1)
    lut = ((hist.cumsum(1) - first) * scale).round().clamp(0, 255)
    lut = torch.where(first == total, lowest.double().expand(-1, 256), lut)
    return lut.gather(1, levels).reshape(x.shape).to(x.dtype)
