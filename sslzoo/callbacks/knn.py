"""Weighted kNN monitor on held-out labeled images."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from sslzoo.evaluation import knn_predict


class KNNMonitor(L.Callback):
    """Weighted kNN accuracy of the method's evaluation features at each validation epoch.

    The feature bank is the datamodule's ``knn_bank_dataloader()`` (labeled training images,
    no augmentation), built batch by batch; queries are the validation batches. Scores are
    computed in chunks so memory stays bounded by ``chunk_size x bank size``.

    Args:
        k: neighbours of the headline protocol, logged as ``knn/val_top1``.
        temperature: temperature of the headline protocol.
        extra_protocols: more (k, temperature) pairs, logged as ``knn/val_top1_k{k}_t{T}``;
            the DINO protocol is (20, 0.07).
        chunk_size: queries scored at once.
    """

    def __init__(
        self,
        k: int = 200,
        temperature: float = 0.1,
        extra_protocols: list[tuple[int, float]] | None = None,
        chunk_size: int = 1024,
    ) -> None:
        self.protocols = [(k, temperature)] + [tuple(p) for p in (extra_protocols or [])]
        self.chunk_size = chunk_size
        self._bank: torch.Tensor | None = None
        self._bank_labels: torch.Tensor | None = None
        self._correct: list[int] = []
        self._total = 0

    @staticmethod
    def metric_name(index: int, k: int, temperature: float) -> str:
        return "knn/val_top1" if index == 0 else f"knn/val_top1_k{k}_t{temperature:g}"

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bank = None
        if trainer.sanity_checking:
            return
        loader = trainer.datamodule.knn_bank_dataloader()
        feats, labels = [], []
        for images, y in loader:
            feats.append(pl_module.extract_features(images.to(pl_module.device)))
            labels.append(y.to(pl_module.device))
        self._bank, self._bank_labels = torch.cat(feats), torch.cat(labels)
        self._correct = [0] * len(self.protocols)
        self._total = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._bank is None:
            return
        num_classes = trainer.datamodule.num_classes
        labels = outputs["labels"]
        for i, (k, t) in enumerate(self.protocols):
            scores = knn_predict(
                outputs["features"],
                self._bank,
                self._bank_labels,
                num_classes,
                k,
                t,
                self.chunk_size,
            )
            self._correct[i] += int((scores.argmax(1) == labels).sum())
        self._total += len(labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bank is None or not self._total:
            return
        for i, (k, t) in enumerate(self.protocols):
            pl_module.log(self.metric_name(i, k, t), self._correct[i] / self._total)
        self._bank = self._bank_labels = None
