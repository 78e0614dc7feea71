"""EMA teacher update once per optimizer step (BYOL, MoCo v3, DINO, iBOT)."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
from torch import nn

from sslzoo.sharding import local_tensor, reshard


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over parameters, with fused foreach ops.

    Buffers (BatchNorm statistics) stay the teacher's own, as in the official code. Under FSDP2
    the teacher is sharded like its student, so the update runs on this rank's local shards
    (foreach ops take plain tensors), which is the unsharded update restricted to them.
    """
    reshard(teacher)
    reshard(student)
    t_params = [local_tensor(p.data) for p in teacher.parameters()]
    s_params = [local_tensor(p.data) for p in student.parameters()]
    for t, s in zip(t_params, s_params, strict=True):
        if t.shape != s.shape:
            raise ValueError(
                f"teacher shard {tuple(t.shape)} does not pair with student shard "
                f"{tuple(s.shape)}: shard the teacher exactly like its student"
            )
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


class EMATeacher(L.Callback):
    """Update every (student, teacher) pair the method declares in ``teacher_pairs()``, when
    and with the momentum its ``teacher_update()`` declares (a ``TeacherUpdate`` of
    :mod:`sslzoo.nn.teachers`): after each optimizer step k with m_k, or at the start of
    step k, before its forward, with m_k.

    The update runs once per optimizer step, never on further gradient-accumulation
    micro-batches, and logs ``train/ema_momentum``, with no host-device sync. It depends on
    nothing but the step count and the weights, so a run resumed mid-epoch continues exactly.

    Args:
        base_momentum: m0; ``None`` takes the method's.
        cosine: raise the momentum from m0 to 1 on a cosine (False keeps m0 constant);
            ``None`` takes the method's.
    """

    def __init__(self, base_momentum: float | None = None, cosine: bool | None = None) -> None:
        self.base_momentum = base_momentum
        self.cosine = cosine
        self._update: Any = None
        self._last_step: int | None = None

    def declared_update(self, pl_module: L.LightningModule) -> Any:
        """The method's ``teacher_update()`` with this callback's settings in place of its."""
        given = {"base_momentum": self.base_momentum, "cosine": self.cosine}
        overrides = {name: value for name, value in given.items() if value is not None}
        return dataclasses.replace(pl_module.teacher_update(), **overrides)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update = self.declared_update(pl_module)
        # an update after a step is due once the step count moves on; one before a step is
        # due at the first batch already (step 0, or the first step of a resumed run)
        self._last_step = None if self._update.before_step else trainer.global_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        if self._update.before_step:
            self._update_once(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if not self._update.before_step:
            self._update_once(trainer, pl_module, trainer.global_step - 1)

    def _update_once(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """The update of optimizer step ``step``, unless the trainer's step count has not moved
        since the last one (an accumulation micro-batch)."""
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        m = self._update.momentum_at(step, int(trainer.estimated_stepping_batches))
        for student, teacher in pl_module.teacher_pairs():
            ema_update(student, teacher, m)
        # a method's log_scalar fills a device tensor, where self.log of a Python float makes
        # Lightning copy it to the device (a blocking host-to-device copy every step)
        log = getattr(pl_module, "log_scalar", pl_module.log)
        log("train/ema_momentum", m)
