"""The geometric half of a device recipe, run per image in dataloader workers.

For image folders too large to hold in memory, workers decode each image and cut its views
(random resized crop and flip) at their final small size; the batch then travels to the device
as uint8 views, and :class:`~sslzoo.augment.views.DeviceViews` runs the photometric steps there
(colour jitter, grayscale, blur, solarisation, normalisation) with per-image parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from sslzoo.augment import ops
from sslzoo.augment.params import CropSampler, sample_crop_boxes
from sslzoo.augment.views import ViewRecipe

INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


class SampledResizedCrop:
    """PIL step: a random resized crop whose box comes from ``sampler`` (one of
    :func:`~sslzoo.augment.params.sample_crop_boxes`), drawn from torch's global generator,
    resized to ``size`` with ``interpolation`` (antialiased, as PIL resizes)."""

    def __init__(
        self,
        size: Sequence[int],
        scale: Sequence[float],
        ratio: Sequence[float],
        interpolation: ops.Interpolation,
        sampler: CropSampler,
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = interpolation
        self.sampler = sampler

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        box = sample_crop_boxes(
            self.sampler, 1, height, width, self.scale, self.ratio, torch.device("cpu")
        )
        top, left, h, w = (int(v) for v in (box.top, box.left, box.height, box.width))
        return TF.resized_crop(
            image, top, left, h, w, list(self.size), INTERPOLATION[self.interpolation],
            antialias=True,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation!r}, sampler={self.sampler!r})"
        )


class CropViews:
    """Maps one PIL image to the list of its views, cropped and flipped as the recipes say,
    as uint8 tensors (3, size, size). Random draws come from torch's global generator, which
    the training loader seeds per item."""

    def __init__(self, recipes: Sequence[ViewRecipe]) -> None:
        self.recipes = list(recipes)
        built: dict[ViewRecipe, T.Compose] = {}
        for r in self.recipes:
            if r not in built:
                if r.crop_sampler == "torchvision":
                    crop = T.RandomResizedCrop(
                        r.out_size, r.scale, r.ratio, INTERPOLATION[r.interpolation]
                    )
                else:
                    crop = SampledResizedCrop(
                        r.out_size, r.scale, r.ratio, r.interpolation, r.crop_sampler
                    )
                built[r] = T.Compose([crop, T.RandomHorizontalFlip(r.hflip_prob), T.PILToTensor()])
        self.transforms = [built[r] for r in self.recipes]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        image = image.convert("RGB")
        return [t(image) for t in self.transforms]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.recipes)} views)"
