"""Loggers written to disk at every checkpoint, so a run killed at any point keeps the history
that its last checkpoint covers."""

from __future__ import annotations

from typing import Any

import lightning as L


def flush_loggers(trainer: L.Trainer) -> None:
    """Write what every logger holds in memory (CSV rows, TensorBoard events) to disk."""
    for logger in trainer.loggers:
        logger.save()


class FlushLogs(L.Callback):
    """Flushes the loggers when a checkpoint is saved, and again at the next training batch's
    start: the rows of the step that saved it are logged only after the save."""

    def __init__(self) -> None:
        self._after_save = False

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        flush_loggers(trainer)
        self._after_save = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._after_save:
            flush_loggers(trainer)
            self._after_save = False
