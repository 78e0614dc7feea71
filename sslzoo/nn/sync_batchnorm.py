"""BatchNorm synchronised over all ranks on any device, CPU (gloo) included.

``torch.nn.SyncBatchNorm`` refuses CPU tensors in training under torch.distributed; this
module computes the same thing with one differentiable all-reduce, so DDP runs on CPU (tests,
small machines) use the global batch statistics that the recipes ask for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sslzoo.distributed import all_reduce_sum, rank, world_size


def global_batch_stats(
    x: torch.Tensor, group: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased variance and sample count of ``x`` (N, C, ...) over every
    rank's batch, differentiable through all ranks.

    Each rank contributes its own (count, mean, sum of squared deviations) in a row of a
    (world, 2C + 1) table summed over ranks; the rows are merged with Chan et al.'s parallel
    formula, so ranks may hold different numbers of samples (even none) and no large sums of
    squares are subtracted.
    """
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = x.numel() // channels if channels else 0
    local_mean = x.sum(dim=dims) / max(count, 1)
    shape = [1, channels] + [1] * (x.dim() - 2)
    local_m2 = (x - local_mean.view(shape)).square().sum(dim=dims)
    row = torch.cat([local_mean.new_full((1,), float(count)), local_mean, local_m2])
    table = torch.stack(
        [row if r == rank(group) else torch.zeros_like(row) for r in range(world_size(group))]
    )
    table = all_reduce_sum(table, group)
    counts, means, m2s = table[:, :1], table[:, 1 : channels + 1], table[:, channels + 1 :]
    total = counts.sum()
    mean = (counts * means).sum(dim=0) / total
    m2 = (m2s + counts * (means - mean).square()).sum(dim=0)
    return mean, m2 / total, total


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics cover the batches of every rank.

    Normalisation uses the global mean and biased variance; the running statistics are
    updated with the global mean and unbiased variance, with ``momentum`` as in
    ``nn.BatchNorm*d`` (``None``: cumulative average). Gradients flow through the statistics of
    every rank. Evaluation mode, or a single process, is plain BatchNorm. Accepts (N, C, ...)
    inputs of any dimension, like ``nn.SyncBatchNorm``.

    Args:
        num_features: channels C.
        eps: added to the variance.
        momentum: running-statistics momentum.
        affine: learnable scale and shift.
        track_running_stats: keep running statistics.
        process_group: ranks to synchronise over (all by default).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size(self.process_group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        mean, var, total = global_batch_stats(x, self.process_group)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), int(total))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, total: int) -> None:
        if total <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {total} over all ranks"
            )
        self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:
            factor = 1.0 / float(self.num_batches_tracked)
        unbiased = var * total / (total - 1)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def _to_cpu_sync(module: nn.Module, process_group: Any) -> nn.Module:
    """``module`` with every BatchNorm replaced by :class:`SyncBatchNorm`, sharing weights
    and buffers with the original layers."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _to_cpu_sync(child, process_group))
    return out


def convert_sync_batchnorm(
    module: nn.Module, process_group: Any = None, device: torch.device | None = None
) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a synchronised one, keeping weights and buffers.

    On CUDA (``device``, or else where the module's parameters live) this is
    ``nn.SyncBatchNorm.convert_sync_batchnorm``; elsewhere (CPU) it is :class:`SyncBatchNorm`.
    Returns the converted module (``module`` itself unless ``module`` is a BatchNorm).
    """
    if device is None:
        tensor = next(iter([*module.parameters(), *module.buffers()]), None)
        device = tensor.device if tensor is not None else torch.device("cpu")
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _to_cpu_sync(module, process_group)
