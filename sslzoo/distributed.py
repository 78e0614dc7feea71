"""Small torch.distributed helpers that work on every backend (gloo on CPU, NCCL on GPU) and
fall back to single-process behaviour when no process group is initialised."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


def is_distributed() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (the whole world by default); 1 without torch.distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group``; 0 without torch.distributed."""
    return dist.get_rank(group) if is_distributed() else 0


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the output gradients: the
    gradient of the sum of every rank's loss with respect to this rank's input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.detach().clone().contiguous()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone().contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def consecutive_groups(group_size: int | None) -> Any:
    """This rank's group when the world is split into groups of ``group_size`` consecutive
    ranks (apex's ``create_syncbn_process_group``); ``None`` (the whole world) when
    ``group_size`` is ``None`` or covers the world. Every rank must call it: each creates every
    group."""
    world = world_size()
    if group_size is None or group_size >= world:
        return None
    if group_size < 1 or world % group_size:
        raise ValueError(
            f"syncbn_process_group_size={group_size} must divide the world size {world}"
        )
    mine = None
    for start in range(0, world, group_size):
        group = dist.new_group(ranks=list(range(start, start + group_size)))
        if start <= rank() < start + group_size:
            mine = group
    return mine


def all_reduce_sum(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group`` (identity on one process)."""
    if world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` (any number of rows, same trailing shape), in rank order, without
    gradient. Rows are padded to the longest rank for the collective and trimmed after."""
    if world_size() == 1:
        return [x]
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    longest = max(int(c) for c in counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return [p[: int(c)] for p, c in zip(parts, counts, strict=True)]


def real_sample_count(sampler: Any, seen: int, batch: int) -> int:
    """How many of the next ``batch`` samples a rank draws, after ``seen`` before them, are
    real rather than ``DistributedSampler`` padding.

    Without ``drop_last`` the sampler pads its (possibly shuffled) index list to a multiple of
    the world size by repeating its first indices at the end; rank r draws positions
    ``r, r + W, ...``, so its first ``len(range(r, N, W))`` samples are the real ones.
    """
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return batch
    real = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    return max(0, min(batch, real - seen))


def val_sampler(trainer: Any, dataloader_idx: int = 0) -> Any:
    """The sampler of the trainer's validation loader ``dataloader_idx`` (``None`` if
    unknown): a ``DistributedSampler`` when Lightning sharded the loader over ranks."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    return getattr(loaders, "sampler", None)
