"""The command line: help from docstrings, names that exist, errors that say what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sslzoo.callbacks import BatchSeed, Throughput
from sslzoo.checkpoints import AtomicCheckpointIO
from sslzoo.cli import SSLZooCLI, main
from tests.conftest import REPO


def test_model_help_lists_recipe_with_docs(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "BYOL"])
    out = capsys.readouterr().out
    for name, default in (
        ("ema_momentum", "0.996"),
        ("projector_hidden_dim", "4096"),
        ("lr", "0.2"),
    ):
        assert f"--model.{name}" in out and default in out
    assert "base EMA momentum" in out  # the docstring line


def test_unknown_method_lists_valid_names(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        SSLZooCLI(args=["fit", "--model", "SimCRL", "--data", "DigitsDataModule"])
    err = capsys.readouterr().err
    assert "unknown model 'SimCRL'" in err and "SimCLR" in err and "BYOL" in err


def test_unknown_data_lists_valid_names(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        SSLZooCLI(args=["fit", "--model", "SimCLR", "--data", "Cifar10"])
    err = capsys.readouterr().err
    assert "unknown data 'Cifar10'" in err and "CIFAR10DataModule" in err


def test_missing_cifar_root_is_named(tmp_path: Path) -> None:
    config = REPO / "configs" / "cifar10" / "simclr.yaml"
    missing = tmp_path / "no-cifar-here"
    with pytest.raises(FileNotFoundError, match="no-cifar-here"):
        SSLZooCLI(
            args=["fit", "--config", str(config), "--data.root", str(missing),
                  "--trainer.default_root_dir", str(tmp_path / "run")]
        )  # fmt: skip


def test_python_dash_m_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sslzoo", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--model" in result.stdout


def quickstart_cli(root: Path, *extra: str) -> SSLZooCLI:
    config = REPO / "configs" / "quickstart" / "byol.yaml"
    args = ["--config", str(config), "--trainer.default_root_dir", str(root), *extra]
    return SSLZooCLI(args=args, run=False)


def test_default_checkpoints_every_n_steps_atomic_with_batch_seeds(tmp_path: Path) -> None:
    cli = quickstart_cli(tmp_path, "--checkpoint_every_n_steps", "5")
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    # one writing last.ckpt at epoch ends, one writing it every 5 steps
    triggers = sorted((c._every_n_train_steps, c._every_n_epochs) for c in checkpoints)
    assert triggers == [(0, 1), (5, 0)]
    assert {c.save_top_k for c in checkpoints if c._every_n_train_steps} == {0}
    assert all(Path(c.dirpath) == tmp_path / "checkpoints" for c in checkpoints)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(c, BatchSeed) for c in cli.trainer.callbacks) == 1
    (throughput,) = [c for c in cli.trainer.callbacks if isinstance(c, Throughput)]
    assert throughput.log_every_n_steps == cli.trainer.log_every_n_steps

    plain = quickstart_cli(tmp_path / "plain")
    assert [
        c._every_n_epochs for c in plain.trainer.callbacks if isinstance(c, ModelCheckpoint)
    ] == [1]
    assert isinstance(plain.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class LastCheckpointEpochs(L.Callback):
    """Test-only: the epoch and step held by ``last.ckpt`` at each training epoch's start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[tuple[int, int] | None] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.checkpoint_io.wait()  # the write in flight, if any
        if not self.path.exists():
            self.seen.append(None)
            return
        ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        self.seen.append((ckpt["epoch"], ckpt["global_step"]))


def test_last_checkpoint_at_every_epoch_end_between_validations(tmp_path: Path) -> None:
    """Validation every 5 epochs (as in the configs) must not thin out the checkpoints: each
    epoch's end writes last.ckpt, and it is the only file kept."""
    cli = quickstart_cli(
        tmp_path, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
    )  # fmt: skip
    assert cli.trainer.check_val_every_n_epoch == 5
    probe = LastCheckpointEpochs(tmp_path / "checkpoints" / "last.ckpt")
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert probe.seen == [None, (0, 2), (1, 4)]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]


def test_every_n_steps_needs_the_default_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every_n_train_steps"):
        quickstart_cli(
            tmp_path, "--checkpoint_every_n_steps", "5", "--trainer.enable_checkpointing", "false"
        )


def test_runs_log_images_per_second(tmp_path: Path) -> None:
    cli = quickstart_cli(
        tmp_path, "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert float(cli.trainer.callback_metrics["perf/images_per_sec"]) > 0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "perf/images_per_sec" in header
