"""Barlow Twins' and VICReg's losses against their definitions written out here, element by
element, on small embeddings."""

from __future__ import annotations

import itertools

import pytest
import torch

from sslzoo.losses.redundancy import CrossCorrelationLoss, VICRegLoss


def standardised(z: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode without affine parameters: biased variance, eps 1e-5."""
    mean = z.mean(0)
    var = ((z - mean) ** 2).mean(0)
    return (z - mean) / torch.sqrt(var + 1e-5)


def test_cross_correlation_loss_is_its_definition() -> None:
    torch.manual_seed(0)
    n, d, lambd = 6, 4, 0.3
    z1, z2 = torch.randn(n, d), torch.randn(n, d)
    a, b = standardised(z1), standardised(z2)
    expected = 0.0
    for i, j in itertools.product(range(d), range(d)):
        c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
        expected += (1 - c_ij) ** 2 if i == j else lambd * c_ij**2
    loss = CrossCorrelationLoss(d, lambd)(z1, z2)
    torch.testing.assert_close(loss, torch.as_tensor(expected), rtol=1e-5, atol=1e-6)


def test_cross_correlation_of_identical_whitened_views_is_minimal() -> None:
    # perfectly correlated, decorrelated dimensions: C = I up to BatchNorm's eps
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(CrossCorrelationLoss(2)(z, z)) == pytest.approx(0.0, abs=1e-4)


def test_vicreg_loss_is_its_definition() -> None:
    torch.manual_seed(1)
    n, d = 7, 3
    x, y = torch.randn(n, d) * 0.5, torch.randn(n, d) * 2.0
    sim, std, cov, eps = 25.0, 25.0, 1.0, 1e-4

    def variance(v: torch.Tensor) -> float:
        total = 0.0
        for j in range(d):
            col = v[:, j]
            var = sum((c - col.mean()) ** 2 for c in col) / (n - 1)
            total += max(0.0, 1 - float(torch.sqrt(var + eps)))
        return total / d

    def covariance(v: torch.Tensor) -> float:
        v = v - v.mean(0)
        total = 0.0
        for i, j in itertools.product(range(d), range(d)):
            if i != j:
                total += float(sum(v[k, i] * v[k, j] for k in range(n)) / (n - 1)) ** 2
        return total / d

    invariance = float(((x - y) ** 2).sum()) / (n * d)
    expected = (
        sim * invariance
        + std * (variance(x) + variance(y)) / 2
        + cov * (covariance(x) + covariance(y))
    )
    loss = VICRegLoss(sim, std, cov, eps)(x, y)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
