"""Helpers shared by the device-augmentation tests: synthetic and real images, statistics of
views, and the recipe of a lightly transform read from its torchvision steps."""

from __future__ import annotations

import io
import itertools
import random
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from sslzoo.augment import DeviceViews, ViewRecipe
from sslzoo.augment.tf_color import color_ranges
from tests.conftest import CIFAR_ARCHIVE

# Ops run in float32 and sum at most a few dozen terms per output pixel, so results equal
# torchvision's to float32 rounding (measured max difference 1.3e-6, in the hue round trip).
ATOL = 1e-5
# z-score bound for comparing means of two samples: |z| > 4 has probability 6e-5 per check
# under equal distributions, and every draw here is seeded, so the checks are deterministic.
Z_MAX = 4.0
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Natural-looking float images in [0, 1]: bicubic upsampling of coarse random colours."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, height // 4), max(2, width // 4), generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")
    return up.clamp(0.0, 1.0)


def z_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Difference of the means of two independent samples in standard errors."""
    a, b = a.double(), b.double()
    return (a.mean(0) - b.mean(0)) / torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))


def torchvision_steps(transform) -> list:  # noqa: ANN001
    """The torchvision steps of a lightly view transform, nested Compose and ``.transform``
    wrappers flattened."""
    if hasattr(transform, "transforms") and type(transform).__name__ == "Compose":
        return [s for t in transform.transforms for s in torchvision_steps(t)]
    if type(getattr(transform, "transform", None)).__name__ == "Compose":
        return torchvision_steps(transform.transform)
    return [transform]


def lightly_recipe(view) -> dict:  # noqa: ANN001
    """The parameters of one view of a lightly transform, read from its torchvision steps."""
    out: dict = {"blur_prob": 0.0, "blur_sigma": None, "blur_kernel": None, "solarize_prob": 0.0,
                 "jitter": [(1.0, 1.0)] * 3 + [(0.0, 0.0)], "jitter_prob": 0.0,
                 "grayscale_prob": 0.0, "color_ops": "torchvision"}  # fmt: skip
    for step in torchvision_steps(view):
        name = type(step).__name__
        if name in ("RandomResizedCrop", "SampledResizedCrop"):
            out.update(size=tuple(step.size), scale=tuple(step.scale), ratio=tuple(step.ratio))
            out["interpolation"] = getattr(step.interpolation, "value", step.interpolation)
            out["crop_sampler"] = getattr(step, "sampler", "torchvision")
        elif name == "RandomHorizontalFlip":
            out["hflip_prob"] = step.p
        elif name == "RandomApply":
            (cj,) = step.transforms
            ranges = [cj.brightness, cj.contrast, cj.saturation, cj.hue]
            defaults = [(1.0, 1.0)] * 3 + [(0.0, 0.0)]  # None: that op is off
            out["jitter"] = [tuple(r) if r else d for r, d in zip(ranges, defaults, strict=True)]
            out["jitter_prob"] = step.p
        elif name == "TensorColorJitter":
            out["jitter"] = color_ranges(step.color_ops, *step.jitter)
            out.update(jitter_prob=step.prob, color_ops=step.color_ops)
        elif name == "RandomGrayscale":
            out["grayscale_prob"] = step.p
        elif name == "GaussianBlur":  # lightly's PIL blur: support 2 ceil(3 sigma) + 1, reflect
            out.update(blur_prob=step.prob, blur_sigma=tuple(float(s) for s in step.sigmas))
            out["blur_kernel"] = (None, "reflect") if step.prob > 0 else None
        elif name == "KernelGaussianBlur":
            out.update(blur_prob=step.prob, blur_sigma=step.sigmas)
            out["blur_kernel"] = (step.kernel_size, step.padding) if step.prob > 0 else None
        elif name == "RandomSolarization":
            out["solarize_prob"] = step.prob
        elif name == "Normalize":
            out.update(mean=tuple(step.mean), std=tuple(step.std))
        elif name == "ColorJitter":  # SwaV's no-argument ColorJitter changes nothing
            assert not any([step.brightness, step.contrast, step.saturation, step.hue])
        else:
            assert name == "ToTensor" or getattr(step, "p", getattr(step, "prob", 0.0)) == 0.0
    return out


def device_recipe(recipe: ViewRecipe) -> dict:
    """The same parameters of one of our view recipes."""
    return {
        "size": recipe.out_size, "scale": recipe.scale, "ratio": recipe.ratio,
        "interpolation": recipe.interpolation, "crop_sampler": recipe.crop_sampler,
        "hflip_prob": recipe.hflip_prob,
        "jitter": color_ranges(recipe.color_ops, *recipe.jitter) if recipe.jitter_prob > 0
        else [(1.0, 1.0)] * 3 + [(0.0, 0.0)],
        "color_ops": recipe.color_ops,
        "jitter_prob": recipe.jitter_prob, "grayscale_prob": recipe.grayscale_prob,
        "blur_prob": recipe.blur_prob, "solarize_prob": recipe.solarize_prob,
        "blur_sigma": recipe.blur_sigma if recipe.blur_prob > 0 else None,
        "blur_kernel": (recipe.blur_kernel_size, recipe.blur_padding)
        if recipe.blur_prob > 0 else None,
        "mean": recipe.mean, "std": recipe.std,
    }  # fmt: skip


def assert_same_recipe(recipe: ViewRecipe, view) -> None:  # noqa: ANN001
    """Our recipe has every parameter of lightly's view transform ``view``."""
    ours, theirs = device_recipe(recipe), lightly_recipe(view)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if value is None or isinstance(value, str) or key == "blur_kernel":
            assert value == theirs[key], key
        else:
            expected = np.array(theirs[key], dtype=float)
            assert np.allclose(np.array(value, dtype=float), expected), key


