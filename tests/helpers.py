"""Small builders shared by tests: tiny methods and quiet CPU trainers on the digits set."""

from __future__ import annotations

import socket
from typing import Any

import lightning as L

from sslzoo.augment.recipes import Views
from sslzoo.datamodules import DigitsDataModule
from sslzoo.optim.settings import Optimization


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


def digits(
    batch_size: int = 32, image_size: int = 16, num_workers: int = 0, views: Views | None = None
) -> DigitsDataModule:
    """The digits set; ``views`` (a model's recipe, ``model.views``) makes its training views."""
    data = DigitsDataModule(batch_size=batch_size, num_workers=num_workers, image_size=image_size)
    data.views = views
    return data


def sgd(lr: float = 0.1, **settings: Any) -> Optimization:
    """SGD settings for tests: ``lr`` per 256 images (linear scaling), no warmup, the other
    fields :class:`Optimization`'s defaults unless given."""
    return Optimization(**{"optimizer": "sgd", "lr": lr, "warmup_epochs": 0.0, **settings})


def free_port() -> int:
    """A TCP port free on this machine now, for the rendezvous of test processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
