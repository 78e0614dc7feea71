"""Device views for the multi-crop methods (DINO, SwAV) and MAE, bicubic crops, and the
image-folder device path (crops in the workers, photometric steps on the device).

The recipes are checked parameter by parameter against lightly's transforms, which are the
reference pipelines of these methods in this package (lightly's DINO, SwaV and MAE transforms
follow the official repositories' augmentations), and the views statistically against the PIL
views those transforms produce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from sslzoo.augment import CropViews, DeviceViews, ViewRecipe, ops, twin_views
from sslzoo.augment.on_device import compile_views
from sslzoo.augment.recipes import SingleView, Stats, Transform, Views
from sslzoo.datamodules import CIFAR10DataModule, ImageFolderDataModule
from sslzoo.methods.dino import DINO
from sslzoo.methods.dino import VIEWS as DINO_VIEWS
from sslzoo.methods.ibot import IBOT
from sslzoo.methods.ibot import VIEWS as IBOT_VIEWS
from sslzoo.methods.mae import MAE
from sslzoo.methods.simclr import VIEWS as SIMCLR_VIEWS
from sslzoo.methods.simclr import SimCLR
from sslzoo.methods.swav import VIEWS as SWAV_VIEWS
from sslzoo.methods.swav import SwAV
from tests.augment_helpers import (
    ATOL,
    MEAN,
    STD,
    KeepBatches,
    assert_same_recipe,
    cifar_folder,
    device_statistics,
    lightly_statistics,
    read_cifar_sample,
    similar,
    smooth_images,
    view_statistics,
)
from tests.conftest import TINY_RESNET
from tests.helpers import quiet_trainer

SMALL_DINO = dict(**TINY_RESNET, out_dim=64, hidden_dim=32, bottleneck_dim=16)
# SwAV on TINY_RESNET with small heads and two crop sizes (2 x 16 px, 2 x 8 px)
SMALL_SWAV = dict(**TINY_RESNET, hidden_mlp=32, feat_dim=16, nmb_prototypes=24,
                  sync_batchnorm=False)  # fmt: skip
SMALL_SWAV_VIEWS = SWAV_VIEWS.replace(nmb_crops=(2, 2), size_crops=(16, 8))


def dino_views(**changes: object) -> Views:
    """DINO's recipe with ``changes``."""
    return DINO_VIEWS.replace(**changes)


TINY_MAE = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2),
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def cifar_sample() -> np.ndarray:
    return read_cifar_sample()


# ------------------------------------------------------------------ bicubic crops


def test_bicubic_resized_crop_matches_torchvision() -> None:
    x = smooth_images(6, 20, 24, seed=4)
    top = torch.tensor([0.0, 3, 5, 2, 0, 10])
    left = torch.tensor([0.0, 1, 7, 4, 0, 2])
    height = torch.tensor([20.0, 5, 15, 18, 10, 10])  # down- and upscaling, both axes
    width = torch.tensor([24.0, 6, 17, 20, 24, 3])
    flip = torch.tensor([False, True, False, True, True, False])
    out = ops.resized_crop(x, top, left, height, width, (16, 12), flip, interpolation="bicubic")
    for i in range(len(x)):
        box = [int(v[i]) for v in (top, left, height, width)]
        ref = TF.resized_crop(
            x[i], *box, [16, 12], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="antialias"):
        ops.resized_crop(x, top, left, height, width, (8, 8), antialias=False,
                         interpolation="bicubic")  # fmt: skip


def test_bicubic_views_stay_in_range() -> None:
    steps = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(4).repeat(8)
    images = steps.reshape(1, 1, 8, 8).expand(16, 3, 8, 8).contiguous()  # hard edges
    recipe = ViewRecipe(size=24, scale=(0.5, 1.0), interpolation="bicubic", jitter_prob=0.0,
                        grayscale_prob=0.0, mean=(0.0,) * 3, std=(1.0,) * 3)  # fmt: skip
    (view,) = DeviceViews([recipe])(images)
    assert view.min() >= 0 and view.max() <= 1
    assert (view > 0.01).any() and (view < 0.99).any()


# ------------------------------------------------------------------ recipes of the methods


