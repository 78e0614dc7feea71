"""Per-sample random augmentation of batched image tensors on their device (GPU or CPU)."""

from sslzoo.augment.crops import CropViews
from sslzoo.augment.views import (
    DeviceViews,
    MultiCropRecipe,
    ViewRecipe,
    byol_views,
    dino_views,
    mae_views,
    simclr_views,
    simsiam_views,
    swav_views,
)

__all__ = [
    "CropViews",
    "DeviceViews",
    "MultiCropRecipe",
    "ViewRecipe",
    "byol_views",
    "dino_views",
    "mae_views",
    "simclr_views",
    "simsiam_views",
    "swav_views",
]
