"""Cross-entropy against soft targets: the distillation loss of SimCLR v2 and the pseudo-label
loss of self-training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-sum_y q(y) log softmax(logits)(y)``, averaged over the batch; ``targets`` are
    probabilities (one-hot rows give the ordinary cross-entropy)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """SimCLR v2's distillation loss (arXiv 2006.10029, eq. 2), per image:
    ``-sum_y P_T(y|x; tau) log P_S(y|x; tau)`` with ``P(y|x; tau) = softmax(logits / tau)``;
    the teacher's probabilities are constants (no gradient flows into the teacher)."""
    targets = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return soft_target_cross_entropy(student_logits.float() / temperature, targets)