@pytest.mark.parametrize(
    "method, settings, size",
    [
        (DINO, dict(views=dino_views(local_crops_number=3, global_crops_scale=(0.3, 0.9),
                    local_crops_scale=(0.1, 0.3), color_jitter=(0.3, 0.2, 0.1, 0.05),
                    color_jitter_prob=0.7, grayscale_prob=0.1, blur_prob=(0.9, 0.2, 0.4),
                    solarize_prob=0.3, blur_sigma=(0.2, 1.5), hflip_prob=0.4), **SMALL_DINO), 32),
        (SwAV, dict(views=SWAV_VIEWS.replace(nmb_crops=(2, 3), size_crops=(224, 96),
                    min_scale_crops=(0.2, 0.06), max_scale_crops=(0.9, 0.2), hflip_prob=0.3,
                    color_jitter_prob=0.6, color_jitter_strength=0.5, grayscale_prob=0.3,
                    blur_prob=0.4, blur_sigma=(0.2, 1.8)), **SMALL_SWAV), 32),
        (MAE, dict(views=SingleView(crop_min_scale=0.3), **TINY_MAE), 16),
    ],
)  # fmt: skip
def test_device_recipe_mirrors_the_methods_lightly_recipe(method, settings, size) -> None:  # noqa: ANN001
    model = method(**settings)
    pil = model.views.pil(size, MEAN, STD)
    device = model.views.device(size, MEAN, STD)
    views = pil.transforms if hasattr(pil, "transforms") else [pil]  # MAE: one view
    assert len(views) == len(device.recipes) == {DINO: 5, SwAV: 5, MAE: 1}[method]
    for view, recipe in zip(views, device.recipes, strict=True):
        assert_same_recipe(recipe, view)


TINY_IBOT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2,
                         dynamic_img_size=True),
    out_dim=32, patch_out_dim=32, hidden_dim=16, bottleneck_dim=8,
)  # fmt: skip


def test_ibot_device_views_are_dinos_with_host_drawn_masks(tmp_path: Path) -> None:
    model = IBOT(**TINY_IBOT, views=IBOT_VIEWS.replace(local_crop_size=8, local_crops_number=2,
                 pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2)))  # fmt: skip
    pil = model.views.pil(16, MEAN, STD)
    device = model.views.device(16, MEAN, STD)
    for view, recipe in zip(pil.crops.transforms, device.recipes, strict=True):
        assert_same_recipe(recipe, view)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    out = device(images)
    torch.manual_seed(0)
    again = device(images)
    assert [v.shape[-1] for v in out["views"]] == [16, 16, 8, 8]
    masks = out["masks"]
    assert len(masks) == 2 and all(m.shape == (64, 4, 4) and m.dtype == torch.bool for m in masks)
    assert all(torch.equal(a, b) for a, b in zip(masks, again["masks"], strict=True))
    # (0, 0.3) with (0, 0.2): about half of the images unmasked, the others 0.3 +- 0.2 masked
    ratio = torch.cat(masks).float().mean((1, 2))
    assert 0.3 < (ratio == 0).float().mean() < 0.7 and ratio.max() <= 0.5 + 1 / 16
    assert not torch.equal(masks[0], masks[1])  # each global crop has its own masks
    # and it trains through the in-memory device path
    dm = CIFAR10DataModule(str(cifar_folder(tmp_path)), batch_size=8, image_size=16,
                           num_workers=0, device_augment=True)  # fmt: skip
    crops, labels = fit(model, dm)[0]
    assert [v.shape for v in crops["views"][:2]] == [(8, 3, 16, 16)] * 2
    assert [m.shape for m in crops["masks"]] == [(8, 4, 4)] * 2 and labels.shape == (8,)


@dataclass(frozen=True)
class PILOnly(Views):
    """A recipe with PIL views only (SimCLR's)."""

    def pil(self, image_size: int, mean: Stats, std: Stats) -> Transform:
        return SIMCLR_VIEWS.pil(image_size, mean, std)


def test_a_recipe_without_device_views_gets_a_clear_error(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(cifar_folder(tmp_path)), batch_size=4, image_size=16,
                           num_workers=0, device_augment=True)  # fmt: skip
    model = SimCLR(**TINY_RESNET, views=PILOnly())
    dm.views = model.views
    with pytest.raises(ValueError, match="PILOnly has no device views.*device_augment: false"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)


