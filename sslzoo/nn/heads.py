"""One builder for every projection and prediction head: a stack of Linear layers with
BatchNorm and an activation between them, the layouts the official heads use; and the
prototype head of the self-distillation methods (an MLP, L2 normalisation, a weight-normalised
last layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

LastNorm = Literal["affine", "no_affine", "no_shift"]


class MLP(nn.Sequential):
    """The heads :func:`mlp` builds (a class of their own, for sharding policies)."""


def mlp(
    dims: Sequence[int],
    *,
    hidden_bias: bool = False,
    last_bias: bool = False,
    hidden_norm: bool = True,
    last_norm: LastNorm | None = None,
    activation: type[nn.Module] = nn.ReLU,
) -> MLP:
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
    return MLP(*layers)


def weight_normed_linear(in_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Linear:
    """DINO's last layer: ``weight_norm(Linear(in, out, bias=False))`` with the magnitude g
    filled with 1, and frozen when ``norm_last_layer`` (every prototype then has unit norm).

    Uses ``torch.nn.utils.parametrizations.weight_norm`` (g = ``original0``, v = ``original1``),
    which computes the same weight as the deprecated ``nn.utils.weight_norm`` and, unlike it,
    can be deep-copied into an EMA teacher.
    """
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    with torch.no_grad():
        g.fill_(1.0)
    g.requires_grad = not norm_last_layer
    return layer


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PrototypeHead(nn.Module):
    """DINO's projection head (``vision_transformer.py`` ``DINOHead``), also iBOT's.

    ``nlayers`` Linear layers (width ``hidden_dim``, GELU between them, optional BatchNorm after
    each hidden Linear, whose bias is kept as in the official code), ending at
    ``bottleneck_dim``; L2 normalisation; then the weight-normalised last layer to ``out_dim``
    without bias. The MLP is initialised with trunc_normal(0.02) and zero biases; the last
    layer keeps PyTorch's default Linear init, as officially.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        dims = [in_dim, *[hidden_dim] * (nlayers - 1), bottleneck_dim]
        self.mlp = mlp(
            dims, hidden_bias=True, last_bias=True, hidden_norm=use_bn, activation=nn.GELU
        )
        if nlayers == 1:
            self.mlp = self.mlp[0]  # a bare Linear, as the official single-layer head
        self.apply(_trunc_normal_init)
        self.last_layer = weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """MLP then L2 normalisation: the bottleneck the prototypes are compared with."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(x))


class PatchPrototypeHead(PrototypeHead):
    """A prototype head for [CLS] and patch tokens (iBOT's ``models/head.py`` ``iBOTHead``):
    one MLP for both; the [CLS] token goes through ``last_layer`` (``out_dim``), patch tokens
    through their own weight-normalised ``last_layer2`` (``patch_out_dim``) or, with
    ``shared_head``, through ``last_layer`` too."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        shared_head: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__(
            in_dim,
            out_dim,
            use_bn=False,
            norm_last_layer=norm_last_layer,
            nlayers=nlayers,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
        )
        self.last_layer2 = (
            None
            if shared_head
            else weight_normed_linear(bottleneck_dim, patch_out_dim, norm_last_layer)
        )

    @property
    def patch_layer(self) -> nn.Module:
        """The last layer applied to patch tokens."""
        return self.last_layer if self.last_layer2 is None else self.last_layer2

    def forward_tokens(
        self, tokens: torch.Tensor, num_prefix_tokens: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, prefix + N, D) ViT tokens -> ([CLS] output (B, K), patch outputs (B, N, K2))."""
        z = self.project(tokens)
        return self.last_layer(z[:, 0]), self.patch_layer(z[:, num_prefix_tokens:])
