"""The crop sampling and resizing, colour jitter and Gaussian blur of the official SimCLR
(TensorFlow) and BYOL (JAX) input pipelines, for PIL views and device views alike.

Both draw crop boxes with their own samplers (:func:`~sslzoo.augment.params.simclr_crop_boxes`,
:func:`~sslzoo.augment.params.byol_crop_boxes`), resize each crop bicubically
(``tf.image.resize(..., BICUBIC)``), jitter colours with TensorFlow's ops
(:mod:`sslzoo.augment.tf_color`), and blur with a separable Gaussian of 2 int(size / 20) + 1 taps
(``kernel_size = size // 10`` or ``size / 10``, then ``radius = int(kernel_size / 2)``) applied
as a SAME convolution, which pads with zeros. lightly's SimCLR and BYOL views crop with
torchvision's sampler, resize bilinearly, jitter with torchvision's ``ColorJitter`` and blur
with PIL's ``GaussianBlur(radius=sigma)``, whose support follows sigma and whose edges repeat
the border pixels; :meth:`TFRecipe.adapt` swaps those steps of a lightly view for the official
ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.functional as TF
from lightly.transforms.gaussian_blur import GaussianBlur as PILGaussianBlur
from PIL import Image

from sslzoo.augment import ops
from sslzoo.augment.crops import INTERPOLATION, SampledResizedCrop
from sslzoo.augment.params import CropSampler, bernoulli, jitter_params
from sslzoo.augment.tf_color import ColorOps, color_ranges, jitter_in_order


def kernel_taps(image_size: int, fraction: float) -> int:
    """The official blur kernel side for images of ``image_size`` pixels: 2 int(s f / 2) + 1."""
    return 2 * int(image_size * fraction / 2) + 1


class KernelGaussianBlur:
    """PIL step: with probability ``prob``, blur with sigma ~ U(sigmas) and a kernel of
    ``kernel_size`` taps, padded as ``padding`` says (the device op on one image). Draws come
    from torch's global generator, which the training loader seeds per item."""

    def __init__(
        self,
        kernel_size: int,
        sigmas: Sequence[float],
        prob: float,
        padding: ops.BlurPadding = "zeros",
    ) -> None:
        self.kernel_size = kernel_size
        self.sigmas = (float(sigmas[0]), float(sigmas[1]))
        self.prob = prob
        self.padding = padding

    def __call__(self, image: Image.Image) -> Image.Image:
        if float(torch.rand(())) >= self.prob:
            return image
        sigma = torch.empty(1).uniform_(*self.sigmas)
        x = TF.pil_to_tensor(image.convert("RGB"))[None].float().div_(255.0)
        out = ops.gaussian_blur(x, sigma, self.kernel_size, self.padding)[0]
        return TF.to_pil_image(out.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kernel_size={self.kernel_size}, sigmas={self.sigmas}, "
            f"prob={self.prob}, padding={self.padding!r})"
        )


class TensorColorJitter:
    """PIL step: with probability ``prob``, the official colour jitter (``color_ops``
    ``simclr`` or ``byol``) of strengths ``jitter`` in a random order, computed by the device
    op on the one image. Draws come from torch's global generator."""

    def __init__(
        self, jitter: Sequence[float], prob: float, color_ops: ColorOps = "simclr"
    ) -> None:
        self.jitter = tuple(float(j) for j in jitter)
        self.prob = prob
        self.color_ops = color_ops
        ranges = color_ranges(color_ops, *self.jitter)
        self.low = torch.tensor([lo for lo, _ in ranges])
        self.high = torch.tensor([hi for _, hi in ranges])

    def __call__(self, image: Image.Image) -> Image.Image:
        apply = bernoulli(1, self.prob, torch.device("cpu"))
        if not bool(apply):
            return image
        factors, order = jitter_params(1, self.low, self.high)
        x = TF.pil_to_tensor(image.convert("RGB"))[None].float().div_(255.0)
        use_hue = self.jitter[3] > 0
        out = jitter_in_order(x, factors, order[0].tolist(), self.color_ops, use_hue)[0]
        return TF.to_pil_image(out.mul_(255.0).round_().to(torch.uint8))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(jitter={self.jitter}, prob={self.prob}, "
            f"color_ops={self.color_ops!r})"
        )


