"""The student's training step: SimCLR v2 distillation or Noisy Student self-training."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslzoo.eval.finetune import FinetuneModule
from sslzoo.eval.finetune_recipes import Recipe
from sslzoo.losses.soft_targets import distillation_loss, soft_target_cross_entropy
from sslzoo.selftrain.pseudo_labels import NormalizedSelfTrainingLoss

Mode = Literal["distill", "noisy-student"]


class SelfTrainModule(FinetuneModule):
    """A student trained from a teacher, with the fine-tuning recipe's optimizer and schedule.

    Batches are ``{"unlabeled": (images, _), "labeled": (images, labels)}`` (``labeled``
    absent when its loss is off):

    - ``distill`` (SimCLR v2, arXiv 2006.10029 §2, eq. 2-3): the teacher (eval mode) sees the
      student's images; ``loss = alpha * distill(student, teacher; temperature)
      + (1 - alpha) * CE(labeled)``.
    - ``noisy-student`` (Xie et al. 2020; Zoph et al. 2020): unlabeled batches carry the
      teacher's pseudo-labels (made beforehand on clean images); ``loss =
      normalized(CE(labeled), CE(pseudo-labeled))`` (:class:`NormalizedSelfTrainingLoss`).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        recipe: Recipe,
        num_classes: int,
        batch_size: int,
        mode: Mode = "distill",
        temperature: float = 1.0,
        alpha: float = 1.0,
        pseudo_loss: NormalizedSelfTrainingLoss | None = None,
    ) -> None:
        super().__init__(student, recipe, num_classes, batch_size)
        # not a submodule: neither trained, nor saved in the student's checkpoints, nor
        # switched to train mode with it
        self._teacher = [] if teacher is None else [teacher.requires_grad_(False).eval()]
        self.mode = mode
        self.temperature = temperature
        self.alpha = alpha
        self.pseudo_loss = pseudo_loss

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for teacher in self._teacher:
            teacher.to(self.device).eval()  # its predictions carry no noise

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, targets = batch["unlabeled"]
        logits = self(images)
        if self.mode == "distill":
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            unlabeled = distillation_loss(logits, teacher_logits, self.temperature)
            loss = self.alpha * unlabeled
            if "labeled" in batch:
                labeled = F.cross_entropy(self(batch["labeled"][0]), batch["labeled"][1])
                loss = loss + (1 - self.alpha) * labeled
                self.log("train/loss_labeled", labeled)
        else:
            unlabeled = soft_target_cross_entropy(logits, targets)
            labeled = F.cross_entropy(self(batch["labeled"][0]), batch["labeled"][1])
            loss = self.pseudo_loss(labeled, unlabeled)
            self.log("train/loss_labeled", labeled)
        self.log("train/loss_unlabeled", unlabeled)
        self.log("train/loss", loss, prog_bar=True)
        return loss
