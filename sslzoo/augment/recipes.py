"""View recipes: one typed value per family of views, holding the official knobs with their
defaults, that builds both the per-image PIL transform (workers) and the batched device module.

A method takes ``views: <Recipe> = <its official recipe>`` and declares nothing else about its
views; the datamodule builds them from the recipe with its own image size and normalisation
(``sslzoo fit`` hands the model's recipe to the datamodule). A config changes one knob::

    model:
      class_path: sslzoo.methods.SimCLR
      init_args:
        views:
          color_jitter_strength: 0.5

Families: :class:`TwoViews` (SimCLR, BYOL, MoCo v3, SimSiam, Barlow Twins, VICReg) and its
:class:`OneView` (Distillation),
:class:`MultiCropViews` (SwAV's groups of crops), :class:`GlobalLocalViews` (DINO's two global
and N local crops; :class:`MaskedGlobalLocalViews` adds iBOT's patch masks) and
:class:`SingleView` (MAE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torchvision.transforms as T
from lightly.transforms import MAETransform, SimCLRTransform, SwaVTransform
from lightly.transforms.byol_transform import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
)
from lightly.transforms.dino_transform import DINOViewTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from PIL import Image
from torch import nn

from sslzoo.augment.crops import CropViews
from sslzoo.augment.masks import MaskedDeviceViews, MaskGenerator, MultiCropWithMasks, PredShape
from sslzoo.augment.ops import BlurPadding, Interpolation
from sslzoo.augment.params import CropSampler
from sslzoo.augment.tf_color import ColorOps
from sslzoo.augment.tf_recipe import TFRecipe
from sslzoo.augment.views import DeviceViews, ViewRecipe, lightly_view
from sslzoo.errors import ConfigError

Transform = Callable[[Image.Image], Any]
Stats = tuple[float, ...]


@dataclass(frozen=True)
class Views:
    """Base of the recipes, each a frozen dataclass of plain values (so a config sets any
    field, ``--model.views.<field>``, over the method's defaults): what a datamodule needs."""

    def pil(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        """One PIL image -> its augmented views (normalised tensors)."""
        raise ConfigError(
            f"{type(self).__name__} makes no views: a method declares its recipe as the "
            "default of its views argument (see sslzoo.augment.recipes)"
        )

    def device(self, image_size: int, mean: Stats, std: Stats) -> nn.Module:
        """A uint8 batch (N, 3, H, W), or per-view batches already cropped, -> the views, each
        image drawing its own parameters (:class:`~sslzoo.augment.views.DeviceViews`).
        A recipe without device views says so, for the datamodule's ``device_augment``."""
        raise ConfigError(
            f"{type(self).__name__} has no device views (Views.device); set device_augment: "
            "false for it"
        )

    def worker_crops(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        """The geometric half of :meth:`device`, per image in dataloader workers: the views
        cropped and flipped, as uint8 tensors."""
        return CropViews(self.device(image_size, mean, std).recipes)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


def _normalize(mean: Stats, std: Stats) -> dict[str, list[float]]:
    return {"mean": list(mean), "std": list(std)}


@dataclass(frozen=True)
class TwoViews(Views):
    """Two views of one image, each a random resized crop, flip, colour jitter (random order)
    with probability, grayscale, Gaussian blur and solarisation: the views of SimCLR, BYOL,
    MoCo v3, SimSiam, Barlow Twins and VICReg, which differ in their settings.

    Args:
        crop_min_scale: smallest random-resized-crop area fraction.
        crop_sampler: how crop boxes are drawn: ``torchvision`` (``RandomResizedCrop``),
            ``simclr`` (TensorFlow's ``sample_distorted_bounding_box`` as SimCLR calls it) or
            ``byol`` (one draw clipped to the image, ``_decode_and_random_crop``).
        crop_interpolation: resizing of the crop (``bilinear`` or ``bicubic``).
        color_jitter: jitter strengths (brightness, contrast, saturation, hue) at strength 1.
        color_jitter_strength: SimCLR's colour distortion strength s: the jitter is
            s x ``color_jitter``.
        color_jitter_prob: probability of colour jitter.
        color_ops: ``torchvision`` (``ColorJitter``'s blends), or the official TensorFlow ops
            of ``simclr`` or ``byol`` (contrast around each channel's mean, saturation in HSV,
            BYOL's additive brightness).
        grayscale_prob: probability of grayscale.
        blur_prob: Gaussian blur probability of (view 1, view 2).
        blur_sigma: range of the blur sigma.
        blur_kernel_fraction: blur kernel side as a fraction of the image side (SimCLR's
            ``height // 10``, BYOL's ``blur_divider=10``); ``None``: PIL's blur.
        blur_padding: ``zeros`` (the official SAME convolution) or ``reflect``.
        solarize_prob: solarisation probability of (view 1, view 2).
        hflip_prob: probability of a horizontal flip.
    """

    crop_min_scale: float = 0.08
    crop_sampler: CropSampler = "torchvision"
    crop_interpolation: Interpolation = "bilinear"
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_strength: float = 1.0
    color_jitter_prob: float = 0.8
    color_ops: ColorOps = "torchvision"
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float | None = None
    blur_padding: BlurPadding = "reflect"
    solarize_prob: tuple[float, float] = (0.0, 0.2)
    hflip_prob: float = 0.5

    def tf_recipe(self) -> TFRecipe:
        """The crop sampler and resizing, colour ops and blur kernel (lightly's own when they
        are torchvision's, bilinear, and PIL's)."""
        return TFRecipe(
            self.crop_interpolation, self.blur_kernel_fraction, self.blur_padding,
            self.color_ops, self.crop_sampler,
        )  # fmt: skip

    def _lightly(self, image_size: int) -> dict[str, Any]:
        """The settings both views share, in lightly's keywords."""
        return dict(
            input_size=image_size, cj_prob=self.color_jitter_prob,
            cj_strength=self.color_jitter_strength, min_scale=self.crop_min_scale,
            random_gray_scale=self.grayscale_prob, sigmas=tuple(self.blur_sigma),
            hf_prob=self.hflip_prob,
        )  # fmt: skip

    def pil(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        bright, contrast, sat, hue = self.color_jitter
        common = dict(
            self._lightly(image_size), cj_bright=bright, cj_contrast=contrast, cj_sat=sat,
            cj_hue=hue, normalize=_normalize(mean, std),
        )  # fmt: skip
        blur, solarize = self.blur_prob, self.solarize_prob
        if blur[0] == blur[1] and solarize == (0.0, 0.0):  # lightly's SimCLR pair: one view twice
            transform = SimCLRTransform(gaussian_blur=blur[0], **common)
        else:
            transform = BYOLTransform(
                view_1_transform=BYOLView1Transform(
                    gaussian_blur=blur[0], solarization_prob=solarize[0], **common
                ),
                view_2_transform=BYOLView2Transform(
                    gaussian_blur=blur[1], solarization_prob=solarize[1], **common
                ),
            )
        recipe = self.tf_recipe()
        for view in transform.transforms:
            recipe.adapt(view, image_size)
        return transform

    def device(self, image_size: int, mean: Stats, std: Stats) -> nn.Module:
        common = dict(
            self._lightly(image_size), jitter=tuple(self.color_jitter),
            **self.tf_recipe().device_settings(image_size),
        )  # fmt: skip
        return DeviceViews(
            [
                lightly_view(mean=mean, std=std, gaussian_blur=b, solarization_prob=s, **common)
                for b, s in zip(self.blur_prob, self.solarize_prob, strict=True)
            ]
        )


@dataclass(frozen=True)
class OneView(TwoViews):
    """One view with the steps of :class:`TwoViews` and the first view's blur and
    solarisation (feature distillation: teacher and student see the same view).

    Args:
        fixed: no random step at all: the image's shorter side resized to the image size and
            the centre cropped, as for evaluation (the same input every epoch).
    """

    fixed: bool = False

    def pil(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        if self.fixed:
            steps = [T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()]
            return MultiViewTransform([T.Compose([*steps, T.Normalize(mean, std)])])
        return MultiViewTransform(super().pil(image_size, mean, std).transforms[:1])

    def device(self, image_size: int, mean: Stats, std: Stats) -> nn.Module:
        if self.fixed:
            raise ConfigError(
                "views.fixed has nothing to do on the device: set --data.device_augment false"
            )
        return DeviceViews(super().device(image_size, mean, std).recipes[:1])


@dataclass(frozen=True)
class MultiCropViews(Views):
    """Groups of crops, ``nmb_crops[i]`` of side ``size_crops[i]`` and area in
    ``[min_scale_crops[i], max_scale_crops[i]]``, all with the same colour steps (SwAV's
    multi-crop, as lightly's ``SwaVTransform``).

    ``size_crops`` are pixels for an image size equal to ``size_crops[0]`` (224 for the
    recipe); for another image size every size is rescaled by ``image_size / size_crops[0]``
    (rounded), so the first group is always ``image_size``: (224, 96) gives (32, 14) at 32 px.

    Args:
        nmb_crops: number of crops of each size.
        size_crops: crop side in pixels per group, for ``image_size == size_crops[0]``.
        min_scale_crops: smallest area fraction per group.
        max_scale_crops: largest area fraction per group.
        color_jitter_strength: colour distortion strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s).
        color_jitter_prob: probability of colour jitter.
        grayscale_prob: probability of grayscale.
        blur_prob: probability of the PIL Gaussian blur, on every crop.
        blur_sigma: range of the blur radius.
        hflip_prob: probability of a horizontal flip.
    """

    nmb_crops: tuple[int, ...] = (2, 6)
    size_crops: tuple[int, ...] = (224, 96)
    min_scale_crops: tuple[float, ...] = (0.14, 0.05)
    max_scale_crops: tuple[float, ...] = (1.0, 0.14)
    color_jitter_strength: float = 1.0
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    hflip_prob: float = 0.5

    def __post_init__(self) -> None:
        groups = (self.nmb_crops, self.size_crops, self.min_scale_crops, self.max_scale_crops)
        if len({len(g) for g in groups}) != 1:
            raise ValueError(
                "nmb_crops, size_crops, min_scale_crops and max_scale_crops need one entry per "
                "crop size"
            )

    @property
    def num_views(self) -> int:
        return sum(self.nmb_crops)

    def crop_sizes(self, image_size: int) -> list[int]:
        """``size_crops`` rescaled so that the first group is ``image_size``."""
        return [max(1, round(s * image_size / self.size_crops[0])) for s in self.size_crops]

    def _lightly(self, image_size: int) -> dict[str, Any]:
        """lightly's ``SwaVTransform`` arguments but the normalisation."""
        return dict(
            crop_sizes=tuple(self.crop_sizes(image_size)), crop_counts=tuple(self.nmb_crops),
            crop_min_scales=tuple(self.min_scale_crops),
            crop_max_scales=tuple(self.max_scale_crops), hf_prob=self.hflip_prob,
            cj_prob=self.color_jitter_prob, cj_strength=self.color_jitter_strength,
            random_gray_scale=self.grayscale_prob, gaussian_blur=self.blur_prob,
            sigmas=tuple(self.blur_sigma),
        )  # fmt: skip

    def pil(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        return SwaVTransform(**self._lightly(image_size), normalize=_normalize(mean, std))

    def device(self, image_size: int, mean: Stats, std: Stats) -> nn.Module:
        s = self._lightly(image_size)
        recipes: list[ViewRecipe] = []
        groups = zip(s["crop_sizes"], s["crop_counts"], s["crop_min_scales"],
                     s["crop_max_scales"], strict=True)  # fmt: skip
        for size, count, low, high in groups:
            recipe = lightly_view(
                input_size=size, mean=mean, std=std, cj_prob=s["cj_prob"],
                cj_strength=s["cj_strength"], jitter=SWAV_JITTER, min_scale=low, max_scale=high,
                random_gray_scale=s["random_gray_scale"], gaussian_blur=s["gaussian_blur"],
                sigmas=s["sigmas"], hf_prob=s["hf_prob"],
            )  # fmt: skip
            recipes += [recipe] * count
        return DeviceViews(recipes)


SWAV_JITTER = (0.8, 0.8, 0.8, 0.2)  # SwaVTransform's jitter at strength 1


def default_local_crop_size(image_size: int, multiple: int = 1) -> int:
    """DINO's 96 px for 224 px global crops, scaled to ``image_size`` and rounded to a
    multiple of the patch size (224 -> 96, 96 -> 48 with patch 16, 32 -> 12 with patch 4)."""
    return max(multiple, round(image_size * 96 / 224 / multiple) * multiple)


@dataclass(frozen=True)
class GlobalLocalViews(Views):
    """DINO's multi-crop (``DataAugmentationDINO``): global view 1 (blur ``blur_prob[0]``),
    global view 2 (blur ``blur_prob[1]``, solarisation ``solarize_prob``), then
    ``local_crops_number`` local views (blur ``blur_prob[2]``). Each: bicubic random resized
    crop, flip, colour jitter (random order) with ``color_jitter_prob``, grayscale, blur (sigma
    ~ U(blur_sigma)), normalisation. Global views are ``image_size``.

    Args:
        global_crops_scale: area fraction range of the global crops.
        local_crops_number: number of local crops.
        local_crops_scale: area fraction range of the local crops.
        local_crop_size: local crop side; ``None``: 96 px per 224 px of the image size,
            rounded to a multiple of ``patch_size``.
        patch_size: the ViT patch size local crops (and masks) align to; ``None`` until the
            method sets it from its backbone (1 for a ResNet).
        color_jitter: colour jitter strengths (brightness, contrast, saturation, hue).
        color_jitter_prob: probability of colour jitter.
        grayscale_prob: probability of grayscale.
        blur_prob: Gaussian blur probability of (global 1, global 2, locals).
        solarize_prob: solarisation probability of global view 2.
        blur_sigma: range of the blur sigma.
        hflip_prob: probability of a horizontal flip.
    """

    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_number: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crop_size: int | None = None
    patch_size: int | None = None
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    hflip_prob: float = 0.5

    @property
    def num_views(self) -> int:
        return 2 + self.local_crops_number

    def local_size(self, image_size: int) -> int:
        """Side of the local crops for global crops of ``image_size``."""
        return self.local_crop_size or default_local_crop_size(image_size, self.patch_size or 1)

    def crops(self, image_size: int) -> list[tuple[int, tuple[float, float], float, float]]:
        """(size, area scale, blur probability, solarisation probability) of each view."""
        glob, scale = image_size, tuple(self.global_crops_scale)
        local = (self.local_size(image_size), tuple(self.local_crops_scale), self.blur_prob[2], 0.0)
        return [
            (glob, scale, self.blur_prob[0], 0.0),
            (glob, scale, self.blur_prob[1], self.solarize_prob),
            *[local] * self.local_crops_number,
        ]

    def pil(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        """Built from lightly's ``DINOViewTransform`` with every argument explicit (lightly's
        ``DINOTransform`` drops ``cj_strength`` for the second global view)."""
        bright, contrast, sat, hue = self.color_jitter
        return MultiViewTransform(
            [
                DINOViewTransform(
                    crop_size=size,
                    crop_scale=scale,
                    hf_prob=self.hflip_prob,
                    cj_prob=self.color_jitter_prob,
                    cj_strength=1.0,
                    cj_bright=bright,
                    cj_contrast=contrast,
                    cj_sat=sat,
                    cj_hue=hue,
                    random_gray_scale=self.grayscale_prob,
                    gaussian_blur=blur,
                    sigmas=tuple(self.blur_sigma),
                    solarization_prob=solarize,
                    normalize=_normalize(mean, std),
                )  # fmt: skip
                for size, scale, blur, solarize in self.crops(image_size)
            ]
        )

    def device(self, image_size: int, mean: Stats, std: Stats) -> nn.Module:
        return DeviceViews(
            [
                lightly_view(
                    input_size=size,
                    mean=mean,
                    std=std,
                    cj_prob=self.color_jitter_prob,
                    cj_strength=1.0,
                    jitter=self.color_jitter,
                    min_scale=scale[0],
                    max_scale=scale[1],
                    random_gray_scale=self.grayscale_prob,
                    gaussian_blur=blur,
                    sigmas=tuple(self.blur_sigma),
                    hf_prob=self.hflip_prob,
                    solarization_prob=solarize,
                    interpolation="bicubic",
                )  # fmt: skip
                for size, scale, blur, solarize in self.crops(image_size)
            ]
        )


@dataclass(frozen=True)
class MaskedGlobalLocalViews(GlobalLocalViews):
    """:class:`GlobalLocalViews` plus one patch mask per global view and image (iBOT's
    ``ImageFolderMask``): the views come as ``{"views": [...], "masks": [...]}``.

    Args:
        pred_ratio: masking ratio(s).
        pred_ratio_var: spread of each ratio (uniform in ratio +- var); 0 keeps it fixed.
        pred_shape: ``block`` (BEiT's block masking) or ``rand`` (a random set of patches).
        pred_aspect_ratio: aspect ratio range of the blocks.
    """

    pred_ratio: tuple[float, ...] = (0.0, 0.3)
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)
    pred_shape: PredShape = "block"
    pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)

    def mask_generator(self) -> MaskGenerator:
        return MaskGenerator(
            self.pred_ratio, self.pred_ratio_var, self.pred_shape, self.pred_aspect_ratio
        )

    def grid(self, image_size: int) -> tuple[int, int]:
        side = image_size // (self.patch_size or 1)
        return side, side

    def pil(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        crops = super().pil(image_size, mean, std)
        return MultiCropWithMasks(crops, self.grid(image_size), self.mask_generator())

    def device(self, image_size: int, mean: Stats, std: Stats) -> nn.Module:
        views = super().device(image_size, mean, std)
        return MaskedDeviceViews(views, self.grid(image_size), self.mask_generator())


@dataclass(frozen=True)
class SingleView(Views):
    """One view: a bicubic random resized crop of area in ``[crop_min_scale, 1]``, a horizontal
    flip, normalisation, no colour steps (MAE's, as lightly's ``MAETransform``).

    Args:
        crop_min_scale: smallest random-resized-crop area fraction.
    """

    crop_min_scale: float = 0.2

    def pil(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        return MAETransform(
            input_size=image_size, min_scale=self.crop_min_scale, normalize=_normalize(mean, std)
        )

    def device(self, image_size: int, mean: Stats, std: Stats) -> nn.Module:
        return DeviceViews(
            [
                ViewRecipe(
                    size=image_size,
                    scale=(self.crop_min_scale, 1.0),
                    interpolation="bicubic",
                    jitter_prob=0.0,
                    grayscale_prob=0.0,
                    mean=tuple(mean),
                    std=tuple(std),
                )  # fmt: skip
            ]
        )
