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
        ("optim.lr", "0.2"),
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


def test_missing_data_prints_the_message_not_a_traceback(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    config = REPO / "configs" / "cifar10" / "simclr.yaml"
    missing = tmp_path / "no-cifar-here"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--data.root", str(missing),
              "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-cifar-here" in err and "--data.root" in err
    assert "Traceback" not in err


USER_METHOD = """
from sslzoo.methods import SimCLR


class MySimCLR(SimCLR):
    \"\"\"SimCLR with one more knob.\"\"\"

    def __init__(self, extra_weight: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extra_weight = extra_weight
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A method subclass in a file outside the package, importable as ``myidea``."""
    (tmp_path / "myidea.py").write_text(USER_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myidea.MySimCLR"


@pytest.mark.parametrize(
    ("typo", "expected"),
    [
        (
            "--model.temperatur",
            "MySimCLR has no argument 'temperatur'; did you mean 'temperature'?",
        ),
        (
            "--model.extra_weigh",
            "MySimCLR has no argument 'extra_weigh'; did you mean 'extra_weight'?",
        ),
    ],
)
def test_a_misspelled_key_of_a_user_subclass_is_named_first(
    user_module: str, typo: str, expected: str, capsys: pytest.CaptureFixture
) -> None:
    config = REPO / "configs" / "quickstart" / "simclr.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--model", user_module, typo, "0.3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"error: --model: {expected}"
    assert "unknown model" not in err and "usage:" not in err and len(err.splitlines()) == 2


def test_an_unknown_option_suggests_the_closest(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model", "SimCLR", "--data", "DigitsDataModule", "--trainr.max_epochs", "3"])
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments: --trainr.max_epochs 3")
    assert "did you mean '--trainer.max_epochs'" in err


def test_names_match_in_any_case_and_a_changed_class_says_what_it_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cli = quickstart_cli(tmp_path, "--model", "simsiam", "--data", "digitsdatamodule")
    assert type(cli.model).__name__ == "SimSiam"
    err = capsys.readouterr().err
    # the quickstart config's BYOL arguments that SimSiam has no use for
    assert "SimSiam replaces the config's BYOL" in err and "ema_momentum" in err
    assert "DigitsDataModule replaces" not in err  # same class: nothing dropped


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
    assert all(Path(c.dirpath) == tmp_path / "version_0" / "checkpoints" for c in checkpoints)
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
    epoch's end writes last.ckpt, keeping the one it replaces as previous.ckpt."""
    cli = quickstart_cli(
        tmp_path, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
    )  # fmt: skip
    assert cli.trainer.check_val_every_n_epoch == 5
    probe = LastCheckpointEpochs(tmp_path / "version_0" / "checkpoints" / "last.ckpt")
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert probe.seen == [None, (0, 2), (1, 4)]
    checkpoints = tmp_path / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "previous.ckpt"]
    assert torch.load(checkpoints / "previous.ckpt", weights_only=True)["global_step"] == 4


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
    header = (tmp_path / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "perf/images_per_sec" in header
