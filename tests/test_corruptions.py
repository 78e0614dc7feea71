"""The common corruptions (sslzoo.eval.corruptions) against their published definitions,
restated here with plain loops, colorsys, scipy.ndimage and PIL on small images."""

from __future__ import annotations

import colorsys
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from sslzoo.eval import corruption_ops as ops
from sslzoo.eval.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    LEFT_OUT,
    corrupt,
    corruption_names,
    params,
    size_class,
)

NAMES = corruption_names()
DETERMINISTIC = {
    "defocus_blur",
    "zoom_blur",
    "gaussian_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
    "saturate",
}


def scene(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-looking test images: colour gradients, a stripe texture, a disk and a square."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        a = torch.rand(3, 4, generator=g)[..., None, None]
        img = 0.15 + 0.25 * (a[:, 0] * xx + a[:, 1] * yy) + 0.2 * a[:, 2]
        img = img + 0.08 * torch.sin(2 * math.pi * (3 + 5 * torch.rand(1, generator=g)) * (xx + yy))
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([0.5, 0.5, 0.15])).tolist()
        disk = (xx - cx - 0.25) ** 2 + (yy - cy - 0.25) ** 2 < (r + 0.1) ** 2
        img = torch.where(disk, a[:, 3], img)
        square = (xx > 0.6) & (xx < 0.85) & (yy > 0.1) & (yy < 0.35)
        out.append(torch.where(square, 1 - img, img).clamp(0.02, 0.98))
    return torch.stack(out)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return scene()


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_names_families_and_left_out():
    assert len(NAMES) == len(set(NAMES)) == 18
    assert set(NAMES) == set(CORRUPTIONS) == {n for ns in FAMILIES.values() for n in ns}
    assert CORRUPTIONS["snow"] == "weather" and CORRUPTIONS["pixelate"] == "digital"
    assert set(LEFT_OUT) == {"frost"} and "frost" not in CORRUPTIONS
    with pytest.raises(ValueError, match="frost"):
        corrupt(scene(1), "frost", 1, gen())
    with pytest.raises(ValueError, match="severity"):
        corrupt(scene(1), "snow", 6, gen())


def test_table_follows_image_size():
    assert [size_class(s, s) for s in (32, 48, 64, 96, 128, 224, 299)] == [
        "cifar",
        "cifar",
        "tiny",
        "tiny",
        "tiny",
        "imagenet",
        "imagenet",
    ]
    assert params("gaussian_noise", 5, 32, 32) == 0.10
    assert params("gaussian_noise", 5, 64, 64) == 0.18
    assert params("gaussian_noise", 5, 224, 224) == 0.38
    assert params("jpeg_compression", 1, 224, 224) == 25
    # numpy's arange keeps 1.06 in arange(1, 1.06, 0.01): seven zooms at CIFAR severity 1
    assert len(params("zoom_blur", 1, 32, 32)) == 7
    assert len(params("zoom_blur", 5, 224, 224)) == 11


def test_severity_zero_shape_range_and_seed(images):
    x = images[:2]
    for name in NAMES:
        assert corrupt(x, name, 0, gen()) is x
        y = corrupt(x, name, 3, gen(5))
        assert y.shape == x.shape and y.dtype == x.dtype, name
        assert y.min() >= 0 and y.max() <= 1, name
        assert torch.equal(y, corrupt(x, name, 3, gen(5))), name
        if name not in DETERMINISTIC:
            assert not torch.equal(y, corrupt(x, name, 3, gen(6))), name
            twins = corrupt(x[:1].expand(2, -1, -1, -1), name, 3, gen(5))
            assert not torch.equal(twins[0], twins[1]), name  # each image draws its own


