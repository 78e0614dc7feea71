"""A run stopped at an epoch boundary and resumed with ``ckpt_path="last"`` ends exactly where
an uninterrupted run ends: weights, EMA teacher, probe, schedules and step count."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from sslzoo.callbacks import OnlineProbe
from sslzoo.cli import SSLZooCLI
from tests.conftest import REPO

CONFIG = REPO / "configs" / "quickstart" / "byol.yaml"


class StopAfter(L.Callback):
    """Stop training at the end of epoch ``epochs`` (as if the job were stopped there)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def build(root: Path) -> SSLZooCLI:
    return SSLZooCLI(
        args=[
            "--config", str(CONFIG),
            "--trainer.default_root_dir", str(root),
            "--trainer.max_epochs", "3",
            "--trainer.limit_train_batches", "4",
            "--trainer.limit_val_batches", "2",
            "--trainer.check_val_every_n_epoch", "1",
            "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "32",
            "--model.optim.warmup_epochs", "1",
        ],
        run=False,
    )  # fmt: skip


def probe_of(trainer: L.Trainer) -> OnlineProbe:
    return next(c for c in trainer.callbacks if isinstance(c, OnlineProbe))


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = build(tmp_path / "full")
    full.trainer.fit(full.model, datamodule=full.datamodule)

    first = build(tmp_path / "resumed")
    first.trainer.callbacks.append(StopAfter(2))
    first.trainer.fit(first.model, datamodule=first.datamodule)
    assert first.trainer.global_step == 8
    last = tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    torch.load(last, weights_only=True)  # no pickled objects in the checkpoint

    second = build(tmp_path / "resumed")
    second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=str(last))

    assert second.trainer.global_step == full.trainer.global_step == 12
    a, b = full.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for pa, pb in zip(
        probe_of(full.trainer).head.parameters(),
        probe_of(second.trainer).head.parameters(),
        strict=True,
    ):
        assert torch.equal(pa, pb)
    opt_a = full.trainer.optimizers[0].param_groups[0]
    opt_b = second.trainer.optimizers[0].param_groups[0]
    assert opt_a["lr"] == opt_b["lr"]