@dataclass(frozen=True)
class TFRecipe:
    """How views resize crops, jitter colours and blur.

    Args:
        interpolation: resizing of the random crop (``bicubic`` officially).
        crop_sampler: the crop box sampler (``simclr`` or ``byol`` officially;
            ``torchvision``: lightly's ``RandomResizedCrop``).
        blur_kernel_fraction: blur kernel size as a fraction of the view side (0.1 officially);
            ``None`` keeps lightly's PIL blur (and a 2 ceil(3 sigma_max) + 1 kernel with reflect
            padding on the device).
        blur_padding: ``zeros`` (the official SAME convolution) or ``reflect``.
        color_ops: ``simclr`` or ``byol``: the official TensorFlow jitter ops;
            ``torchvision``: lightly's ``ColorJitter``.
    """

    interpolation: ops.Interpolation = "bicubic"
    blur_kernel_fraction: float | None = 0.1
    blur_padding: ops.BlurPadding = "zeros"
    color_ops: ColorOps = "simclr"
    crop_sampler: CropSampler = "simclr"

    @classmethod
    def from_hparams(cls, hparams: Any) -> TFRecipe:
        """The recipe a method's ``crop_interpolation``, ``blur_kernel_fraction``,
        ``blur_padding``, ``color_ops`` and ``crop_sampler`` arguments give."""
        return cls(
            hparams.crop_interpolation, hparams.blur_kernel_fraction, hparams.blur_padding,
            hparams.color_ops, hparams.crop_sampler,
        )  # fmt: skip

    def device_settings(self, image_size: int) -> dict[str, Any]:
        """Keywords of :func:`~sslzoo.augment.views.twin_views` and ``asymmetric_views``."""
        settings: dict[str, Any] = {
            "interpolation": self.interpolation,
            "color_ops": self.color_ops,
            "crop_sampler": self.crop_sampler,
        }
        if self.blur_kernel_fraction is not None:
            settings["blur_kernel_size"] = kernel_taps(image_size, self.blur_kernel_fraction)
            settings["blur_padding"] = self.blur_padding
        return settings

    def adapt(self, view: Any, image_size: int) -> Any:
        """Set the crop sampler and interpolation, colour jitter and blur of a lightly view
        transform (its ``transform`` is a torchvision ``Compose``) in place, and return it."""
        steps = view.transform.transforms
        for i, step in enumerate(steps):
            name = type(step).__name__
            if name == "RandomResizedCrop" and self.crop_sampler != "torchvision":
                steps[i] = SampledResizedCrop(
                    step.size, step.scale, step.ratio, self.interpolation, self.crop_sampler
                )
            elif name == "RandomResizedCrop":
                step.interpolation = INTERPOLATION[self.interpolation]
            elif name == "RandomApply" and self.color_ops != "torchvision":
                (jitter,) = step.transforms  # a ColorJitter
                strengths = _strengths(jitter)
                steps[i] = TensorColorJitter(strengths, step.p, self.color_ops)
            elif isinstance(step, PILGaussianBlur) and self.blur_kernel_fraction is not None:
                kernel = kernel_taps(image_size, self.blur_kernel_fraction)
                steps[i] = KernelGaussianBlur(kernel, step.sigmas, step.prob, self.blur_padding)
        return view


def _strengths(jitter: Any) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation, hue) strengths of a torchvision ``ColorJitter``, read
    back from its factor ranges [max(0, 1 - x), 1 + x] and [-hue, hue] (None: off)."""
    factors = [r[1] - 1.0 if r else 0.0 for r in (jitter.brightness, jitter.contrast,
                                                  jitter.saturation)]  # fmt: skip
    return (*factors, jitter.hue[1] if jitter.hue else 0.0)
