"""Per-sample random augmentation of batched image tensors on their device (GPU or CPU)."""

from sslzoo.augment.views import (
    DeviceViews,
    ViewRecipe,
    byol_views,
    simclr_views,
    simsiam_views,
)

__all__ = ["DeviceViews", "ViewRecipe", "byol_views", "simclr_views", "simsiam_views"]
