"""EMA teacher update after each optimizer step (BYOL, MoCo v3, DINO, iBOT)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from sslzoo.methods.schedules import cosine_to_one
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
    """Update every (student, teacher) pair the method declares in ``teacher_pairs()``.

    The momentum follows ``m_k = 1 - (1 - m0)(1 + cos(pi k / K)) / 2`` over optimizer steps k
    of K. The update runs once per optimizer step, never on gradient-accumulation
    micro-batches, and logs ``train/ema_momentum``, with no host-device sync.

    Args:
        base_momentum: m0; ``None`` takes the method's own ``ema_base_momentum``.
        cosine: follow the cosine-to-one schedule; ``False`` keeps m0 constant.
    """

    def __init__(self, base_momentum: float | None = None, cosine: bool = True) -> None:
        self.base_momentum = base_momentum
        self.cosine = cosine
        self._last_step: int | None = None

    def momentum_at(self, step: int, total_steps: int, pl_module: L.LightningModule) -> float:
        base = self.base_momentum if self.base_momentum is not None else pl_module.ema_base_momentum
        return cosine_to_one(step, total_steps, base) if self.cosine else base

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        m = self.momentum_at(step - 1, int(trainer.estimated_stepping_batches), pl_module)
        for student, teacher in pl_module.teacher_pairs():
            ema_update(student, teacher, m)
        # a method's log_scalar fills a device tensor, where self.log of a Python float makes
        # Lightning copy it to the device (a blocking host-to-device copy every step)
        log = getattr(pl_module, "log_scalar", pl_module.log)
        log("train/ema_momentum", m)
