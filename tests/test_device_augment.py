"""Per-sample augmentation on batched tensors (sslzoo.augment) and the device data path.

Three kinds of checks: each op with fixed per-sample parameters equals torchvision's functional
op applied image by image; parameters are drawn per sample and per view with torchvision's
distributions; the device views of our recipes have the pixel statistics of lightly's PIL views.
Then each method's device recipe against its lightly recipe, the CIFAR datamodule with
``device_augment`` (batches cut on the device) and SimCLR training through it.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    SimCLRTransform,
)

from sslzoo.augment import DeviceViews, ViewRecipe, asymmetric_views, ops, twin_views
from sslzoo.augment.params import crop_boxes, jitter_params, jitter_ranges
from sslzoo.augment.recipes import TwoViews
from sslzoo.datamodules import CIFAR10DataModule
from sslzoo.datamodules.device_batches import DeviceBatches, UInt8Images
from sslzoo.methods.byol import BYOL
from sslzoo.methods.byol import VIEWS as BYOL_VIEWS
from sslzoo.methods.mocov3 import VIEWS as MOCOV3_VIEWS
from sslzoo.methods.mocov3 import MoCoV3
from sslzoo.methods.simclr import OPTIM as SIMCLR_OPTIM
from sslzoo.methods.simclr import VIEWS as SIMCLR_VIEWS
from sslzoo.methods.simclr import SimCLR
from sslzoo.methods.simsiam import VIEWS as SIMSIAM_VIEWS
from sslzoo.methods.simsiam import SimSiam
from tests.augment_helpers import (
    ATOL,
    MEAN,
    STD,
    Z_MAX,
    KeepBatches,
    assert_same_recipe,
    cifar_folder,
    device_statistics,
    lightly_statistics,
    read_cifar_sample,
    similar,
    smooth_images,
    z_score,
)
from tests.conftest import TINY_RESNET
from tests.helpers import quiet_trainer

# ------------------------------------------------------------------ ops vs torchvision


def test_resized_crop_and_flip_match_torchvision() -> None:
    x = smooth_images(6, 20, 24)
    top = torch.tensor([0.0, 3, 5, 2, 0, 10])
    left = torch.tensor([0.0, 1, 7, 4, 0, 2])
    height = torch.tensor([20.0, 5, 15, 18, 10, 10])  # down- and upscaling, both axes
    width = torch.tensor([24.0, 6, 17, 20, 24, 3])
    flip = torch.tensor([False, True, False, True, True, False])
    for antialias in (True, False):
        out = ops.resized_crop(x, top, left, height, width, (16, 12), flip, antialias)
        for i in range(len(x)):
            box = [int(v[i]) for v in (top, left, height, width)]
            ref = TF.resized_crop(x[i], *box, [16, 12], antialias=antialias)
            ref = TF.horizontal_flip(ref) if flip[i] else ref
            torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)
    flipped = ops.horizontal_flip(x, flip)
    for i in range(len(x)):
        torch.testing.assert_close(flipped[i], TF.horizontal_flip(x[i]) if flip[i] else x[i])


def test_color_ops_match_torchvision() -> None:
    x = smooth_images(6, 12, 10, seed=1)
    factor = torch.tensor([0.0, 0.2, 0.6, 1.0, 1.4, 1.8])
    shift = torch.tensor([-0.5, -0.2, -0.05, 0.0, 0.1, 0.5])
    cases = [
        (ops.adjust_brightness, TF.adjust_brightness, factor),
        (ops.adjust_contrast, TF.adjust_contrast, factor),
        (ops.adjust_saturation, TF.adjust_saturation, factor),
        (ops.adjust_hue, TF.adjust_hue, shift),
    ]
    for ours, theirs, values in cases:
        out = ours(x, values)
        for i in range(len(x)):
            torch.testing.assert_close(out[i], theirs(x[i], float(values[i])), atol=ATOL, rtol=0)
    on = torch.tensor([True, False, True, False, True, True])
    gray = ops.grayscale(x, on)
    sol = ops.solarize(x, on, 128 / 255)
    for i in range(len(x)):
        ref_gray = TF.rgb_to_grayscale(x[i], num_output_channels=3) if on[i] else x[i]
        torch.testing.assert_close(gray[i], ref_gray, atol=ATOL, rtol=0)
        torch.testing.assert_close(sol[i], TF.solarize(x[i], 128 / 255) if on[i] else x[i])
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    torch.testing.assert_close(
        ops.normalize(x, mean, std), TF.normalize(x, mean.tolist(), std.tolist()), atol=ATOL, rtol=0
    )


def test_gaussian_blur_matches_torchvision() -> None:
    x = smooth_images(6, 20, 24, seed=2)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 3.0])
    for kernel_size in (5, 13):
        out = ops.gaussian_blur(x, sigma, kernel_size)
        for i in range(len(x)):
            s = float(sigma[i])
            ref = TF.gaussian_blur(x[i], [kernel_size, kernel_size], [s, s])
            torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_color_jitter_applies_each_samples_ops_in_its_order() -> None:
    x = smooth_images(5, 8, 8, seed=3)
    factors = torch.tensor(
        [[0.7, 1.3, 0.4, 0.1], [1.5, 0.6, 1.8, -0.3], [1.2, 1.0, 0.0, 0.45],
         [0.3, 1.9, 1.1, -0.05], [1.1, 0.8, 1.2, 0.2]]
    )  # fmt: skip
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [0, 2, 1, 3]])
    apply = torch.tensor([True, True, True, True, False])
    tv_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = ops.color_jitter(x, factors, order, apply)
    for i in range(len(x)):
        ref = x[i]
        for op in order[i].tolist() if apply[i] else []:
            ref = tv_ops[op](ref, float(factors[i, op]))
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_color_jitter_follows_all_24_orders_with_or_without_hue() -> None:
    """Hue runs once for the whole batch; every order, hue at any position, still matches."""
    orders = torch.tensor(list(itertools.permutations(range(4))))
    x = smooth_images(len(orders), 6, 6, seed=4)
    gen = torch.Generator().manual_seed(4)
    factors = torch.rand(len(orders), 4, generator=gen) * torch.tensor([1.6, 1.6, 1.6, 0.8])
    factors += torch.tensor([0.2, 0.2, 0.2, -0.4])
    tv_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    apply = torch.ones(len(orders), dtype=torch.bool)
    for use_hue in (True, False):
        out = ops.color_jitter(x, factors, orders, apply, use_hue=use_hue)
        for i, order in enumerate(orders.tolist()):
            ref = x[i]
            for op in order if use_hue else [op for op in order if op != 3]:
                ref = tv_ops[op](ref, float(factors[i, op]))
            torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ per-sample parameters


def test_crop_boxes_follow_torchvision_random_resized_crop() -> None:
    torch.manual_seed(0)
    n, height, width = 4000, 24, 32
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = crop_boxes(n, height, width, scale, ratio, torch.device("cpu"))
    ours = torch.stack([ours.top, ours.left, ours.height, ours.width], 1)
    dummy = torch.zeros(3, height, width)
    ref = torch.tensor([T.RandomResizedCrop.get_params(dummy, scale, ratio) for _ in range(n)])
    assert (ours[:, 2:] >= 1).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] + ours[:, 3] <= width).all() and (ours == ours.round()).all()
    distinct = lambda b: len({tuple(row) for row in b.tolist()})  # noqa: E731
    assert distinct(ours) > 0.9 * distinct(ref)  # as varied as one torchvision draw per image
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    stats = lambda b: torch.stack([*b.T, area(b), torch.log(b[:, 3] / b[:, 2])], 1)  # noqa: E731
    assert z_score(stats(ours), stats(ref.double())).abs().max() < Z_MAX
    # no candidate can fit when every area is larger than the image: the central fallback,
    # with the aspect clamped into ``ratio`` for images outside it, exactly as torchvision
    for h, w in ((10, 40), (40, 10), (20, 20)):
        box = crop_boxes(3, h, w, (1.5, 2.0), (0.5, 2.0), torch.device("cpu"))
        expected = T.RandomResizedCrop.get_params(torch.zeros(3, h, w), [1.5, 2.0], [0.5, 2.0])
        for i in range(3):
            assert [int(v[i]) for v in (box.top, box.left, box.height, box.width)] == list(expected)


def test_jitter_factors_and_orders_are_drawn_per_sample() -> None:
    torch.manual_seed(1)
    n = 6000
    ranges = jitter_ranges(0.8, 0.4, 1.5, 0.2)
    cj = T.ColorJitter(0.8, 0.4, 1.5, 0.2)  # torchvision's own ranges
    assert ranges == [tuple(r) for r in (cj.brightness, cj.contrast, cj.saturation, cj.hue)]
    low, high = (torch.tensor([r[i] for r in ranges]) for i in (0, 1))
    factors, order = jitter_params(n, low, high)
    assert (factors >= low).all() and (factors <= high).all()
    # uniform: mean (a + b) / 2 with standard error (b - a) / sqrt(12 n)
    z = (factors.mean(0) - (low + high) / 2) / ((high - low) / math.sqrt(12 * n))
    assert z.abs().max() < Z_MAX
    assert (order.sort(1).values == torch.arange(4)).all()  # each row a permutation
    freq = torch.stack([(order == op).float().mean(0) for op in range(4)])  # op x position
    assert ((freq - 0.25) / math.sqrt(0.25 * 0.75 / n)).abs().max() < Z_MAX
    assert len({tuple(o) for o in order.tolist()}) == 24


def test_every_image_and_view_gets_its_own_parameters() -> None:
    torch.manual_seed(2)
    image = (smooth_images(1, 16, 16) * 255).round().to(torch.uint8)
    batch = image.expand(12, -1, -1, -1)  # twelve copies of one image
    v1, v2 = twin_views(16, (0.5,) * 3, (0.25,) * 3)(batch)
    assert v1.shape == v2.shape == (12, 3, 16, 16) and v1.dtype == torch.float32
    for views in (v1, v2):
        flat = views.flatten(1)
        assert (torch.cdist(flat, flat) + torch.eye(12) > 1e-3).all()  # all pairs differ
    assert ((v1 - v2).flatten(1).abs().amax(1) > 1e-3).all()  # the two views of each differ


def test_application_probabilities_match_the_recipe() -> None:
    torch.manual_seed(3)
    n = 4000
    plain = dict(size=4, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=0.0, jitter_prob=0.0,
                 grayscale_prob=0.0, mean=(0.0,) * 3, std=(1.0,) * 3)  # fmt: skip
    colour = torch.tensor([0.9, 0.6, 0.55])[:, None, None].expand(3, 4, 4)
    ramp = torch.linspace(0.55, 0.95, 4).expand(3, 4, 4)  # bright, asymmetric, not flat
    images = (colour * ramp).expand(n, -1, -1, -1).contiguous()

    def changed(v: torch.Tensor) -> torch.Tensor:
        return (v - images).abs().amax((1, 2, 3)) > 1e-4

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return (v - images.flip(-1)).abs().amax((1, 2, 3)) < 1e-6

    def gray(v: torch.Tensor) -> torch.Tensor:
        return (v - v.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 1e-6

    def solarized(v: torch.Tensor) -> torch.Tensor:
        return v.mean((1, 2, 3)) < 0.4  # every pixel is above the threshold, so all flip

    checks = [
        ({"hflip_prob": 0.3}, mirrored, 0.3),
        ({"grayscale_prob": 0.2}, gray, 0.2),
        ({"solarize_prob": 0.4}, solarized, 0.4),
        ({"blur_prob": 0.7, "blur_sigma": (1.0, 2.0)}, changed, 0.7),
        ({"jitter_prob": 0.8, "jitter": (0.5, 0.0, 0.0, 0.0)}, changed, 0.8),
    ]
    for settings, hit, p in checks:
        (view,) = DeviceViews([ViewRecipe(**{**plain, **settings})])(images)
        rate = hit(view).float().mean()
        assert abs(rate - p) / math.sqrt(p * (1 - p) / n) < Z_MAX, (settings, float(rate))


# ------------------------------------------------------------------ recipes of the methods


@pytest.mark.parametrize(
    "method, views, settings",
    [
        (SimCLR, SIMCLR_VIEWS.replace(
            crop_min_scale=0.3, color_jitter_strength=0.5, color_jitter_prob=0.7,
            grayscale_prob=0.1, blur_prob=(0.3, 0.3), blur_sigma=(0.2, 1.5), hflip_prob=0.4),
         dict()),
        (BYOL, BYOL_VIEWS.replace(
            crop_min_scale=0.2, color_jitter_prob=0.6, blur_prob=(0.9, 0.2),
            solarize_prob=(0.1, 0.3), hflip_prob=0.3),
         dict(projector_hidden_dim=8, predictor_hidden_dim=8)),
        (MoCoV3, MOCOV3_VIEWS.replace(color_jitter=(0.3, 0.2, 0.1, 0.05), grayscale_prob=0.3),
         dict(moco_mlp_dim=8)),
        (SimSiam, SIMSIAM_VIEWS.replace(color_jitter=(0.5, 0.3, 0.2, 0.0), blur_prob=(0.2, 0.2)),
         dict(pred_dim=8, dim=8)),
    ],
)  # fmt: skip
def test_device_recipe_mirrors_the_methods_lightly_recipe(method, views, settings) -> None:  # noqa: ANN001
    model = method(**TINY_RESNET, **settings, views=views)
    pil = model.views.pil(24, MEAN, STD)
    device = model.views.device(24, MEAN, STD)
    assert len(pil.transforms) == len(device.recipes) == 2
    for view, recipe in zip(pil.transforms, device.recipes, strict=True):
        assert_same_recipe(recipe, view)


# ------------------------------------------------------------------ vs lightly's PIL views


@pytest.fixture(scope="module")
def cifar_sample() -> np.ndarray:
    return read_cifar_sample()


def test_device_views_have_the_statistics_of_lightly_views(cifar_sample: np.ndarray) -> None:
    normalize = {"mean": list(MEAN), "std": list(STD)}
    simclr = lightly_statistics(SimCLRTransform(input_size=32, normalize=normalize), cifar_sample)
    byol = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=32, normalize=normalize),
        view_2_transform=BYOLView2Transform(input_size=32, normalize=normalize),
    )
    assert similar(simclr, device_statistics(twin_views(32, MEAN, STD), cifar_sample))
    byol_stats = lightly_statistics(byol, cifar_sample)
    assert similar(byol_stats, device_statistics(asymmetric_views(32, MEAN, STD), cifar_sample))
    # the comparison has power: views without colour jitter are told apart
    no_jitter = twin_views(32, MEAN, STD, cj_prob=0.0)
    assert not similar(simclr, device_statistics(no_jitter, cifar_sample))


# ------------------------------------------------------------------ the device data path


def test_datamodule_with_device_augment_yields_uint8_batches(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(cifar_folder(tmp_path)), batch_size=4, num_workers=2,
                           device_augment=True)  # fmt: skip
    # setting up for training needs a recipe; the batches are whole images whichever it is
    dm.views = TwoViews()
    dm.setup("fit")
    images, labels = dm.arrays("train")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    seen = []
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and y.shape == (4,)
        for image, label in zip(x, y, strict=True):
            match = np.flatnonzero((images == image.permute(1, 2, 0).numpy()).all((1, 2, 3)))
            assert len(match) == 1 and labels[match[0]] == label
            seen.append(int(match[0]))
    assert sorted(seen) == list(range(20))  # one epoch is a permutation of the images
    assert [x.tolist() for x, _ in batches] == [x.tolist() for x, _ in loader]  # seeded
    assert seen != sorted(seen)
    val_image, _ = dm.val_set[0]  # the evaluation path is unchanged
    assert val_image.dtype == torch.float32 and val_image.shape == (3, 32, 32)


def test_device_batches_shard_ranks_and_resume_mid_epoch() -> None:
    images = np.arange(22 * 2 * 2 * 3, dtype=np.uint8).reshape(22, 2, 2, 3)
    dataset = UInt8Images(images, np.arange(22))

    def loader(rank: int) -> DeviceBatches:
        trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device("cpu")), global_rank=rank,
            world_size=2,
        )  # fmt: skip
        dm = SimpleNamespace(trainer=trainer, training_epoch=lambda: 3)
        return DeviceBatches(dataset, batch_size=3, datamodule=dm)

    ranks = [[y.tolist() for _, y in loader(rank)] for rank in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]  # 22 images: 11 per rank, 3 full batches of 3
    seen = [label for r in ranks for batch in r for label in batch]
    assert len(set(seen)) == len(seen) == 18  # the ranks never share an image
    first = loader(0)
    full = [(x.clone(), y.clone()) for x, y in first]
    assert first.state_dict() == {"epoch": 3, "batches": 3}
    resumed = loader(0)
    resumed.load_state_dict({"epoch": 3, "batches": 1})
    rest = list(resumed)
    assert len(rest) == 2  # the batches after the first, as in the uninterrupted epoch
    for (x, y), (x_full, y_full) in zip(rest, full[1:], strict=True):
        assert torch.equal(x, x_full) and torch.equal(y, y_full)
    for x, y in full:  # each label's image is that image
        assert torch.equal(x, dataset.images[y])


def fit_simclr(root: Path, torch_seed: int) -> tuple[list, SimCLR, CIFAR10DataModule]:
    """Two SimCLR steps on device views; returns the batches training_step received."""
    torch.manual_seed(torch_seed)
    dm = CIFAR10DataModule(str(root), batch_size=8, image_size=16, num_workers=0,
                           device_augment=True)  # fmt: skip
    model = SimCLR(
        **TINY_RESNET, views=SIMCLR_VIEWS.replace(blur_prob=(0.5, 0.5)),
        optim=SIMCLR_OPTIM.replace(optimizer="sgd"), proj_out_dim=16,
    )  # fmt: skip
    dm.views = model.views
    keep = KeepBatches()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[keep])
    trainer.fit(model, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    return keep.batches, model, dm


def test_simclr_trains_on_device_views(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    root = cifar_folder(tmp_path)
    batches, model, dm = fit_simclr(root, torch_seed=0)
    assert len(batches) == 2
    (v1, v2), labels = batches[0]
    assert v1.dtype == v2.dtype == torch.float32 and v1.shape == v2.shape == (8, 3, 16, 16)
    assert labels.shape == (8,) and not torch.equal(v1, v2)
    pixels = torch.stack([v1, v2]) * torch.tensor(dm.std)[:, None, None]
    pixels = pixels + torch.tensor(dm.mean)[:, None, None]  # undo the normalisation
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    # each batch's views depend on (global seed, epoch, batch, rank) only, not on the state of
    # the generators before it: another initialisation draws the same views
    again, _, _ = fit_simclr(root, torch_seed=1)
    for ((a1, a2), _), ((b1, b2), _) in zip(batches, again, strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    # evaluation batches (float images) pass through the hook unchanged
    batch = (torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    assert dm.on_after_batch_transfer(batch, 0) is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("official", [False, True], ids=["lightly", "official"])
def test_device_views_never_sync_with_the_host(official: bool) -> None:
    if official:  # bicubic crops, BYOL's colour ops, zero-padded blur
        model = BYOL(**TINY_RESNET, projector_hidden_dim=8, predictor_hidden_dim=8)
        views = model.views.device(32, MEAN, STD).cuda()
    else:
        views = asymmetric_views(32, MEAN, STD).cuda()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    views(images)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = views(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda and v.shape == (64, 3, 32, 32) for v in out)
