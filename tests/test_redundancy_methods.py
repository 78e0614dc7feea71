"""Barlow Twins and VICReg on the method contract: their heads as the official code builds them,
each view through the backbone on its own (its own BatchNorm statistics), and the official
learning-rate schedule of both (main.py / main_vicreg.py ``adjust_learning_rate``), with Barlow
Twins' separate learning rate for biases and norms."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from sslzoo.methods import BarlowTwins, VICReg, barlowtwins, vicreg
from sslzoo.optim.settings import Optimization
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer
from tests.test_heads import layout

SMALL = dict(**TINY_RESNET, sync_batchnorm=False)


def test_barlow_twins_projector_and_loss_norm_are_the_official_ones() -> None:
    """main.py: ``sizes = [2048] + projector``; Linear(no bias) -> BN -> ReLU per hidden
    layer, a last Linear without bias; ``BatchNorm1d(sizes[-1], affine=False)`` in the loss."""
    model = BarlowTwins(**SMALL, projector_dims=(32, 32, 16))
    assert layout(model.projector) == [
        "Linear(128,32,bias=False)", "BN(32,affine=True,shift=True)", "ReLU",
        "Linear(32,32,bias=False)", "BN(32,affine=True,shift=True)", "ReLU",
        "Linear(32,16,bias=False)",
    ]  # fmt: skip
    assert (model.criterion.bn.num_features, model.criterion.bn.affine) == (16, False)
    assert model.criterion.lambd == 0.0051


def test_vicreg_expander_is_the_official_one() -> None:
    """main_vicreg.py ``Projector``: Linear (with bias) -> BN -> ReLU per hidden layer, a last
    Linear without bias."""
    model = VICReg(**SMALL, expander_dims=(32, 32, 16))
    assert layout(model.expander) == [
        "Linear(128,32,bias=True)", "BN(32,affine=True,shift=True)", "ReLU",
        "Linear(32,32,bias=True)", "BN(32,affine=True,shift=True)", "ReLU",
        "Linear(32,16,bias=False)",
    ]  # fmt: skip
    c = model.criterion
    assert (c.sim_coeff, c.std_coeff, c.cov_coeff, c.eps) == (25.0, 25.0, 1.0, 1e-4)


@pytest.mark.parametrize("cls", [BarlowTwins, VICReg])
def test_each_view_goes_through_the_backbone_on_its_own(cls: type) -> None:
    """The official step calls the backbone once per view, so each view's BatchNorm uses its
    own batch statistics; one call on both views together would mix them."""
    torch.manual_seed(0)
    model = cls(**SMALL, **{"projector_dims" if cls is BarlowTwins else "expander_dims": (16, 8)})
    head = model.projector if cls is BarlowTwins else model.expander
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16) * 3 + 1
    labels = torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        loss = model.training_step(((x1, x2), labels), 0)["loss"]
        separate = model.criterion(head(model.backbone(x1)), head(model.backbone(x2)))
        z1, z2 = head(model.backbone(torch.cat([x1, x2]))).chunk(2)
        together = model.criterion(z1, z2)
    torch.testing.assert_close(loss, separate)
    assert not torch.allclose(loss, together)


def official_lr(step: int, epochs: int, steps_per_epoch: int, batch: int, warmup: int) -> float:
    """``adjust_learning_rate`` of both official codes, before its per-group factor (Barlow
    Twins multiplies by ``--learning-rate-weights`` / ``-biases``, VICReg's ``base_lr`` is
    ``--base-lr * batch / 256``)."""
    max_steps = epochs * steps_per_epoch
    warmup_steps = warmup * steps_per_epoch
    base_lr = batch / 256
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    step -= warmup_steps
    max_steps -= warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    end_lr = base_lr * 0.001
    return base_lr * q + end_lr * (1 - q)


class GroupLRs(L.Callback):
    """Each step's learning rate, weight decay and LARS adaptation flag of every group."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[float, float, bool]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.steps.append(
            {g["name"]: (g["lr"], g["weight_decay"], g.get("lars_adapt", True)) for g in groups}
        )


EPOCHS, ITERS, WARMUP, BATCH = 4, 2, 1, 32


def fit_schedule(model: L.LightningModule) -> GroupLRs:
    recorder = GroupLRs()
    trainer = quiet_trainer(
        max_epochs=EPOCHS, limit_train_batches=ITERS, limit_val_batches=0, callbacks=[recorder]
    )
    trainer.fit(model, datamodule=digits(batch_size=BATCH, views=model.views))
    return recorder


def test_barlow_twins_schedule_and_groups_are_the_officials() -> None:
    """Weights at 0.2 x f(step), biases and norms at 0.0048 x f(step), f the official warmup
    and cosine to 0.001; LARS decays and adapts the weights only, wd 1e-6."""
    assert barlowtwins.OPTIM == Optimization(
        optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=10.0, min_lr_ratio=0.001,
        momentum=0.9, lars_trust_coefficient=1e-3, exclude_bias_and_norm=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BarlowTwins(
        **SMALL, projector_dims=(16, 8), optim=barlowtwins.OPTIM.replace(warmup_epochs=WARMUP)
    )
    recorder = fit_schedule(model)
    assert len(recorder.steps) == EPOCHS * ITERS
    for step, groups in enumerate(recorder.steps):
        f = official_lr(step, EPOCHS, ITERS, BATCH, WARMUP)
        assert groups["decay"] == (pytest.approx(0.2 * f), 1e-6, True)
        assert groups["no_decay"] == (pytest.approx(0.0048 * f), 0.0, False)
    assert recorder.steps[-1]["decay"][0] < 0.2 * BATCH / 256 * 0.2  # well into the cosine
    bias_and_norm = {p for g in model.optimizers().optimizer.param_groups
                     if g["name"] == "no_decay" for p in g["params"]}  # fmt: skip
    assert bias_and_norm == {p for p in model.parameters() if p.ndim == 1}


def test_vicreg_schedule_is_the_officials() -> None:
    """One learning rate, 0.2 x batch / 256 at the peak, the official warmup and cosine to
    0.001 of it; biases and norms neither decayed nor adapted (``exclude_bias_and_norm``)."""
    assert vicreg.OPTIM == barlowtwins.OPTIM
    torch.manual_seed(0)
    model = VICReg(**SMALL, expander_dims=(16, 8), optim=vicreg.OPTIM.replace(warmup_epochs=WARMUP))
    recorder = fit_schedule(model)
    for step, groups in enumerate(recorder.steps):
        f = official_lr(step, EPOCHS, ITERS, BATCH, WARMUP)
        assert groups["decay"] == (pytest.approx(0.2 * f), 1e-6, True)
        assert groups["no_decay"] == (pytest.approx(0.2 * f), 0.0, False)