# Where the published parameters do not order the severities by PSNR, the orders they do
# give (measured on this scene and on CIFAR-10 test images alike; see the module docstring).
PSNR_ORDERS = {
    "glass_blur": [(2, 4), (3, 5), (1, 4)],  # blur smooths the swaps: 3 > 2 > 1 ~ 2
    "motion_blur": [(1, 2), (2, 3), (4, 5)],  # 3 ~ 4: (6, 2) and (8, 2) differ by e^-18 taps
    "spatter": [(1, 2), (2, 3), (4, 5)],  # water at 1-3, mud at 4-5
    "saturate": [(1, 2), (3, 4), (4, 5)],  # desaturate at 1-2, oversaturate at 3-5
    "pixelate": [(1, 2), (3, 4), (4, 5), (1, 5)],  # 27 px beats 28 px on this scene only
    "elastic_transform": [],  # affine jitter shrinks while the elastic field grows
}


def test_psnr_falls_with_severity(images):
    for name in NAMES:
        p = {s: psnr(corrupt(images, name, s, gen()), images) for s in range(1, 6)}
        pairs = PSNR_ORDERS.get(name, [(s, s + 1) for s in range(1, 5)])
        for a, b in pairs:
            assert p[a] > p[b], (name, p)
        assert max(p.values()) < 48, (name, p)  # every severity changes the image


def test_noise_definitions(images):
    x = images[:2]
    c = params("gaussian_noise", 4, 32, 32)
    expected = (x + c * torch.randn(x.shape, generator=gen())).clamp(0, 1)
    torch.testing.assert_close(corrupt(x, "gaussian_noise", 4, gen()), expected)
    c = params("speckle_noise", 4, 32, 32)
    expected = (x + x * c * torch.randn(x.shape, generator=gen())).clamp(0, 1)
    torch.testing.assert_close(corrupt(x, "speckle_noise", 4, gen()), expected)
    c = params("shot_noise", 4, 32, 32)
    expected = (torch.poisson(x * c, generator=gen()) / c).clamp(0, 1)
    torch.testing.assert_close(corrupt(x, "shot_noise", 4, gen()), expected)
    c, g = params("impulse_noise", 5, 32, 32), gen()
    flip = torch.rand(x.shape, generator=g, dtype=torch.float64) < c
    salt = torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.5
    y = corrupt(x, "impulse_noise", 5, gen())
    assert torch.equal(y[flip & salt], torch.ones_like(y[flip & salt]))
    assert torch.equal(y[flip & ~salt], torch.zeros_like(y[flip & ~salt]))
    assert torch.equal(y[~flip], x[~flip]) and 0.03 < flip.double().mean() < 0.11


def test_hsv_and_contrast_definitions(images):
    x = images[:2]
    pixels = [(0, 3, 4), (1, 20, 9), (0, 30, 31), (1, 16, 16)]
    for name, edit in (
        ("brightness", lambda h, s, v, c: (h, s, min(v + c, 1))),
        ("saturate", lambda h, s, v, c: (h, min(max(s * c[0] + c[1], 0), 1), v)),
    ):
        for severity in (2, 5):
            y = corrupt(x, name, severity, gen())
            c = params(name, severity, 32, 32)
            for b, i, j in pixels:
                hsv = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                rgb = colorsys.hsv_to_rgb(*edit(*hsv, c))
                torch.testing.assert_close(y[b, :, i, j], torch.tensor(rgb), atol=1e-5, rtol=0)
    c = params("contrast", 3, 32, 32)
    mean = x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(
        corrupt(x, "contrast", 3, gen()), ((x - mean) * c + mean).clamp(0, 1)
    )


