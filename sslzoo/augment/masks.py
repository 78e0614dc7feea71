"""Patch masks for masked image modelling, drawn per image: iBOT's (BEiT's block masking), and
the multi-crop views that carry one mask per global crop, for PIL and device views alike; and
DINOv2's masks, drawn per batch (:func:`stratified_masks`)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from sslzoo.augment.views import DeviceViews, ViewRecipe

PredShape = Literal["block", "rand"]


class MaskGenerator:
    """Per-image patch masks as in iBOT's ``loader.py`` ``ImageFolderMask``.

    Each call draws a prediction ratio: for every (``pred_ratio[i]``, ``pred_ratio_var[i]``) a
    value uniform in ratio +- var (or the ratio itself when var is 0), then one of them at
    random; ``(0, 0.3)`` with ``(0, 0.2)`` leaves half of the images unmasked and masks the
    rest 0.3 +- 0.2. ``block``: BEiT's block masking (rectangles of area at least
    ``(min(H, W) // 3) ** 2`` and aspect ratio log-uniform in ``pred_aspect_ratio``, added until
    the target is reached or nothing fits); ``rand``: exactly ``int(ratio * H * W)`` patches.
    Draws from Python's generator (seeded per item by the training loader) or a given one.

    ``min_block_patches`` / ``max_block_fraction``: DINOv2's ``MaskingGenerator`` draws each
    block's area from at least 4 patches (instead of ``(min(H, W) // 3) ** 2``) and at most
    half the grid (instead of no limit but the target).
    """

    def __init__(
        self,
        pred_ratio: float | Sequence[float] = 0.3,
        pred_ratio_var: float | Sequence[float] = 0.0,
        pred_shape: PredShape = "block",
        pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
        min_block_patches: int | None = None,
        max_block_fraction: float | None = None,
    ) -> None:
        ratios = [float(r) for r in np.atleast_1d(pred_ratio)]
        variances = [float(v) for v in np.atleast_1d(pred_ratio_var)]
        if len(variances) == 1:
            variances *= len(ratios)
        if len(variances) != len(ratios):
            raise ValueError("pred_ratio_var needs one value or one per pred_ratio")
        if any(r < v for r, v in zip(ratios, variances, strict=True)):
            raise ValueError("each pred_ratio must be >= its pred_ratio_var")
        if pred_shape not in ("block", "rand"):
            raise ValueError(f"pred_shape must be 'block' or 'rand', not {pred_shape!r}")
        self.ratios, self.variances = ratios, variances
        self.pred_shape = pred_shape
        self.log_aspect_ratio = tuple(math.log(a) for a in pred_aspect_ratio)
        self.min_block_patches = min_block_patches
        self.max_block_fraction = max_block_fraction

    def sample_ratio(self, rng: random.Random | None = None) -> float:
        rng = rng or random
        choices = [
            rng.uniform(r - v, r + v) if v > 0 else r
            for r, v in zip(self.ratios, self.variances, strict=True)
        ]
        return rng.choice(choices)

    def __call__(self, height: int, width: int, rng: random.Random | None = None) -> torch.Tensor:
        """A boolean (height, width) mask, True where the patch is masked; draws from ``rng``
        (Python's global generator by default)."""
        rng = rng or random
        high = self.sample_ratio(rng) * height * width
        if self.pred_shape == "rand":
            mask = np.zeros(height * width, dtype=bool)
            mask[rng.sample(range(height * width), int(high))] = True
            return torch.from_numpy(mask.reshape(height, width))
        return torch.from_numpy(self.block_mask(height, width, high, rng))

    def block_mask(self, height: int, width: int, high: float, rng: Any) -> np.ndarray:
        """BEiT's block masking of a (height, width) grid until ``high`` patches are masked
        or no block fits."""
        mask = np.zeros((height, width), dtype=bool)
        mask_count = 0
        low = self.min_block_patches
        low = (min(height, width) // 3) ** 2 if low is None else low
        cap = math.inf if self.max_block_fraction is None else self.max_block_fraction
        cap *= height * width
        while mask_count < high:
            max_mask_patches = min(high - mask_count, cap)
            delta = 0
            for _ in range(10):
                target_area = rng.uniform(low, max_mask_patches)
                aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < width and h < height:
                    top = rng.randint(0, height - h)
                    left = rng.randint(0, width - w)
                    block = mask[top : top + h, left : left + w]
                    num_new = h * w - int(block.sum())
                    if 0 < num_new <= max_mask_patches:
                        block[...] = True
                        delta += num_new
                if delta > 0:
                    break
            if delta == 0:
                break
            mask_count += delta
        return mask


def stratified_masks(
    count: int,
    grid: tuple[int, int],
    ratio_range: tuple[float, float],
    probability: float,
    generator: MaskGenerator,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """DINOv2's masks of a batch (``collate_data_and_cast``): ``int(count * probability)`` of
    the ``count`` images are masked, the i-th with ``int(N * U(p_i, p_(i+1)))`` block-masked
    patches for ``p = linspace(*ratio_range, masked + 1)`` (the ratios stratified over the
    batch), the others not at all; the masks are then shuffled. (count, H * W) booleans."""
    rng = rng or random
    height, width = grid
    masked = int(count * probability)
    bounds = torch.linspace(*ratio_range, masked + 1).tolist()
    masks = [
        generator.block_mask(
            height, width, int(height * width * rng.uniform(bounds[i], bounds[i + 1])), rng
        )
        for i in range(masked)
    ]
    masks += [np.zeros((height, width), dtype=bool)] * (count - masked)
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks)).flatten(1)


class MultiCropWithMasks:
    """Multi-crop views plus one mask per global crop: ``{"views": [...], "masks": [...]}``;
    the datamodule collates both per position."""

    def __init__(
        self,
        crops: Callable[[Image.Image], list[torch.Tensor]],
        grid: tuple[int, int],
        generator: MaskGenerator,
        num_masks: int = 2,
    ) -> None:
        self.crops = crops
        self.grid = grid
        self.generator = generator
        self.num_masks = num_masks

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        masks = [self.generator(*self.grid) for _ in range(self.num_masks)]
        return {"views": self.crops(image), "masks": masks}


class MaskedDeviceViews(nn.Module):
    """The device path of :class:`MultiCropWithMasks`: multi-crop views made on the device,
    plus one mask per global crop and image. The masks are drawn on the host (BEiT's rejection
    loop does not batch) from a seed taken from torch's CPU generator, which the method seeds
    per batch, and copied to the device without waiting for it."""

    def __init__(
        self,
        views: DeviceViews,
        grid: tuple[int, int],
        generator: MaskGenerator,
        num_masks: int = 2,
    ) -> None:
        super().__init__()
        self.views = views
        self.grid = grid
        self.generator = generator
        self.num_masks = num_masks

    @property
    def recipes(self) -> list[ViewRecipe]:
        return self.views.recipes

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        first = images if isinstance(images, torch.Tensor) else images[0]
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))  # a CPU draw: no device sync
        masks = torch.stack(
            [torch.stack([self.generator(*self.grid, rng) for _ in range(self.num_masks)])
             for _ in range(first.shape[0])]
        )  # fmt: skip
        if first.device.type == "cuda":
            masks = masks.pin_memory()
        masks = masks.to(first.device, non_blocking=True)
        return {"views": self.views(images), "masks": list(masks.unbind(1))}
