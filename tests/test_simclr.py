"""SimCLR: NT-Xent against the official formula, the v2 head, and lightly's view recipe."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss as LightlyNTXentLoss
from lightly.transforms import SimCLRTransform
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T

from sslzoo.datamodules import DigitsDataModule
from sslzoo.losses.contrastive import NTXentLoss
from sslzoo.methods.simclr import OPTIM, VIEWS, SimCLR, projection_head
from tests.conftest import TINY_RESNET
from tests.helpers import quiet_trainer
from tests.test_schedules import simclr_warmup_and_cosine_decay


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """tf2 add_contrastive_loss written out per sample: loss_a + loss_b, each a batch mean."""
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = len(a)
    total = 0.0
    for anchors, others_same, others_cross in ((a, a, b), (b, b, a)):
        direction = 0.0
        for i in range(n):
            positive = math.exp(float(anchors[i] @ others_cross[i]) / t)
            denominator = sum(math.exp(float(anchors[i] @ others_cross[j]) / t) for j in range(n))
            denominator += sum(
                math.exp(float(anchors[i] @ others_same[j]) / t) for j in range(n) if j != i
            )
            direction += -math.log(positive / denominator)
        total += direction / n
    return total


def test_nt_xent_matches_official_formula() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    for t in (0.1, 0.5):
        assert math.isclose(
            float(NTXentLoss(t)(z1, z2)), reference_nt_xent(z1, z2, t), rel_tol=1e-5
        )


def test_nt_xent_is_twice_lightlys_mean() -> None:
    """lightly's NTXentLoss averages the two directions; the official loss sums them. The
    factor matters for SGD/LARS on unadapted parameters, so we keep the official scale."""
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    ours = NTXentLoss(0.5)(z1, z2)
    assert torch.allclose(ours, 2 * LightlyNTXentLoss(temperature=0.5)(z1, z2), atol=1e-5)


def test_projection_head_is_v2_layout() -> None:
    head = projection_head(32, 32, 8, num_layers=3, init_std=0.01)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    bns = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == 3 and all(lin.bias is None for lin in linears)
    assert len(bns) == 3 and sum(isinstance(m, nn.ReLU) for m in head) == 2
    assert isinstance(head[-1], nn.BatchNorm1d)
    assert head[-1].weight.requires_grad and not head[-1].bias.requires_grad
    assert all(bn.bias.requires_grad for bn in bns[:-1])


def test_projection_head_starts_from_the_official_normal_init() -> None:
    """tf2/model.py ``LinearLayer``: ``Dense(kernel_initializer=RandomNormal(stddev=0.01))``;
    PyTorch's default (kaiming uniform) has std 1 / sqrt(3 fan_in), 0.014 at fan_in 1600."""
    torch.manual_seed(0)
    for init_std, expected in ((0.01, 0.01), (None, 1 / math.sqrt(3 * 1600))):
        head = projection_head(1600, 1600, 1600, num_layers=3, init_std=init_std)
        for lin in (m for m in head if isinstance(m, nn.Linear)):
            assert float(lin.weight.std()) == pytest.approx(expected, rel=0.01)
            assert abs(float(lin.weight.mean())) < 1e-4
    model = SimCLR(**TINY_RESNET, sync_batchnorm=False, proj_init_std=0.05)
    assert float(model.projection_head[0].weight.std()) == pytest.approx(0.05, rel=0.05)


def test_view_recipe_matches_simclr() -> None:
    """SimCLR's views are the official recipe: crop (0.08, 1) from TensorFlow's sampler, bicubic,
    colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8 in a random order (``color_jitter_rand``)
    with TensorFlow's ops, grayscale 0.2, flip; lightly's SimCLRTransform with its crop, jitter
    and blur steps swapped for the official ones (tests/test_tf_recipe.py)."""
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, sync_batchnorm=False)
    views = model.views.pil(32, (0.5,) * 3, (0.25,) * 3)
    assert isinstance(views, SimCLRTransform)
    ops = views.transforms[0].transform.transforms
    crop = next(o for o in ops if type(o).__name__ == "SampledResizedCrop")
    assert crop.scale == (0.08, 1.0) and tuple(crop.size) == (32, 32)
    assert (crop.sampler, crop.interpolation) == ("simclr", "bicubic")
    cj = next(o for o in ops if type(o).__name__ == "TensorColorJitter")
    assert cj.prob == 0.8 and cj.color_ops == "simclr"
    assert cj.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2))
    gray = next(o for o in ops if type(o).__name__ == "RandomGrayscale")
    assert gray.p == 0.2
    out = views(T.functional.to_pil_image(torch.rand(3, 40, 40)))
    assert len(out) == 2 and out[0].shape == (3, 32, 32)


