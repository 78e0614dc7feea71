"""The official SimCLR and BYOL crop resizing and blur (sslzoo.augment.tf_recipe).

lightly's SimCLR and BYOL views are right for lightly's benchmark protocol (which the CIFAR-10
configs follow), and SimCLR's recipe with torchvision's crop sampler and colour ops, bilinear
crops and no blur kernel (``blur_kernel_fraction=None``) gives exactly lightly's views. They are
not the official recipes: tf2/data_util.py and byol/utils/dataset.py resize crops bicubically,
and both blur with a Gaussian of 2 int(size / 20) + 1 taps as a zero-padded SAME convolution,
where lightly uses PIL's ``GaussianBlur(radius=sigma)``. So the methods default to the
official steps.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.transforms import SimCLRTransform
from PIL import Image

from sslzoo.augment import ops
from sslzoo.augment.tf_recipe import KernelGaussianBlur, kernel_taps
from sslzoo.methods.byol import BYOL
from sslzoo.methods.mocov3 import MoCoV3
from sslzoo.methods.simclr import SimCLR
from tests.augment_helpers import (
    ATOL,
    MEAN,
    STD,
    Z_MAX,
    read_cifar_sample,
    similar,
    smooth_images,
    view_statistics,
    z_score,
)
from tests.conftest import TINY_RESNET

HEADS = dict(proj_hidden_dim=8, proj_out_dim=8)  # SimCLR
BYOL_HEADS = dict(projector_hidden_dim=8, projector_out_dim=8, predictor_hidden_dim=8)


def official_blur(image: torch.Tensor, sigma: float, kernel_size: float) -> torch.Tensor:
    """tf2/data_util.py ``gaussian_blur`` written out: radius = int(kernel_size / 2), taps
    exp(-x^2 / (2 sigma^2)) normalised to sum 1, a depthwise SAME (zero-padded) convolution
    along rows, then along columns."""
    radius = int(kernel_size / 2)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-(x**2) / (2.0 * sigma**2))
    taps = taps / taps.sum()
    c = image.shape[0]
    out = image[None].double()
    out = F.conv2d(out, taps.view(1, 1, 1, -1).repeat(c, 1, 1, 1), padding=(0, radius), groups=c)
    out = F.conv2d(out, taps.view(1, 1, -1, 1).repeat(c, 1, 1, 1), padding=(radius, 0), groups=c)
    return out[0].float()


def test_zero_padded_blur_is_the_official_same_convolution() -> None:
    x = smooth_images(4, 20, 24, seed=3)
    sigma = torch.tensor([0.1, 0.8, 1.5, 2.0])
    for kernel_size in (2.0, 5.0, 13.0, 22.4, 45.0):  # 45 taps: wider than the image
        taps = 2 * int(kernel_size / 2) + 1
        out = ops.gaussian_blur(x, sigma, taps, padding="zeros")
        for i in range(len(x)):
            expected = official_blur(x[i], float(sigma[i]), kernel_size)
            torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)
    # zero padding darkens the border of a white image, reflect padding does not
    white = torch.ones(1, 3, 16, 16)
    zeros = ops.gaussian_blur(white, torch.tensor([2.0]), 9, padding="zeros")
    reflect = ops.gaussian_blur(white, torch.tensor([2.0]), 9, padding="reflect")
    assert float(zeros[0, 0, 0, 0]) < 0.5 and float(zeros[0, 0, 8, 8]) == pytest.approx(1.0)
    torch.testing.assert_close(reflect, white)


def test_kernel_taps_follow_both_official_formulas() -> None:
    for size in range(4, 400):
        simclr = 2 * int((size // 10) / 2) + 1  # kernel_size=height//10, radius int(k / 2)
        byol = 2 * int((size / 10.0) / 2) + 1  # kernel_size=H / blur_divider
        assert kernel_taps(size, 0.1) == simclr == byol, size
    assert kernel_taps(224, 0.1) == 23 and kernel_taps(96, 0.1) == 9


def mode(crop) -> str:  # noqa: ANN001
    """A crop's interpolation (torchvision v2 keeps a string or the enum it was given)."""
    return getattr(crop.interpolation, "value", crop.interpolation)


def crop_and_blur_steps(view) -> tuple:  # noqa: ANN001
    steps = view.transform.transforms
    crop = next(s for s in steps if "ResizedCrop" in type(s).__name__)
    blur = next(s for s in steps if "GaussianBlur" in type(s).__name__)
    return crop, blur


@pytest.mark.parametrize(
    "model",
    [
        SimCLR(**TINY_RESNET, **HEADS, sync_batchnorm=False),
        BYOL(**TINY_RESNET, **BYOL_HEADS, sync_batchnorm=False),
    ],
    ids=["SimCLR", "BYOL"],
)
def test_official_views_resize_bicubically_and_blur_with_a_tenth_of_the_side(model) -> None:  # noqa: ANN001
    for view in model.views.pil(224, MEAN, STD).transforms:
        crop, blur = crop_and_blur_steps(view)
        assert mode(crop) == "bicubic"
        assert isinstance(blur, KernelGaussianBlur)
        assert (blur.kernel_size, blur.padding, blur.sigmas) == (23, "zeros", (0.1, 2.0))
    for recipe in model.views.device(224, MEAN, STD).recipes:
        assert recipe.interpolation == "bicubic" and recipe.blur_padding == "zeros"
        assert recipe.kernel_size(224, 224) == 23


