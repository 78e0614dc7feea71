"""Small builders shared by tests: tiny methods and quiet CPU trainers on the digits set."""

from __future__ import annotations

from typing import Any

import lightning as L

from sslzoo.datamodules import DigitsDataModule


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A CPU trainer with no progress bar, summary, sanity check or default logger."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def digits(batch_size: int = 32, image_size: int = 16, num_workers: int = 0) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, num_workers=num_workers, image_size=image_size)
