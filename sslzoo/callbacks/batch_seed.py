"""Randomness inside training steps as a function of the batch's place in the run."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

from sslzoo.seeding import derive_seed, global_seed


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """64-bit seed of one training batch of one rank."""
    return derive_seed(seed, epoch, batch_idx, rank)


class BatchSeed(L.Callback):
    """Reseed python, numpy and torch (CPU and every CUDA device) at the start of each training
    batch from (global seed, epoch, batch index, rank).

    Whatever a training step draws (iBOT and MAE masks, drop path, dropout) then depends only
    on where the batch is in the run, so a run resumed from any checkpoint, mid-epoch included,
    draws exactly what the uninterrupted run drew, on every rank, with no generator state in the
    checkpoint and nothing drawn between a save and a resume (validation, data loading) able to
    shift it. The global seed is ``seed_everything``'s (``PL_GLOBAL_SEED``, 0 if unset).
    """

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        value = batch_seed(global_seed(), trainer.current_epoch, batch_idx, trainer.global_rank)
        random.seed(value)
        np.random.seed(value % 2**32)
        torch.manual_seed(value)
