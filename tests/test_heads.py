"""The one MLP builder lays its layers out as the official heads do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslzoo.nn.heads import mlp


def layout(head: nn.Sequential) -> list[str]:
    out = []
    for layer in head:
        if isinstance(layer, nn.Linear):
            out.append(
                f"Linear({layer.in_features},{layer.out_features},bias={layer.bias is not None})"
            )
        elif isinstance(layer, nn.BatchNorm1d):
            shift = layer.affine and layer.bias.requires_grad
            out.append(f"BN({layer.num_features},affine={layer.affine},shift={shift})")
        else:
            out.append(type(layer).__name__)
    return out


def test_hidden_and_last_layers() -> None:
    head = mlp([8, 16, 16, 4], last_norm="no_shift")  # SimCLR v2's 3-layer head
    assert layout(head) == [
        "Linear(8,16,bias=False)", "BN(16,affine=True,shift=True)", "ReLU",
        "Linear(16,16,bias=False)", "BN(16,affine=True,shift=True)", "ReLU",
        "Linear(16,4,bias=False)", "BN(4,affine=True,shift=False)",
    ]  # fmt: skip
    head = mlp([8, 32, 4], hidden_bias=True, hidden_norm=False, last_bias=True, activation=nn.GELU)
    assert layout(head) == ["Linear(8,32,bias=True)", "GELU", "Linear(32,4,bias=True)"]
    assert layout(mlp([8, 4], last_norm="no_affine")) == [
        "Linear(8,4,bias=False)", "BN(4,affine=False,shift=False)"
    ]  # fmt: skip


def test_a_fixed_shift_stays_zero_through_training() -> None:
    head = mlp([4, 3], last_norm="no_shift")
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(head[1].bias, torch.zeros(3)) and not torch.equal(
        head[1].weight, torch.ones(3)
    )


def test_needs_two_widths() -> None:
    with pytest.raises(ValueError, match="input and an output"):
        mlp([8])