def test_gaussian_glass_and_defocus_blur_definitions(images):
    x = images[:1].double()
    sigma = params("gaussian_blur", 5, 32, 32)
    ref = np.stack(
        [ndi.gaussian_filter(ch, sigma, mode="nearest", truncate=4) for ch in x[0].double().numpy()]
    )
    torch.testing.assert_close(
        corrupt(x, "gaussian_blur", 5, gen())[0].double(), torch.from_numpy(ref), atol=1e-6, rtol=0
    )
    for radius, alias in ((1.5, 0.1), (10, 0.5)):  # the 17x17 grid and the (2r+1) grid
        half = 8 if radius <= 8 else radius
        t = np.arange(-half, half + 1)
        disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).astype(float)
        g1 = np.exp(
            -0.5 * (np.arange(-1 if radius <= 8 else -2, 2 if radius <= 8 else 3) / alias) ** 2
        )
        kernel = ndi.correlate(disk / disk.sum(), np.outer(g1, g1) / g1.sum() ** 2, mode="mirror")
        torch.testing.assert_close(ops.disk_kernel(radius, alias), torch.from_numpy(kernel))
    kernel = ops.disk_kernel(*params("defocus_blur", 5, 32, 32)).numpy()
    ref = np.stack([ndi.correlate(ch, kernel, mode="mirror") for ch in x[0].double().numpy()])
    torch.testing.assert_close(
        corrupt(x, "defocus_blur", 5, gen())[0].double(),
        torch.from_numpy(ref).clip(0, 1),
        atol=1e-6,
        rtol=0,
    )
    # glass blur = blur, 8-bit floor, the sequential swaps, blur
    sigma, d, iterations = params("glass_blur", 5, 32, 32)
    g = gen()
    offsets = [torch.randint(-d, d, (1, 30 * 30, 2), generator=g)[0] for _ in range(iterations)]
    blurred = np.stack(
        [ndi.gaussian_filter(ch, sigma, mode="nearest") for ch in x[0].double().numpy()]
    )
    swapped = sequential_swaps(np.floor(blurred * 255) / 255, d, offsets)
    ref = np.stack([ndi.gaussian_filter(ch, sigma, mode="nearest") for ch in swapped])
    torch.testing.assert_close(
        corrupt(x, "glass_blur", 5, gen())[0].double(),
        torch.from_numpy(ref).clip(0, 1),
        atol=1e-5,
        rtol=0,
    )


def sequential_swaps(img: np.ndarray, d: int, offsets: list[torch.Tensor]) -> np.ndarray:
    """ImageNet-C's glass-blur loop: bottom-right to top-left, swap with (h + dy, w + dx)."""
    img = img.copy()
    _, h, w = img.shape
    for draws in offsets:
        k = 0
        for r in range(h - d, d, -1):
            for c in range(w - d, d, -1):
                dx, dy = draws[k].tolist()
                k += 1
                a, b = img[:, r, c].copy(), img[:, r + dy, c + dx].copy()
                img[:, r, c], img[:, r + dy, c + dx] = b, a
        assert k == len(draws)
    return img


def test_pixel_swaps_replay_the_sequential_loop():
    x = torch.rand(2, 3, 11, 14, dtype=torch.float64)
    for d, iterations in ((1, 2), (2, 1), (3, 2)):
        g = gen(d)
        n = (11 - 2 * d) * (14 - 2 * d)
        draws = [torch.randint(-d, d, (2, n, 2), generator=g) for _ in range(iterations)]
        out = ops.local_pixel_swaps(x, d, iterations, gen(d))
        for b in range(2):
            ref = sequential_swaps(x[b].numpy(), d, [t[b] for t in draws])
            torch.testing.assert_close(out[b], torch.from_numpy(ref))


def test_motion_blur_is_a_one_sided_line_kernel():
    x = torch.rand(2, 3, 9, 12, dtype=torch.float64)
    radius, sigma, angles = 3, 1.5, [30.0, -100.0]
    out = ops.motion_blur(x, radius, sigma, torch.tensor(angles))
    width = 2 * radius + 1
    k = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    k /= k.sum()
    for b, a in enumerate(angles):
        ref = torch.zeros(3, 9, 12, dtype=torch.float64)
        for i in range(width):
            dr = math.ceil(i * math.sin(math.radians(a)) - 0.5)
            dc = math.ceil(i * math.cos(math.radians(a)) - 0.5)
            for r in range(9):
                for c in range(12):
                    ref[:, r, c] += k[i] * x[b, :, min(max(r + dr, 0), 8), min(max(c + dc, 0), 11)]
        torch.testing.assert_close(out[b], ref)


