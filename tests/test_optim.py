"""Parameter groups, learning-rate scaling and the per-step schedule."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.utils.lars import LARS

from sslzoo.methods.byol import BYOL
from sslzoo.methods.optim import split_decay
from sslzoo.methods.schedules import warmup_cosine
from sslzoo.methods.simclr import SimCLR
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer


def test_biases_and_norms_get_no_weight_decay() -> None:
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, sync_batchnorm=False)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert groups["decay"]["weight_decay"] == 1e-6 and groups["no_decay"]["weight_decay"] == 0
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"])
    frozen = model.projection_head[-1].bias  # the beta-free last BN
    assert all(p is not frozen for g in groups.values() for p in g["params"])


def test_teacher_parameters_are_not_optimized() -> None:
    model = BYOL(**TINY_RESNET, projector_hidden_dim=16, predictor_hidden_dim=16)
    decay, no_decay = split_decay(model.named_parameters())
    ids = {id(p) for p in decay + no_decay}
    assert not any(id(p) in ids for p in model.target_backbone.parameters())


def test_lars_skips_adaptation_for_no_decay_groups() -> None:
    """lightly's LARS applies the trust ratio only where weight decay is non-zero, so the
    no-decay group (biases, norms) takes plain momentum-SGD steps: the official rule."""
    w, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))
    opt = LARS(
        [{"params": [w], "weight_decay": 1e-6}, {"params": [b], "weight_decay": 0.0}], lr=1.0
    )
    w.grad, b.grad = torch.full((4, 4), 0.5), torch.full((4,), 0.5)
    opt.step()
    assert torch.allclose(b, torch.full((4,), 0.5))  # 1 - lr * grad
    trust = 1e-3 * w.detach().new_tensor(4.0) / (torch.full((4, 4), 0.5).norm() + 1e-6 * 4)
    assert not torch.allclose(w, torch.full((4, 4), 0.5))
    assert float(w[0, 0]) == pytest.approx(1 - float(trust) * (0.5 + 1e-6), rel=1e-3)


@pytest.mark.parametrize("scaling", ["linear", "sqrt"])
def test_scheduled_lr_in_every_group(scaling: str) -> None:
    torch.manual_seed(0)
    model = SimCLR(
        **TINY_RESNET, proj_hidden_dim=16, sync_batchnorm=False, optimizer="sgd",
        lr=0.4, lr_scaling=scaling, warmup_epochs=1, min_lr=0.001,
    )  # fmt: skip
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(model, datamodule=digits(batch_size=32))
    peak = 0.4 * 32 / 256 if scaling == "linear" else 0.4 * math.sqrt(32)
    assert model.scaled_lr == pytest.approx(peak)
    last_step = trainer.global_step - 1
    expected = warmup_cosine(last_step, 8, 4, peak, 0.001)
    for group in trainer.optimizers[0].param_groups:
        assert group["lr"] == pytest.approx(expected)
    assert float(trainer.callback_metrics["train/lr"]) == pytest.approx(expected)
