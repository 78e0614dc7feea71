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
from PIL import Image

from sslzoo.augment.views import ViewRecipe

INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


class CropViews:
    """Maps one PIL image to the list of its views, cropped and flipped as the recipes say,
    as uint8 tensors (3, size, size). Random draws come from torch's global generator, which
    the training loader seeds per item."""

    def __init__(self, recipes: Sequence[ViewRecipe]) -> None:
        self.recipes = list(recipes)
        built: dict[ViewRecipe, T.Compose] = {}
        for r in self.recipes:
            if r not in built:
                built[r] = T.Compose(
                    [
                        T.RandomResizedCrop(
                            r.out_size, r.scale, r.ratio, INTERPOLATION[r.interpolation]
                        ),
                        T.RandomHorizontalFlip(r.hflip_prob),
                        T.PILToTensor(),
                    ]
                )
        self.transforms = [built[r] for r in self.recipes]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        image = image.convert("RGB")
        return [t(image) for t in self.transforms]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.recipes)} views)"