# ------------------------------------------------------------------ vs lightly's PIL views


def test_multicrop_device_views_have_the_statistics_of_lightly_views(
    cifar_sample: np.ndarray,
) -> None:
    dino = DINO(**SMALL_DINO, views=dino_views(local_crops_number=1, local_crop_size=16))
    swav = SwAV(**SMALL_SWAV, views=SWAV_VIEWS.replace(nmb_crops=(1, 1), size_crops=(32, 16)))
    mae = MAE(**TINY_MAE)
    for model, size in ((dino, 32), (swav, 32), (mae, 16)):
        pil = lightly_statistics(model.views.pil(size, MEAN, STD), cifar_sample)
        device = device_statistics(model.views.device(size, MEAN, STD), cifar_sample)
        assert similar(pil, device), type(model).__name__
    # the comparison has power: DINO's views without colour jitter are told apart
    plain = DINO(**SMALL_DINO, views=dino_views(local_crops_number=1, local_crop_size=16,
                                                color_jitter_prob=0.0))  # fmt: skip
    pil = lightly_statistics(dino.views.pil(32, MEAN, STD), cifar_sample)
    assert not similar(pil, device_statistics(plain.views.device(32, MEAN, STD),
                                              cifar_sample))  # fmt: skip


def test_worker_crops_then_device_photometry_have_the_statistics_of_lightly_views(
    cifar_sample: np.ndarray,
) -> None:
    dino = DINO(**SMALL_DINO, views=dino_views(local_crops_number=1, local_crop_size=16))
    for model, size in ((SimCLR(**TINY_RESNET), 32), (dino, 32)):
        device_views = model.views.device(size, MEAN, STD)
        crops = CropViews(device_views.recipes)
        torch.manual_seed(0)
        cropped = [crops(Image.fromarray(im)) for im in cifar_sample]
        per_view = [torch.stack([c[k] for c in cropped]) for k in range(len(crops.recipes))]
        for batch, recipe in zip(per_view, device_views.recipes, strict=True):
            assert batch.dtype == torch.uint8 and batch.shape[-2:] == recipe.out_size
        device = [view_statistics(v) for v in device_views(per_view)]
        pil = lightly_statistics(model.views.pil(size, MEAN, STD), cifar_sample)
        assert similar(pil, device), type(model).__name__


def test_crop_views_draw_from_the_seeded_generator() -> None:
    image = Image.fromarray((smooth_images(1, 40, 30)[0] * 255).byte().permute(1, 2, 0).numpy())
    crops = CropViews(twin_views(12, MEAN, STD).recipes)
    torch.manual_seed(3)
    a = crops(image)
    torch.manual_seed(3)
    b = crops(image)
    c = crops(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])
    assert [v.shape for v in a] == [(3, 12, 12)] * 2
    with pytest.raises(ValueError, match="3 cropped views for 2 recipes"):
        twin_views(12, MEAN, STD)([a[0][None]] * 3)


# ------------------------------------------------------------------ training through both paths


def fit(model, datamodule, steps: int = 2) -> list:  # noqa: ANN001
    """``steps`` training steps; returns the batches training_step received."""
    datamodule.views = model.views  # as ``sslzoo fit`` hands the model's recipe over
    keep = KeepBatches()
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[keep])
    trainer.fit(model, datamodule=datamodule)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    return keep.batches