def test_mocov3_keeps_torchvisions_bilinear_crop_and_pil_blur() -> None:
    """MoCo v3's official views are torchvision's RandomResizedCrop (bilinear) and PIL's blur,
    which lightly's views are."""
    model = MoCoV3(**TINY_RESNET, moco_mlp_dim=8, sync_batchnorm=False)
    for view in model.views.pil(224, MEAN, STD).transforms:
        crop, blur = crop_and_blur_steps(view)
        assert mode(crop) == "bilinear"
        assert type(blur).__name__ == "GaussianBlur"
    for recipe in model.views.device(224, MEAN, STD).recipes:
        assert (recipe.interpolation, recipe.blur_padding) == ("bilinear", "reflect")


def test_pil_blur_step_is_the_official_blur_of_the_image() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8))
    step = KernelGaussianBlur(5, (0.5, 1.5), prob=1.0, padding="zeros")
    torch.manual_seed(7)
    out = torch.from_numpy(np.array(step(image))).permute(2, 0, 1).float()
    torch.manual_seed(7)
    torch.rand(())  # the application draw
    sigma = float(torch.empty(1).uniform_(0.5, 1.5))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    expected = (official_blur(x, sigma, 5.0) * 255).round()
    assert (out - expected).abs().max() <= 1.0  # one grey level: float rounding at .5
    assert KernelGaussianBlur(5, (0.5, 1.5), prob=0.0)(image) is image


def test_lightly_settings_give_exactly_lightlys_simclr_views() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), np.uint8))
    normalize = {"mean": list(MEAN), "std": list(STD)}
    lightly = SimCLRTransform(input_size=32, normalize=normalize)
    model = SimCLR(**TINY_RESNET, **HEADS, sync_batchnorm=False)
    ours = model.views.replace(
        crop_sampler="torchvision", crop_interpolation="bilinear", blur_kernel_fraction=None,
        color_ops="torchvision",
    ).pil(32, MEAN, STD)  # fmt: skip
    official = model.views.pil(32, MEAN, STD)
    views = {}
    for name, transform in [("lightly", lightly), ("ours", ours), ("official", official)]:
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        views[name] = torch.stack([torch.stack(transform(image)) for _ in range(8)])
    torch.testing.assert_close(views["ours"], views["lightly"], atol=0, rtol=0)
    assert not torch.allclose(views["official"], views["lightly"])


def border_darkening(views: torch.Tensor) -> torch.Tensor:
    """Per view: mean of the interior minus mean of the one-pixel frame, in [0, 1] units."""
    x = views * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    frame = torch.ones(x.shape[-2:], dtype=torch.bool)
    frame[1:-1, 1:-1] = False
    return x[..., ~frame].mean((1, 2)) - x[..., frame].mean((1, 2))


def pil_views(transform, images: np.ndarray) -> list[torch.Tensor]:  # noqa: ANN001
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    views = [transform(Image.fromarray(im)) for im in images]
    return [torch.stack([v[k] for v in views]) for k in range(len(views[0]))]


def device_views(transform, images: np.ndarray) -> list[torch.Tensor]:  # noqa: ANN001
    torch.manual_seed(0)
    return transform(torch.from_numpy(images).permute(0, 3, 1, 2))


@pytest.mark.parametrize("method", [SimCLR, BYOL])
def test_official_device_views_blur_as_the_pil_views(method) -> None:  # noqa: ANN001
    """Both pipelines blur every view (colour steps off) with 3 taps at 32 px, zero padded:
    their views have the same statistics, the same darker border, and reflect padding on the
    device is told apart by the border."""
    heads = HEADS if method is SimCLR else BYOL_HEADS
    official = method(**TINY_RESNET, **heads, sync_batchnorm=False).views
    views = official.replace(
        color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(1.0, 1.0), solarize_prob=(0.0, 0.0)
    )
    images = read_cifar_sample()
    pil = pil_views(views.pil(32, MEAN, STD), images)
    device = device_views(views.device(32, MEAN, STD), images)
    stats = [view_statistics(v) for v in pil], [view_statistics(v) for v in device]
    assert similar(*stats)
    reflect = device_views(views.replace(blur_padding="reflect").device(32, MEAN, STD), images)
    for a, b, c in zip(pil, device, reflect, strict=True):
        darker = border_darkening(a)
        assert float(darker.mean()) > 0.02  # the zero padding shows
        assert abs(float(z_score(darker[:, None], border_darkening(b)[:, None]))) < Z_MAX
        assert float(z_score(darker[:, None], border_darkening(c)[:, None])) > Z_MAX


@pytest.mark.parametrize("method", [SimCLR, BYOL])
def test_official_device_views_have_the_statistics_of_the_pil_views(method) -> None:  # noqa: ANN001
    """Every official step on (bicubic crop, TensorFlow colour ops, zero-padded blur): the
    device views and the PIL views agree in distribution."""
    heads = HEADS if method is SimCLR else BYOL_HEADS
    settings = {"color_jitter_strength": 0.5} if method is SimCLR else {}
    views = method(**TINY_RESNET, **heads, sync_batchnorm=False).views.replace(**settings)
    images = read_cifar_sample()
    pil = pil_views(views.pil(32, MEAN, STD), images)
    device = device_views(views.device(32, MEAN, STD), images)
    assert similar([view_statistics(v) for v in pil], [view_statistics(v) for v in device])
    if method is SimCLR:
        return
    # the check has power: BYOL's views with torchvision's jitter ops are told apart
    # (SimCLR's, whose brightness is torchvision's, are not by these statistics)
    lightly_ops = views.replace(color_ops="torchvision")
    other = device_views(lightly_ops.device(32, MEAN, STD), images)
    assert not similar([view_statistics(v) for v in pil], [view_statistics(v) for v in other])
