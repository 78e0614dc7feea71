"""Per-sample random augmentation of batched image tensors on their device (GPU or CPU)."""

from sslzoo.augment.crops import CropViews
from sslzoo.augment.views import DeviceViews, ViewRecipe, asymmetric_views, twin_views

__all__ = ["CropViews", "DeviceViews", "ViewRecipe", "asymmetric_views", "twin_views"]
