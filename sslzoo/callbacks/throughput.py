"""Training throughput: images per second over training batches only."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def _batch_images(batch: Any) -> int:
    views, labels = batch
    return int(labels.shape[0])


class Throughput(L.Callback):
    """Logs ``perf/images_per_sec`` (source images, not views, per second of training steps,
    excluding validation) every ``log_every_n_steps`` and keeps run totals for benchmarks.

    On a GPU the clock is read after a ``torch.cuda.synchronize`` only at logging points, so the
    step itself stays free of host-device syncs. A window opens at the first training batch after
    a start, a validation or a resume (Lightning runs no ``on_train_epoch_start`` when it resumes
    mid-epoch), so it never spans time spent outside training steps.
    """

    def __init__(self, log_every_n_steps: int = 50) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.images = 0
        self.seconds = 0.0
        self._window_images = 0
        self._window_start: float | None = None

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        if self._window_start is None:
            self._window_start, self._window_images = self._now(pl_module), 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self._window_images += _batch_images(batch)
        if (i + 1) % self.log_every_n_steps == 0:
            now = self._now(pl_module)
            rate = self._window_images / max(now - self._window_start, 1e-9)
            pl_module.log("perf/images_per_sec", rate)
            self.images += self._window_images
            self.seconds += now - self._window_start
            self._window_start, self._window_images = now, 0

    def _close_window(self, pl_module: L.LightningModule) -> None:
        """Add the open window (if any) to the run totals."""
        if self._window_start is not None:
            self.images += self._window_images
            self.seconds += self._now(pl_module) - self._window_start
            self._window_images, self._window_start = 0, None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._close_window(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_window(pl_module)

    @property
    def images_per_sec(self) -> float:
        """Average over the whole run so far."""
        return self.images / self.seconds if self.seconds else 0.0
