"""EMA teachers: frozen copies of student modules, and how a method declares their update (read
by :class:`~sslzoo.callbacks.ema.EMATeacher`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from sslzoo.optim.schedules import cosine_to_one


def frozen(module: nn.Module) -> nn.Module:
    """``module`` with gradients off, used as an EMA teacher."""
    for p in module.parameters():
        p.requires_grad = False
    return module


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off, used as an EMA teacher."""
    return frozen(copy.deepcopy(module))


@dataclass(frozen=True)
class TeacherUpdate:
    """When and with which momentum the EMA callback updates a method's teachers
    (:meth:`SSLMethod.teacher_update`): ``t <- m t + (1 - m) s`` once per optimizer step k.

    Args:
        base_momentum: m0.
        cosine: ``m_k = 1 - (1 - m0)(1 + cos(pi k / K)) / 2`` over the K optimizer steps of the
            run; False keeps m0.
        before_step: update at the start of step k, before its forward, so the step's targets
            come from the teacher updated with m_k (MoCo v3); False: after step k's optimizer
            step (BYOL, DINO, iBOT).
    """

    base_momentum: float
    cosine: bool = True
    before_step: bool = False

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The momentum m_k of optimizer step ``step`` of ``total_steps``."""
        if not self.cosine:
            return self.base_momentum
        return cosine_to_one(step, total_steps, self.base_momentum)