def test_training_step_returns_backbone_features() -> None:
    torch.manual_seed(0)
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = model.training_step(([x1, x2], torch.arange(4)), 0)
    assert out["loss"].requires_grad
    assert out["features"].shape == (4, model.backbone.num_features)
    assert not out["features"].requires_grad


# ------------------------------------------------------------------ learning-rate schedule
def official_lr(
    step: int, lr: float, num_examples: int, batch: int, epochs: int, warmup_epochs: float
) -> float:
    """tf2/model.py written out: ``get_train_steps`` (no ``train_steps``) and
    ``WarmUpAndCosineDecay``'s warmup length, with linear scaling."""
    total = num_examples * epochs // batch + 1
    warmup = int(round(warmup_epochs * num_examples // batch))
    return simclr_warmup_and_cosine_decay(step, lr * batch / 256, warmup, total)


def stub_trainer(num_examples: int, local_batch: int, world: int, epochs: int) -> Any:
    """What a Lightning trainer reports to the method on rank 0 of ``world`` ranks, each with
    its DistributedSampler share of the images in full batches."""
    images = range(num_examples)
    sampler = DistributedSampler(images, num_replicas=world, rank=0, shuffle=False)
    loader = DataLoader(images, batch_size=local_batch, sampler=sampler, drop_last=True)
    return SimpleNamespace(
        train_dataloader=loader,
        num_training_batches=len(loader),
        estimated_stepping_batches=len(loader) * epochs,
        datamodule=SimpleNamespace(batch_size=local_batch),
        world_size=world,
        accumulate_grad_batches=1,
        max_epochs=epochs,
        max_steps=-1,
    )


@pytest.mark.parametrize("local_batch, world", [(4096, 1), (512, 8)])
def test_schedule_counts_steps_as_the_official_code_at_imagenet_size(
    local_batch: int, world: int
) -> None:
    """ImageNet (1,281,167 images), batch 4096, 100 epochs, 10 warmup epochs: the official
    schedule spans 31279 steps with 3127 of warmup, where whole epochs of full batches (312
    each) would give 31200 and 3120."""
    model = SimCLR(**TINY_RESNET, sync_batchnorm=False)  # lr 0.3, linear scaling, warmup 10
    model.trainer = stub_trainer(1_281_167, local_batch, world, epochs=100)
    for step in (0, 1, 1500, 3120, 3126, 3127, 3128, 20000, 31199, 31278, 31279, 31300):
        expected = official_lr(step, 0.3, 1_281_167, 4096, 100, 10.0)
        assert model.learning_rate_at(step) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert (model.total_steps, model.warmup_steps) == (31279, 3127)


class RecordLR(L.Callback):
    """The learning rate each optimizer step runs with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_short_run_follows_the_official_schedule() -> None:
    """A real run whose epochs drop an incomplete batch: each step's learning rate is the
    official one for the training set's size, warmup and cosine counted as tf2/model.py."""
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=16, num_workers=0, image_size=16, val_fraction=0.95)
    model = SimCLR(
        **TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False,
        views=VIEWS.replace(blur_prob=(0.0, 0.0)),
        optim=OPTIM.replace(optimizer="sgd", lr=0.4, warmup_epochs=2),
    )  # fmt: skip
    data.views = model.views
    record = RecordLR()
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[record])
    trainer.fit(model, datamodule=data)
    n = len(data.train_set)
    assert n % 16 >= 8  # the official counts differ from whole batches': 11 warmup steps, not 10
    assert len(record.lrs) == 3 * (n // 16)  # the trainer still trains whole epochs
    expected = [official_lr(s, 0.4, n, 16, 3, 2.0) for s in range(len(record.lrs))]
    assert record.lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert (model.total_steps, model.warmup_steps) == (n * 3 // 16 + 1, 2 * n // 16)
