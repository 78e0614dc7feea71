"""Pseudo-labels from a teacher's logits and the loss normalisation of self-training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pseudo_labels(
    teacher_logits: torch.Tensor, hard: bool = False, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, kept) from a teacher's logits on clean images (Noisy Student, Xie et al.
    2020 §2): the teacher's class probabilities (``hard``: one-hot of its top class), and
    which images are kept: those whose top probability is at least ``threshold``."""
    probabilities = F.softmax(teacher_logits.float(), dim=-1)
    confidence, top = probabilities.max(-1)
    kept = confidence >= threshold
    if hard:
        probabilities = F.one_hot(top, teacher_logits.shape[-1]).float()
    return probabilities, kept


class NormalizedSelfTrainingLoss(nn.Module):
    """The student's loss of Zoph et al. 2020, "Rethinking Pre-training and Self-training"
    (§3.2, "Loss normalization"): ``L = L_h + alpha * (mean L_h / mean L_s) * L_s``, where
    ``L_h`` is the loss on the human labels, ``L_s`` the loss on the pseudo-labels, and the
    means are moving averages over training (the paper tunes ``alpha``; the average's
    ``momentum`` is not given there, 0.99 here). The ratio is a constant of the step (no
    gradient through it); the averages are buffers, so a resumed run continues them.

    With ``normalize=False``: ``L = L_h + alpha * L_s``, the plain weighted sum.
    """

    def __init__(self, alpha: float = 1.0, momentum: float = 0.99, normalize: bool = True):
        super().__init__()
        self.alpha = alpha
        self.momentum = momentum
        self.normalize = normalize
        self.register_buffer("mean_human", torch.zeros(()))
        self.register_buffer("mean_pseudo", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update(self, human: torch.Tensor, pseudo: torch.Tensor) -> None:
        m = self.momentum if self.steps > 0 else 0.0  # the first step starts the averages
        self.mean_human.mul_(m).add_((1 - m) * human.detach().float())
        self.mean_pseudo.mul_(m).add_((1 - m) * pseudo.detach().float())
        self.steps += 1

    def forward(self, human: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return human + self.alpha * pseudo
        if self.training:
            self._update(human, pseudo)
        ratio = self.mean_human / self.mean_pseudo.clamp_min(1e-12)
        return human + self.alpha * ratio * pseudo
