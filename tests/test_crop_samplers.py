"""The official SimCLR and BYOL crop samplers (sslzoo.augment.params) against scalar versions
written out from the official code, fed the same uniform draws: TensorFlow's
``GenerateRandomCrop`` and ``SampleDistortedBoundingBox`` loop (sample_distorted_bounding_box_op.cc)
for SimCLR, and ``_decode_and_random_crop`` (byol/utils/dataset.py) for BYOL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sslzoo.augment.crops import SampledResizedCrop
from sslzoo.augment.params import byol_crop_boxes, crop_boxes, simclr_crop_boxes

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def tf_crop(u: list[list[float]], height: int, width: int, scale, ratio, min_covered=0.1):  # noqa: ANN001, ANN201
    """(top, left, h, w) of one sample; ``u[i]`` = attempt i's (ratio, height, y, x) uniforms;
    ``Uniform(k)`` is floor(u k), lrintf is round half to even."""
    min_area, max_area = scale[0] * width * height, scale[1] * width * height
    for ratio_u, height_u, y_u, x_u in u:
        aspect = ratio[0] + ratio_u * (ratio[1] - ratio[0])
        h = round(math.sqrt(min_area / aspect))
        max_h = round(math.sqrt(max_area / aspect))
        if round(max_h * aspect) > width:
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if round(max_h * aspect) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += math.floor(height_u * (max_h - h + 1))
        w = round(h * aspect)
        if w * h < min_area:
            h += 1
            w = round(h * aspect)
        if w * h > max_area:
            h -= 1
            w = round(h * aspect)
        area = w * h
        if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
            continue
        if area / (width * height) < min_covered:  # the crop must cover 10% of the image
            continue
        y = math.floor(y_u * (height - h)) if h < height else 0
        x = math.floor(x_u * (width - w)) if w < width else 0
        return y, x, h, w
    return 0, 0, height, width  # no attempt kept: the whole image


def byol_crop(u: list[float], height: int, width: int, scale, ratio):  # noqa: ANN001, ANN201
    """(top, left, h, w) with ``u`` = (area, log-ratio, offset_w, offset_h) uniforms."""
    target = (scale[0] + u[0] * (scale[1] - scale[0])) * height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
    w = min(round(math.sqrt(target * aspect)), width)
    h = min(round(math.sqrt(target / aspect)), height)
    left = math.floor(u[2] * (width - w + 1))  # uniform in [0, width - w]
    top = math.floor(u[3] * (height - h + 1))
    return top, left, h, w


def boxes_as_rows(boxes) -> list[tuple[int, int, int, int]]:  # noqa: ANN001
    columns = [boxes.top, boxes.left, boxes.height, boxes.width]
    return [tuple(int(v) for v in row) for row in zip(*[c.tolist() for c in columns], strict=True)]


@pytest.mark.parametrize("height, width", [(37, 53), (224, 224), (32, 32)])
def test_simclr_sampler_is_tensorflows(height: int, width: int) -> None:
    n = 500
    boxes = simclr_crop_boxes(n, height, width, SCALE, RATIO, torch.device("cpu"),
                              torch.Generator().manual_seed(0))  # fmt: skip
    u = torch.rand(n, 100, 4, generator=torch.Generator().manual_seed(0)).double()
    expected = [tf_crop(u[i].tolist(), height, width, SCALE, RATIO) for i in range(n)]
    assert boxes_as_rows(boxes) == expected
    areas = torch.tensor([h * w for _, _, h, w in boxes_as_rows(boxes)]) / (height * width)
    assert float(areas.min()) >= 0.1  # min_object_covered raises the smallest area to 10%


def test_simclr_sampler_falls_back_to_the_whole_image() -> None:
    """No attempt can fit a 3:1 to 4:1 crop covering 90% of a square: the whole image."""
    boxes = simclr_crop_boxes(8, 20, 20, (0.9, 1.0), (3.0, 4.0), torch.device("cpu"))
    assert boxes_as_rows(boxes) == [(0, 0, 20, 20)] * 8


def test_simclr_sampler_draws_the_side_not_the_area_uniformly() -> None:
    """TensorFlow draws the height uniformly (for a uniform, not log-uniform, aspect ratio),
    so its crops are smaller on average than torchvision's area-uniform ones (0.42 against
    0.48 of the image over 20,000 draws at 224 px, standard errors 0.002)."""
    g = torch.Generator().manual_seed(1)
    tf = simclr_crop_boxes(20_000, 224, 224, SCALE, RATIO, torch.device("cpu"), g)
    tv = crop_boxes(20_000, 224, 224, SCALE, RATIO, torch.device("cpu"), g)
    tf_area = float((tf.height * tf.width).mean()) / 224**2
    tv_area = float((tv.height * tv.width).mean()) / 224**2
    assert tf_area < tv_area - 0.04


@pytest.mark.parametrize("height, width", [(37, 53), (224, 224)])
def test_byol_sampler_is_one_clipped_draw(height: int, width: int) -> None:
    n = 2000
    boxes = byol_crop_boxes(n, height, width, SCALE, RATIO, torch.device("cpu"),
                            torch.Generator().manual_seed(2))  # fmt: skip
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(2)).double()
    rows = boxes_as_rows(boxes)
    assert rows == [byol_crop(u[i].tolist(), height, width, SCALE, RATIO) for i in range(n)]
    # clipping, not rejection: some crops take the whole width or height
    clipped = sum(w == width or h == height for _, _, h, w in rows)
    assert clipped > n // 50, clipped


@pytest.mark.parametrize("sampler", ["simclr", "byol"])
def test_pil_crop_step_cuts_the_sampled_box(sampler: str) -> None:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    step = SampledResizedCrop((24, 24), SCALE, RATIO, "bicubic", sampler)
    torch.manual_seed(4)
    out = step(image)
    torch.manual_seed(4)
    sample = simclr_crop_boxes if sampler == "simclr" else byol_crop_boxes
    ((top, left, h, w),) = boxes_as_rows(sample(1, 40, 50, SCALE, RATIO, torch.device("cpu")))
    expected = image.crop((left, top, left + w, top + h)).resize((24, 24), Image.BICUBIC)
    assert out.size == (24, 24)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
