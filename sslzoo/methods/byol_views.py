"""The asymmetric BYOL view pair (blur 1.0 / 0.1, solarisation 0 / 0.2), shared by BYOL and
MoCo v3, as lightly PIL transforms and as device views."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightly.transforms.byol_transform import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
)
from torch import nn

from sslzoo.augment.tf_recipe import TFRecipe
from sslzoo.augment.views import byol_views
from sslzoo.methods.base import ViewTransform


class BYOLPairViews:
    """Mixin for a method with ``blur_prob`` and ``solarize_prob`` pairs in its hparams and a
    ``view_recipe(image_size)`` giving the settings both views share (lightly's keywords).
    ``tf_recipe()`` may replace lightly's crop resizing, colour jitter and blur (BYOL's
    official ones)."""

    hparams: Any

    def view_recipe(self, image_size: int) -> dict[str, Any]:
        raise NotImplementedError

    def tf_recipe(self) -> TFRecipe | None:
        """None: lightly's bilinear crops and PIL blur."""
        return None

    def view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> ViewTransform:
        hp = self.hparams
        common = dict(
            self.view_recipe(image_size), normalize={"mean": list(mean), "std": list(std)}
        )
        transform = BYOLTransform(
            view_1_transform=BYOLView1Transform(
                gaussian_blur=hp.blur_prob[0], solarization_prob=hp.solarize_prob[0], **common
            ),
            view_2_transform=BYOLView2Transform(
                gaussian_blur=hp.blur_prob[1], solarization_prob=hp.solarize_prob[1], **common
            ),
        )
        tf_recipe = self.tf_recipe()
        if tf_recipe is not None:
            for view in transform.transforms:
                tf_recipe.adapt(view, image_size)
        return transform

    def device_view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> nn.Module:
        hp = self.hparams
        tf_recipe = self.tf_recipe()
        return byol_views(
            mean=mean,
            std=std,
            gaussian_blur=tuple(hp.blur_prob),
            solarization_prob=tuple(hp.solarize_prob),
            **self.view_recipe(image_size),
            **(tf_recipe.device_settings(image_size) if tf_recipe else {}),
        )
