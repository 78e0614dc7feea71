"""Schedules against their definitions."""

from __future__ import annotations

import math
from unittest import mock

import pytest

import sslzoo.methods as methods
from sslzoo.methods.swav import OPTIM as SWAV_OPTIM
from sslzoo.optim.schedules import cosine_to_one, linear_warmup, warmup_cosine
from tests.conftest import SMALL_SWAV, TINY_RESNET


def test_cosine_to_one_at_start_middle_end() -> None:
    m0, K = 0.996, 1000
    assert cosine_to_one(0, K, m0) == pytest.approx(m0)
    assert cosine_to_one(K // 2, K, m0) == pytest.approx(1 - (1 - m0) / 2)
    assert cosine_to_one(K, K, m0) == pytest.approx(1.0)
    k = 123
    assert cosine_to_one(k, K, m0) == pytest.approx(
        1 - (1 - m0) * (1 + math.cos(math.pi * k / K)) / 2
    )


def test_warmup_cosine() -> None:
    total, warm, peak, final, start = 100, 10, 1.0, 0.01, 0.3
    assert warmup_cosine(0, total, warm, peak, final, start) == pytest.approx(start)
    assert warmup_cosine(5, total, warm, peak, final, start) == pytest.approx(0.65)
    assert warmup_cosine(10, total, warm, peak, final, start) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert warmup_cosine(mid, total, warm, peak, final) == pytest.approx((peak + final) / 2)
    assert warmup_cosine(total, total, warm, peak, final) == pytest.approx(final)
    s = 37
    expected = final + (peak - final) * (1 + math.cos(math.pi * (s - warm) / (total - warm))) / 2
    assert warmup_cosine(s, total, warm, peak, final) == pytest.approx(expected)


def test_warmup_cosine_can_rise() -> None:
    """DINO's weight decay goes up, 0.04 -> 0.4, on the same cosine."""
    assert warmup_cosine(0, 10, 0, 0.04, 0.4) == pytest.approx(0.04)
    assert warmup_cosine(10, 10, 0, 0.04, 0.4) == pytest.approx(0.4)


def test_linear_warmup() -> None:
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(45, 30, 0.04, 0.07) == pytest.approx(0.07)


def simclr_warmup_and_cosine_decay(step: int, scaled_lr: float, warmup: int, total: int) -> float:
    """SimCLR's tf2/model.py ``WarmUpAndCosineDecay`` written out: ``step / warmup * lr`` in the
    warmup, then keras' ``CosineDecay(lr, total - warmup)`` (alpha 0) at ``step - warmup``,
    whose step is clamped at the end of the decay."""
    if step < warmup:
        return step / warmup * scaled_lr
    decay = total - warmup
    done = min(step - warmup, decay)
    return scaled_lr * 0.5 * (1 + math.cos(math.pi * done / decay))


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_warmup_cosine_is_simclrs_warmup_and_cosine_decay(warmup: int) -> None:
    """The cosine starts where the warmup ends and spans the remaining total - warmup steps."""
    total, peak = 40, 0.6
    got = [warmup_cosine(s, total, warmup, peak, 0.0) for s in range(total + 3)]
    expected = [simclr_warmup_and_cosine_decay(s, peak, warmup, total) for s in range(total + 3)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def official_cosine_scheduler(base, final, total, warmup, start) -> list[float]:
    """DINO's ``utils.cosine_scheduler`` (and main_swav.py's schedule) written out: a warmup of
    ``np.linspace(start, base, warmup)``, then ``final + (base - final)(1 + cos(pi i / n)) / 2``
    for i in range(n), n = total - warmup."""
    ramp = [start + (base - start) * i / max(warmup - 1, 1) for i in range(warmup)]
    n = total - warmup
    return ramp + [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]


@pytest.mark.parametrize("warmup", [0, 1, 2, 7])
def test_linspace_warmup_is_dinos_cosine_scheduler(warmup: int) -> None:
    total, base, final, start = 40, 0.5, 1e-3, 0.1
    expected = official_cosine_scheduler(base, final, total, warmup, start)
    got = [warmup_cosine(s, total, warmup, base, final, start, linspace_warmup=True)
           for s in range(total)]  # fmt: skip
    assert got == pytest.approx(expected)
    if warmup > 1:  # the default ramp reaches the peak one step later
        assert warmup_cosine(warmup - 1, total, warmup, base, final, start) < base


def test_methods_whose_official_schedule_uses_linspace_warm_up_that_way() -> None:
    names = [name for name in methods.__all__ if name != "SSLMethod"]
    linspace = {name for name in names if getattr(methods, name).linspace_warmup}
    assert linspace == {"DINO", "DINOv2", "IBOT", "SwAV"}
    for model, peak_step in (
        (methods.SwAV(**SMALL_SWAV, optim=SWAV_OPTIM.replace(start_warmup_lr=0.0)), 4),
        (methods.SimCLR(**TINY_RESNET, sync_batchnorm=False), 5),
    ):
        cls = type(model)
        with (
            mock.patch.object(cls, "warmup_steps", 5),
            mock.patch.object(cls, "total_steps", 100),
            mock.patch.object(cls, "scaled_lr", 1.0),
        ):
            assert model.learning_rate_at(peak_step) == pytest.approx(1.0)
            assert model.learning_rate_at(peak_step - 1) < 1.0
