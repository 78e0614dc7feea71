"""Schedules as plain functions of the optimizer step, so a resumed run continues exactly."""

from __future__ import annotations

import math


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak: float,
    final: float,
    start: float = 0.0,
    linspace_warmup: bool = False,
) -> float:
    """Linear warmup from ``start`` to ``peak`` over ``warmup_steps``, then a half cosine from
    ``peak`` down to ``final`` over the remaining steps::

        step < W:  start + (peak - start) * step / W      (SimCLR, BYOL, MoCo v3, MAE)
                   start + (peak - start) * step / (W - 1) with ``linspace_warmup``
                   (``np.linspace(start, peak, W)``: DINO, iBOT, SwAV reach the peak at W - 1)
        else:      final + (peak - final) * (1 + cos(pi * (step - W) / (T - W))) / 2
    """
    if step < warmup_steps:
        span = max(warmup_steps - 1, 1) if linspace_warmup else warmup_steps
        return start + (peak - start) * step / span
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_to_one(step: int, total_steps: int, base: float) -> float:
    """EMA momentum rising from ``base`` to 1 on a cosine (BYOL, MoCo v3, DINO, iBOT)::

    m_k = 1 - (1 - m0) * (1 + cos(pi * k / K)) / 2
    """
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, then constant ``end``
    (DINO/iBOT teacher temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def teacher_temp_at(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Teacher temperature of an epoch: ``np.linspace(warmup_temp, temp, warmup_epochs)[epoch]``
    during the warmup, ``temp`` afterwards (the official per-epoch schedule)."""
    if epoch >= warmup_epochs:
        return temp
    return linear_warmup(epoch, max(warmup_epochs - 1, 1), warmup_temp, temp)
