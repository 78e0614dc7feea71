"""One builder for every projection and prediction head: a stack of Linear layers with
BatchNorm and an activation between them, the layouts the official heads use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

LastNorm = Literal["affine", "no_affine", "no_shift"]


def mlp(
    dims: Sequence[int],
    *,
    hidden_bias: bool = False,
    last_bias: bool = False,
    hidden_norm: bool = True,
    last_norm: LastNorm | None = None,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """``Linear -> [BatchNorm1d] -> activation`` for each hidden width, then a last Linear and an
    optional BatchNorm1d: ``dims`` is (input, hidden..., output).

    ``hidden_bias`` / ``last_bias``: biases of the hidden / last Linear layers (the official
    heads drop a bias that a BatchNorm right after it cancels). ``last_norm``: ``affine`` (a
    plain BatchNorm1d), ``no_affine`` (standardisation only: MoCo v3, SimSiam), ``no_shift``
    (a learned scale, the shift fixed at 0: SimCLR's ``center=False``), or None.
    The layers are the Sequential's children in that order, so their parameter names are
    ``0.weight``, ``1.weight``... as in the official heads.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs an input and an output width, got {list(dims)}")
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1], strict=True):
        layers.append(nn.Linear(d_in, d_out, bias=hidden_bias))
        if hidden_norm:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(activation())
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_norm is not None:
        norm = nn.BatchNorm1d(dims[-1], affine=last_norm != "no_affine")
        if last_norm == "no_shift":
            norm.bias.requires_grad = False  # stays at its initial 0
        layers.append(norm)
    return nn.Sequential(*layers)
