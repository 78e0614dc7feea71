"""The official SimCLR / BYOL colour jitter ops (sslzoo.augment.tf_color) against their
definitions written out: TensorFlow's adjust_contrast (each channel around its mean), HSV
saturation and hue (Python's colorsys as the reference HSV), BYOL's additive brightness, the
clip after every op, and the per-sample random order; the PIL step against the device op."""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from sslzoo.augment import ops
from sslzoo.augment.params import jitter_params
from sslzoo.augment.tf_color import (
    add_brightness,
    adjust_contrast_per_channel,
    adjust_saturation_hsv,
    color_ranges,
    tf_color_jitter,
)
from sslzoo.augment.tf_recipe import TensorColorJitter
from sslzoo.methods.byol import BYOL
from sslzoo.methods.simclr import SimCLR
from tests.augment_helpers import ATOL, MEAN, STD, smooth_images
from tests.conftest import TINY_RESNET


def range_tensors(color_ops: str, *strengths: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high ends of the four jitter parameters."""
    ranges = color_ranges(color_ops, *strengths)
    return torch.tensor([lo for lo, _ in ranges]), torch.tensor([hi for _, hi in ranges])


def hsv_map(image: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001
    """Apply ``fn(h, s, v) -> (h, s, v)`` to every pixel of a (3, H, W) image via colorsys."""
    out = torch.empty_like(image, dtype=torch.float64)
    for i, j in itertools.product(range(image.shape[1]), range(image.shape[2])):
        h, s, v = colorsys.rgb_to_hsv(*image[:, i, j].double().tolist())
        out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb(*fn(h, s, v)))
    return out.float()


def test_contrast_moves_each_channel_around_its_own_mean() -> None:
    x = smooth_images(3, 6, 7, seed=1)
    factor = torch.tensor([0.2, 1.0, 1.8])
    out = adjust_contrast_per_channel(x, factor)
    for i in range(3):
        mean = x[i].mean(dim=(1, 2), keepdim=True)
        expected = ((x[i] - mean) * factor[i] + mean).clamp(0, 1)
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)
    # unlike torchvision's blend towards the luma mean, the channel balance is kept
    assert not torch.allclose(out[0], ops.adjust_contrast(x[:1], factor[:1])[0], atol=1e-3)


def test_saturation_scales_s_in_hsv_and_clips_it() -> None:
    x = smooth_images(3, 5, 6, seed=2)
    x[0, :, 0, 0] = 0.5  # a grey pixel, which no saturation factor changes
    factor = torch.tensor([0.3, 1.6, 4.0])
    out = adjust_saturation_hsv(x, factor)
    for i in range(3):
        f = float(factor[i])
        expected = hsv_map(x[i], lambda h, s, v, f=f: (h, min(s * f, 1.0), v))
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)
    assert torch.equal(out[:, :, 0, 0][0], x[0, :, 0, 0])


def test_hue_is_the_hsv_rotation() -> None:
    x = smooth_images(2, 5, 4, seed=3)
    delta = torch.tensor([-0.2, 0.15])
    out = ops.adjust_hue(x, delta)
    for i in range(2):
        d = float(delta[i])
        expected = hsv_map(x[i], lambda h, s, v, d=d: ((h + d) % 1.0, s, v))
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)


def test_byol_brightness_adds_a_shift_in_plus_minus_b() -> None:
    x = smooth_images(2, 4, 4, seed=4)
    delta = torch.tensor([-0.3, 0.25])
    out = add_brightness(x, delta)
    torch.testing.assert_close(out, (x + delta[:, None, None, None]).clamp(0, 1))
    assert color_ranges("byol", 0.4, 0.4, 0.2, 0.1)[0] == (-0.4, 0.4)
    assert color_ranges("simclr", 0.8, 0.8, 0.8, 0.2)[0] == pytest.approx((0.2, 1.8))
    low, high = range_tensors("byol", 0.4, 0.4, 0.2, 0.1)
    factors, _ = jitter_params(20_000, low, high, torch.Generator().manual_seed(0))
    shift = factors[:, 0]
    assert -0.4 <= float(shift.min()) < -0.39 and 0.39 < float(shift.max()) <= 0.4
    assert abs(float(shift.mean())) < 0.01  # U(-0.4, 0.4): mean 0, standard error 0.002


def reference_jitter(image: torch.Tensor, params: list[float], order: list[int], byol: bool):  # noqa: ANN201
    """One image through the four ops in ``order``, each clipped to [0, 1], as
    ``color_jitter_rand`` (SimCLR) and ``_color_jitter`` (BYOL) do."""
    b, c, s, h = params
    x = image.double()
    for op in order:
        if op == 0:
            x = x + b if byol else x * b
        elif op == 1:
            mean = x.mean(dim=(1, 2), keepdim=True)
            x = (x - mean) * c + mean
        elif op == 2:
            x = hsv_map(x, lambda hh, ss, vv: (hh, min(ss * s, 1.0), vv)).double()
        else:
            x = hsv_map(x, lambda hh, ss, vv: ((hh + h) % 1.0, ss, vv)).double()
        x = x.clamp(0.0, 1.0)
    return x.float()


@pytest.mark.parametrize("color_ops", ["simclr", "byol"])
def test_jitter_applies_each_samples_ops_in_its_own_order(color_ops: str) -> None:
    n = 6
    x = smooth_images(n, 5, 5, seed=5)
    low, high = range_tensors(color_ops, 0.8, 0.8, 0.8, 0.2)
    factors, order = jitter_params(n, low, high, torch.Generator().manual_seed(1))
    apply = torch.tensor([True, True, True, True, True, False])
    out = tf_color_jitter(x, factors, order, apply, color_ops)
    assert len({tuple(o) for o in order.tolist()}) > 1  # the orders differ between samples
    for i in range(n - 1):
        expected = reference_jitter(
            x[i], factors[i].tolist(), order[i].tolist(), color_ops == "byol"
        )
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    assert torch.equal(out[-1], x[-1])


def test_pil_step_is_the_device_jitter_of_the_image() -> None:
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    step = TensorColorJitter((0.4, 0.4, 0.2, 0.1), prob=1.0, color_ops="byol")
    torch.manual_seed(3)
    out = torch.from_numpy(np.array(step(image))).permute(2, 0, 1).float()
    torch.manual_seed(3)
    torch.rand(1)  # the application draw
    low, high = range_tensors("byol", 0.4, 0.4, 0.2, 0.1)
    factors, order = jitter_params(1, low, high)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    expected = reference_jitter(x, factors[0].tolist(), order[0].tolist(), byol=True) * 255
    assert (out - expected.round()).abs().max() <= 1.0
    assert TensorColorJitter((0.4, 0.4, 0.2, 0.1), prob=0.0)(image) is image


@pytest.mark.parametrize(
    "model, color_ops, strengths",
    [
        (SimCLR(**TINY_RESNET, proj_hidden_dim=8, sync_batchnorm=False), "simclr",
         (0.8, 0.8, 0.8, 0.2)),
        (BYOL(**TINY_RESNET, projector_hidden_dim=8, predictor_hidden_dim=8,
              sync_batchnorm=False), "byol", (0.4, 0.4, 0.2, 0.1)),
    ],
    ids=["SimCLR", "BYOL"],
)  # fmt: skip
def test_methods_jitter_with_their_official_ops(model, color_ops, strengths) -> None:  # noqa: ANN001
    for view in model.views.pil(32, MEAN, STD).transforms:
        (step,) = [s for s in view.transform.transforms if isinstance(s, TensorColorJitter)]
        assert step.color_ops == color_ops and step.prob == 0.8
        assert step.jitter == pytest.approx(strengths)
    for recipe in model.views.device(32, MEAN, STD).recipes:
        assert recipe.color_ops == color_ops
        assert recipe.jitter == pytest.approx(strengths)