@pytest.mark.parametrize("method", ["dino", "swav", "mae"])
def test_multicrop_methods_train_on_in_memory_device_views(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    model = {
        "dino": lambda: DINO(
            **SMALL_DINO, views=dino_views(local_crops_number=2, local_crop_size=8)
        ),  # fmt: skip
        "swav": lambda: SwAV(**SMALL_SWAV, views=SMALL_SWAV_VIEWS),
        "mae": lambda: MAE(**TINY_MAE),
    }[method]()
    dm = CIFAR10DataModule(str(cifar_folder(tmp_path)), batch_size=8, image_size=16,
                           num_workers=0, device_augment=True)  # fmt: skip
    views, labels = fit(model, dm)[0]
    sizes = {"dino": [16, 16, 8, 8], "swav": [16, 16, 8, 8], "mae": [16]}[method]
    assert [v.shape[-1] for v in views] == sizes and labels.shape == (8,)
    assert all(v.dtype == torch.float32 and v.shape[:2] == (8, 3) for v in views)


def folder_dm(root: Path, **kwargs) -> ImageFolderDataModule:  # noqa: ANN003
    return ImageFolderDataModule(str(root / "train"), str(root / "test"), batch_size=8,
                                 num_workers=0, image_size=16, eval_resize_ratio=1.0,
                                 device_augment=True, **kwargs)  # fmt: skip


def test_image_folder_device_path_crops_in_workers_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    root = cifar_folder(tmp_path)
    simclr = folder_dm(root)
    simclr.views = SimCLR(**TINY_RESNET).views
    assert isinstance(simclr.train_transform(), CropViews)
    runs = []
    for torch_seed in (0, 1):
        torch.manual_seed(torch_seed)
        model = DINO(**SMALL_DINO, views=dino_views(local_crops_number=2, local_crop_size=8))
        runs.append(fit(model, folder_dm(root)))
    (views, _), (again, _) = runs[0][0], runs[1][0]
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
    dm = folder_dm(root)
    pixels = torch.stack(views[:2]) * torch.tensor(dm.std)[:, None, None]
    pixels = pixels + torch.tensor(dm.mean)[:, None, None]  # undo the normalisation
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    # worker crops are seeded per item and device photometry per batch: another model
    # initialisation sees the same views
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))


def test_device_views_compile_as_one_graph() -> None:
    # fullgraph tracing fails on any graph break (a host read, Python branching on a tensor);
    # the eager backend keeps the test quick and the random draws those of eager mode
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    dino = DINO(**SMALL_DINO, views=dino_views(local_crops_number=2, local_crop_size=8,
                                               solarize_prob=0.5))  # fmt: skip
    ibot = IBOT(**TINY_IBOT, views=IBOT_VIEWS.replace(local_crops_number=2, local_crop_size=8))
    for views in (
        twin_views(16, MEAN, STD, gaussian_blur=0.5),
        dino.views.device(16, MEAN, STD),
        ibot.views.device(16, MEAN, STD),
    ):
        torch.manual_seed(0)
        eager = views(images)
        compiled = compile_views(views, backend="eager")
        torch.manual_seed(0)
        out = compiled(images)
        if isinstance(out, dict):  # iBOT: only the views are compiled, masks stay eager
            assert isinstance(compiled.views, torch._dynamo.eval_frame.OptimizedModule)
            eager, out = eager["views"], out["views"]
        for a, b in zip(eager, out, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_identical_local_crops_are_one_batch_with_their_own_draws() -> None:
    """Consecutive identical recipes (DINO's local crops) are augmented as one batch of k x N
    images: every local crop of every image still draws its own crop and colours, and each
    returned view is the one its position names, on whole images and on worker crops."""
    glob = ViewRecipe(size=16, scale=(0.4, 1.0), blur_prob=1.0, mean=MEAN, std=STD)
    local = ViewRecipe(size=8, scale=(0.05, 0.4), blur_prob=0.5, solarize_prob=0.2,
                       mean=MEAN, std=STD)  # fmt: skip
    views = DeviceViews([glob, local, local, local])
    assert views.runs == ((0, 1), (1, 4))
    one = (smooth_images(1, 24, 24) * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    out = views(one.expand(5, -1, -1, -1))  # five copies of one image
    assert [v.shape for v in out] == [(5, 3, 16, 16)] + [(5, 3, 8, 8)] * 3
    locals_ = torch.cat(out[1:]).flatten(1)  # 15 local crops of one image
    assert (torch.cdist(locals_, locals_) + torch.eye(15) > 1e-3).all()  # all pairs differ
    # worker crops: with the colour steps off, each output is its own input, in its place
    plain = ViewRecipe(size=8, jitter_prob=0.0, grayscale_prob=0.0, mean=(0.0,) * 3,
                       std=(1.0,) * 3)  # fmt: skip
    crops = [torch.full((2, 3, 8, 8), 10 * i, dtype=torch.uint8) for i in range(4)]
    for got, crop in zip(DeviceViews([plain] * 4)(crops), crops, strict=True):
        torch.testing.assert_close(got, crop.float() / 255)
    with pytest.raises(ValueError, match="3 cropped views for 4 recipes"):
        views(crops[:3])
