"""EMA teacher: one update against the definition, the schedule, no update on
gradient-accumulation micro-batches, an update before the step where the method declares one,
and the callback's settings over the method's declaration."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from sslzoo.callbacks.ema import EMATeacher, ema_update
from sslzoo.methods.base import TeacherUpdate
from sslzoo.methods.byol import BYOL
from sslzoo.optim.schedules import cosine_to_one
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer, sgd


def test_one_update_matches_definition() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    before = copy.deepcopy(teacher)
    ema_update(student, teacher, 0.9)
    for s, t0, t1 in zip(
        student.parameters(), before.parameters(), teacher.parameters(), strict=True
    ):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s)


class CountingBYOL(BYOL):
    """BYOL that records the teacher's first weight after every micro-batch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.snapshots: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        w = next(self.target_projector.parameters()).detach().clone()
        self.snapshots.append((self.global_step, w))


def small_byol(**kwargs) -> CountingBYOL:
    return CountingBYOL(
        **TINY_RESNET,
        projector_hidden_dim=32,
        projector_out_dim=8,
        predictor_hidden_dim=32,
        sync_batchnorm=False,
        optim=sgd(),
        **kwargs,
    )


def test_no_update_on_accumulation_micro_batches() -> None:
    torch.manual_seed(0)
    model = small_byol()
    ema = EMATeacher()
    trainer = quiet_trainer(
        max_steps=3, accumulate_grad_batches=2, callbacks=[ema], limit_val_batches=0
    )
    trainer.fit(model, datamodule=digits(views=model.views))
    steps = [s for s, _ in model.snapshots]
    # Lightning runs EMA (a callback) before the module hook, so each snapshot already holds
    # the update of the optimizer step that batch completed.
    assert steps == [0, 1, 1, 2, 2, 3]
    for (s0, w0), (s1, w1) in zip(model.snapshots, model.snapshots[1:], strict=False):
        if s0 == s1:
            assert torch.equal(w0, w1), "teacher moved on an accumulation micro-batch"
        else:
            assert not torch.equal(w0, w1), "teacher did not move after an optimizer step"


def test_momentum_follows_schedule_and_is_logged() -> None:
    torch.manual_seed(0)
    model = small_byol(ema_momentum=0.9)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0)
    trainer.fit(model, datamodule=digits(views=model.views))
    total = int(trainer.estimated_stepping_batches)
    # the update after optimizer step k uses m_k; the last logged one is m_{K-1}
    expected = cosine_to_one(trainer.global_step - 1, total, 0.9)
    assert float(trainer.callback_metrics["train/ema_momentum"]) == pytest.approx(expected)


class BeforeStepBYOL(BYOL):
    """BYOL declaring its teacher update before each step; records the step count and the
    teacher's first weight as each micro-batch's training step begins."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.snapshots: list[tuple[int, torch.Tensor]] = []

    def teacher_update(self) -> TeacherUpdate:
        return dataclasses.replace(super().teacher_update(), before_step=True)

    def training_step(self, batch, batch_idx):
        w = next(self.target_projector.parameters()).detach().clone()
        self.snapshots.append((self.global_step, w))
        return super().training_step(batch, batch_idx)


def test_update_before_the_step_runs_once_at_the_first_micro_batch() -> None:
    torch.manual_seed(0)
    model = BeforeStepBYOL(
        **TINY_RESNET, projector_hidden_dim=32, projector_out_dim=8, predictor_hidden_dim=32,
        sync_batchnorm=False, optim=sgd(), ema_momentum=0.9,
    )  # fmt: skip
    ema = EMATeacher()
    trainer = quiet_trainer(
        max_steps=3, accumulate_grad_batches=2, callbacks=[ema], limit_val_batches=0
    )
    trainer.fit(model, datamodule=digits(views=model.views))
    assert [s for s, _ in model.snapshots] == [0, 0, 1, 1, 2, 2]
    for (s0, w0), (s1, w1) in zip(model.snapshots, model.snapshots[1:], strict=False):
        if s0 == s1:
            assert torch.equal(w0, w1), "teacher moved on an accumulation micro-batch"
        else:
            assert not torch.equal(w0, w1), "teacher did not move before an optimizer step"
    # the last update is that of the last step's start, with its momentum
    assert ema._last_step == 2
    total = int(trainer.estimated_stepping_batches)
    expected = cosine_to_one(2, total, 0.9)
    assert float(trainer.callback_metrics["train/ema_momentum"]) == pytest.approx(expected)


def test_callback_settings_replace_only_what_they_name() -> None:
    model = BeforeStepBYOL(**TINY_RESNET, sync_batchnorm=False, ema_momentum=0.9)
    declared = EMATeacher().declared_update(model)
    assert declared == TeacherUpdate(0.9, cosine=True, before_step=True)
    overridden = EMATeacher(base_momentum=0.5, cosine=False).declared_update(model)
    assert overridden == TeacherUpdate(0.5, cosine=False, before_step=True)
    assert overridden.momentum_at(3, 10) == 0.5


def test_method_brings_ema_callback_once() -> None:
    model = small_byol()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[EMATeacher(0.5)])
    trainer.fit(model, datamodule=digits(views=model.views))
    emas = [c for c in trainer.callbacks if isinstance(c, EMATeacher)]
    assert len(emas) == 1 and emas[0].base_momentum == 0.5

    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    model = small_byol()
    trainer.fit(model, datamodule=digits(views=model.views))
    assert sum(isinstance(c, EMATeacher) for c in trainer.callbacks) == 1
