"""Self-distillation losses: the student matches the teacher's centred, sharpened
distribution over prototypes, across views (DINO) and on masked patch tokens (iBOT). Each loss
owns its centres, updated from the teacher's outputs over the global batch; DINOv2's teacher
targets come by centring or by Sinkhorn-Knopp (:class:`TeacherTargets`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslzoo.distributed import world_size
from sslzoo.losses.swapped import distributed_sinkhorn

Centering = Literal["centering", "sinkhorn_knopp"]


@torch.no_grad()
def global_batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of ``x`` across every rank (sum all-reduced, divided by the global
    count), as DINO's ``update_center``; keeps dim 0 with size 1."""
    total = x.float().sum(dim=0, keepdim=True)
    count = x.shape[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        count *= torch.distributed.get_world_size()
    return total / count


@torch.no_grad()
def update_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * batch_mean, in place."""
    center.mul_(momentum).add_(batch_mean.to(center.dtype), alpha=1.0 - momentum)


def teacher_probs(
    teacher_out: torch.Tensor, center: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The teacher's target distribution: centre then sharpen, no gradient."""
    return F.softmax((teacher_out.detach().float() - center) / temperature, dim=-1)


def cross_view_loss(
    student_out: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    student_temp: float,
) -> torch.Tensor:
    """Cross-entropy ``-sum(q * log_softmax(s / tps))`` averaged over the batch, for every
    (teacher global view iq, student view v) pair with v != iq, averaged over the pairs."""
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
    total = student_out[0].new_zeros((), dtype=torch.float32)
    terms = 0
    for iq, q in enumerate(teacher_targets):
        for v, log_p in enumerate(log_probs):
            if v == iq:
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            terms += 1
    return total / terms


class SelfDistillationLoss(nn.Module):
    """DINO's self-distillation loss; it owns the centre.

    ``center`` is a registered buffer (so it is saved in checkpoints), updated after each call
    with the teacher outputs of the call, averaged over the global batch of every rank.

    Args:
        out_dim: dimension K of the head outputs.
        student_temp: student temperature tps.
        center_momentum: momentum m of the centre's moving average.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_out: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        teacher_temp: float,
    ) -> torch.Tensor:
        """Loss of one step: ``student_out`` per view (globals first), ``teacher_out`` per
        global view, each of shape (batch, K). Updates the centre afterwards."""
        targets = [teacher_probs(t, self.center, teacher_temp) for t in teacher_out]
        loss = cross_view_loss(student_out, targets, self.student_temp)
        batch_mean = global_batch_mean(torch.cat(list(teacher_out)))
        update_center(self.center, batch_mean, self.center_momentum)
        return loss


def masked_patch_loss(
    student_patch: torch.Tensor,
    teacher_targets: torch.Tensor,
    mask: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """Cross-entropy between teacher targets and student patch outputs (B, N, K) of the same
    view, on masked positions only: averaged per image over its masked tokens (an unmasked
    image contributes 0), then over all images."""
    log_p = F.log_softmax(student_patch.float() / student_temp, dim=-1)
    ce = torch.sum(-teacher_targets * log_p, dim=-1)
    m = mask.flatten(1).to(ce.dtype)
    return (torch.sum(ce * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()


class MaskedSelfDistillationLoss(nn.Module):
    """iBOT's loss (``main_ibot.py`` ``iBOTLoss``): self-distillation on the [CLS] token and on
    the masked patch tokens; it owns both centres.

    ``center`` (CLS, shape (1, K)) and ``center2`` (patches, shape (1, 1, K2)) are buffers,
    updated after each call from the teacher outputs (patches: each image's mean over all its
    patch tokens), averaged over the global batch.

    Args:
        out_dim: [CLS] output dimension K.
        patch_out_dim: patch output dimension K2.
        student_temp: student temperature of both terms.
        center_momentum: momentum of ``center``.
        center_momentum2: momentum of ``center2``.
        lambda1: weight of the [CLS] term.
        lambda2: weight of the masked-patch term.
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))

    def forward(
        self,
        student_cls: Sequence[torch.Tensor],
        teacher_cls: Sequence[torch.Tensor],
        student_patch: Sequence[torch.Tensor],
        teacher_patch: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        teacher_temp: float,
        teacher_patch_temp: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the weighted ([CLS] loss, patch loss).

        ``student_cls``: per view (globals first), (B, K); ``teacher_cls``: per global view;
        ``student_patch``/``teacher_patch``: per global view, (B, N, K2); ``masks``: per
        global view, (B, H, W) or (B, N), True where the student's patch was masked.
        """
        cls_targets = [teacher_probs(t, self.center, teacher_temp) for t in teacher_cls]
        loss_cls = cross_view_loss(student_cls, cls_targets, self.student_temp)
        loss_patch = sum(
            masked_patch_loss(
                s, teacher_probs(t, self.center2, teacher_patch_temp), m, self.student_temp
            )
            for s, t, m in zip(student_patch, teacher_patch, masks, strict=True)
        ) / len(teacher_patch)
        update_center(
            self.center, global_batch_mean(torch.cat(list(teacher_cls))), self.center_momentum
        )
        patch_means = torch.cat([t.float().mean(dim=1) for t in teacher_patch])
        update_center(self.center2, global_batch_mean(patch_means)[None], self.center_momentum2)
        return self.lambda1 * loss_cls, self.lambda2 * loss_patch


@torch.no_grad()
def rank_averaged_mean(x: torch.Tensor) -> torch.Tensor:
    """Each rank's mean of ``x`` over dim 0, averaged over the ranks (DINOv2's centre update:
    the all-reduced sum of the per-rank means over the world size); keeps dim 0 with size 1.
    The global mean when every rank holds as many rows; a rank with none counts as zeros."""
    mean = x.float().sum(dim=0, keepdim=True) / max(x.shape[0], 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
    return mean / world_size()


@torch.no_grad()
def global_count(x: torch.Tensor) -> torch.Tensor:
    """The number of rows of ``x`` summed over every rank, as a tensor on its device."""
    count = torch.full((), x.shape[0], dtype=torch.float32, device=x.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    return count


class TeacherTargets(nn.Module):
    """DINOv2's teacher targets of one head: ``centering`` (softmax of the outputs minus a
    running centre, over the temperature; the centre then moves towards this step's
    :func:`rank_averaged_mean` with ``center_momentum``) or ``sinkhorn_knopp`` (Sinkhorn-Knopp
    over the outputs of every rank, ``sinkhorn_iterations`` times, with the all-reduced row
    count as B; the centre is then unused).

    Args:
        out_dim: dimension K of the head outputs.
        centering: ``centering`` or ``sinkhorn_knopp``.
        center_momentum: momentum of the running centre.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
    """

    def __init__(
        self,
        out_dim: int,
        centering: Centering = "centering",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be centering or sinkhorn_knopp, not {centering!r}")
        self.centering = centering
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
        """Targets (rows of ``teacher_out`` (M, K), each a distribution over K)."""
        if self.centering == "sinkhorn_knopp":
            batch = global_count(teacher_out)
            return distributed_sinkhorn(teacher_out, temperature, self.sinkhorn_iterations, batch)
        probs = teacher_probs(teacher_out, self.center, temperature)
        update_center(self.center, rank_averaged_mean(teacher_out), self.center_momentum)
        return probs


def masked_tokens_loss(
    student_masked: torch.Tensor,
    teacher_targets: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """DINOv2's ``forward_masked``: cross-entropy of the masked tokens' student outputs (M, K)
    against their targets, each token weighted by one over its image's masked count, summed
    and divided by the number of images of ``masks`` (images, tokens), unmasked ones included:
    the mean over images of each image's mean over its masked tokens."""
    log_p = F.log_softmax(student_masked.float() / student_temp, dim=-1)
    ce = torch.sum(-teacher_targets * log_p, dim=-1)
    weights = (1.0 / masks.sum(dim=-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    return (ce * weights).sum() / masks.shape[0]