def read_cifar_sample() -> np.ndarray:
    """40 training images of each CIFAR-10 class (400, 32, 32, 3), read from the archive."""
    per_class: dict[str, list[np.ndarray]] = {}
    with tarfile.open(CIFAR_ARCHIVE, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith("train/")):
                continue
            images = per_class.setdefault(member.name.split("/")[1], [])
            if len(images) < 40:
                data = tar.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            if len(per_class) == 10 and all(len(v) == 40 for v in per_class.values()):
                break
    return np.stack([im for images in per_class.values() for im in images])


def view_statistics(views: torch.Tensor) -> torch.Tensor:
    """Per image: channel means, channel stds, colourfulness (max - min over channels) and
    mean absolute horizontal gradient, in [0, 1] pixel units."""
    x = views * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    colourful = (x.amax(1) - x.amin(1)).mean((1, 2))
    gradient = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), colourful[:, None], gradient[:, None]], 1)


def lightly_statistics(transform, images: np.ndarray) -> list[torch.Tensor]:
    """Statistics of each view of lightly's PIL transform, image by image."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    views = [transform(Image.fromarray(im)) for im in images]
    return [view_statistics(torch.stack([v[k] for v in views])) for k in range(len(views[0]))]


def device_statistics(device_views: DeviceViews, images: np.ndarray) -> list[torch.Tensor]:
    """Statistics of each view of the device pipeline on the whole batch."""
    torch.manual_seed(0)
    return [view_statistics(v) for v in device_views(torch.from_numpy(images).permute(0, 3, 1, 2))]


def similar(pil: list[torch.Tensor], device: list[torch.Tensor]) -> bool:
    """Whether, in each view, every statistic has the same mean (|z| < 4) and a spread within
    25% under both pipelines (the ratio of two sample stds over 400 images has a standard
    error of about 5-7% here, so 25% is about 4 standard errors)."""
    for a, b in zip(pil, device, strict=True):
        ratio = a.std(0) / b.std(0)
        if z_score(a, b).abs().max() >= Z_MAX or not ((ratio > 0.8) & (ratio < 1.25)).all():
            return False
    return True


def cifar_folder(root: Path, per_class: int = 10) -> Path:
    """A CIFAR-like ImageFolder copy: two classes of 32x32 PNGs in train/ and test/."""
    rng = np.random.default_rng(0)
    for split, c in itertools.product(("train", "test"), ("cat", "dog")):
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


class KeepBatches(L.Callback):
    """Records the batches training_step receives."""

    def __init__(self) -> None:
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.batches.append(batch)
