"""Schedules against their definitions."""

from __future__ import annotations

import math

import pytest

from sslzoo.methods.schedules import cosine_to_one, linear_warmup, warmup_cosine


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