def test_zoom_blur_averages_scipy_zooms(images):
    x = images[:1]
    factors = params("zoom_blur", 2, 32, 32)
    img = x[0].permute(1, 2, 0).double().numpy()
    total = img.copy()
    for z in factors:
        ch = math.ceil(32 / z)
        top = (32 - ch) // 2
        zoomed = ndi.zoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
        trim = (zoomed.shape[0] - 32) // 2
        total += zoomed[trim : trim + 32, trim : trim + 32]
    ref = torch.from_numpy(total / (len(factors) + 1)).permute(2, 0, 1)
    torch.testing.assert_close(
        corrupt(x, "zoom_blur", 2, gen())[0].double(), ref, atol=1e-5, rtol=0
    )


def test_pixelate_and_jpeg_are_the_pil_round_trips(images):
    x = images[:2]
    for severity in (1, 3, 5):
        f = params("pixelate", severity, 32, 32)
        n = int(32 * f)
        y = corrupt(x, "pixelate", severity, gen())
        for b in range(2):
            for ch in range(3):
                im = Image.fromarray(x[b, ch].numpy(), "F")
                ref = np.asarray(im.resize((n, n), Image.BOX).resize((32, 32), Image.BOX))
                torch.testing.assert_close(
                    y[b, ch], torch.from_numpy(ref.copy()), atol=1e-5, rtol=0
                )
    y = corrupt(x, "jpeg_compression", 5, gen())
    for b in range(2):
        buffer = io.BytesIO()
        u8 = (x[b] * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(u8).save(buffer, "JPEG", quality=40)
        ref = torch.from_numpy(np.asarray(Image.open(buffer)).copy()).permute(2, 0, 1) / 255
        assert torch.equal(y[b], ref)


def test_elastic_transform_restated_with_scipy(images):
    x = images[:2]
    for severity in (1, 4):
        alpha, sigma, jitter = (v * 32 for v in params("elastic_transform", severity, 32, 32))
        g = gen()
        moves = torch.rand((2, 3, 2), generator=g, dtype=torch.float64) * 2 * jitter - jitter
        noise = torch.rand((2, 2, 32, 32), generator=g, dtype=torch.float64) * 2 - 1
        y = corrupt(x, "elastic_transform", severity, gen())
        yy, xx = np.mgrid[0:32, 0:32].astype(float)
        for b in range(2):
            src = np.array([[16 + 10, 16 + 10], [16 + 10, 16 - 10], [16 - 10, 16 - 10]], float)
            dst = src + moves[b].numpy()
            m = np.linalg.solve(np.c_[src, np.ones(3)], dst).T  # (2, 3): src -> dst in (x, y)
            inv = np.linalg.inv(np.r_[m, [[0, 0, 1]]])
            sx, sy = (inv @ np.stack([xx.ravel(), yy.ravel(), np.ones(1024)]))[:2]
            img = x[b].double().numpy()
            warped = [
                ndi.map_coordinates(ch, [sy, sx], order=1, mode="mirror").reshape(32, 32)
                for ch in img
            ]
            dx, dy = (
                ndi.gaussian_filter(n, sigma, mode="reflect", truncate=3) * alpha
                for n in noise[b].numpy()
            )
            ref = np.stack(
                [
                    ndi.map_coordinates(w, [yy + dy, xx + dx], order=1, mode="reflect")
                    for w in warped
                ]
            )
            torch.testing.assert_close(
                y[b].double(), torch.from_numpy(ref).clip(0, 1), atol=1e-5, rtol=0
            )


def test_fog_adds_a_normalised_plasma(images):
    x = images[:2]
    strength, decay = params("fog", 3, 32, 32)
    plasma = ops.plasma_fractal(2, 32, decay, gen())
    assert torch.allclose(plasma.amin((1, 2)), torch.zeros(2).double())
    assert torch.allclose(plasma.amax((1, 2)), torch.ones(2).double())
    # spatially coherent: neighbours differ far less than the map varies
    assert (plasma - plasma.roll(1, 2)).abs().mean() < 0.3 * plasma.std()
    peak = x.amax((1, 2, 3), keepdim=True)
    expected = ((x + strength * plasma[:, None].float()) * peak / (peak + strength)).clamp(0, 1)
    torch.testing.assert_close(corrupt(x, "fog", 3, gen()), expected)


def test_snow_and_spatter_add_their_layers(images):
    x = images[:2]
    for severity in (1, 5):
        w = params("snow", severity, 32, 32)[6]
        gray = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        lifted = w * x + (1 - w) * torch.maximum(x, gray * 1.5 + 0.5)
        y = corrupt(x, "snow", severity, gen())
        added = y - lifted.clamp(max=1)
        assert added.min() > -1e-6 and added.max() > 0.05  # snow only adds, and adds something
        inside = (y < 1).all(1, keepdim=True)  # unclipped pixels: the same (grey) amount
        spread = (added.amax(1, keepdim=True) - added.amin(1, keepdim=True))[inside]
        assert spread.max() < 1e-5
    for severity in (1, 3):  # water: pale turquoise (175, 238, 238) in proportion
        y = corrupt(x, "spatter", severity, gen())
        added = y - x
        inside = (y < 1).all(1) & (added[:, 0] > 1e-3)
        assert inside.any() and added.min() > -1e-6
        ratio = added[:, 1][inside] / added[:, 0][inside]
        torch.testing.assert_close(ratio, torch.full_like(ratio, 238 / 175), atol=1e-4, rtol=0)
    mud = torch.tensor([63, 42, 20])[None, :, None, None] / 255
    for severity in (4, 5):  # mud: each pixel moves towards mud brown by one amount m
        y = corrupt(x, "spatter", severity, gen())
        m = ((y - x) / (mud - x)).permute(1, 0, 2, 3)
        clear = ((mud - x).abs().amin(1) > 0.1).flatten()
        m = m.reshape(3, -1)[:, clear]
        moved = m[0].abs() > 1e-4
        assert moved.any() and (m[:, ~moved].abs() < 1e-4).all()
        torch.testing.assert_close(m[1:][:, moved], m[:1, moved].expand(2, -1), atol=1e-4, rtol=0)
        assert (m[0][moved] > 0.8 - 1e-4).all() and (m[0][moved] <= 1 + 1e-4).all()


def test_spatter_image_ops():
    step = torch.zeros(1, 12, 12)
    step[:, :, 6:] = 200
    edges = ops.canny(step, 50, 150)
    assert edges.any(0).any(0).nonzero().flatten().tolist() in ([5], [6])  # one column
    assert edges.sum() == 12
    assert not ops.canny(step * 0.1, 50, 150).any()  # gradient 80 per pixel: no strong seed
    mask = torch.rand(2, 10, 13, generator=gen()) < 0.05
    dist = ops.distance_to(mask, 4)
    pts = [m.nonzero().double() for m in mask]
    grid = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(13.0), indexing="ij"), -1)
    for b in range(2):
        brute = torch.cdist(grid.reshape(-1, 2).double(), pts[b]).amin(1).reshape(10, 13)
        torch.testing.assert_close(dist[b], brute.clamp(max=4))
    levels = torch.randint(3, 90, (2, 8, 8), generator=gen()).double()
    out = ops.equalize_hist(levels)
    for b in range(2):
        v = levels[b].flatten()
        lowest, n_low = v.min(), (v == v.min()).sum()
        scale = 255 / float(64 - n_low)
        expected = [round(float(((v > lowest) & (v <= k)).sum()) * scale) for k in v]
        assert out[b].flatten().tolist() == expected


def test_larger_tables_run_on_their_sizes():
    x = scene(2, 64)
    y = corrupt(x, "glass_blur", 5, gen())
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and psnr(y, x) < 40
    x = scene(1, 224)
    for name in ("elastic_transform", "spatter", "motion_blur"):
        y = corrupt(x, name, 1, gen())
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and psnr(y, x) < 40, name
