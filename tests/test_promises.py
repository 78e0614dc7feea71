"""The README's promises, tried as a user tries them: the installed ``sslzoo`` command in a child
process, with the callbacks, loggers and run layout a user gets (no test helpers in between).

A run killed with SIGKILL in the middle of an epoch, its ``last.ckpt`` then damaged as a disk
fault would, and resumed with ``--ckpt_path last``, ends with the weights and the logged history
(``metrics.csv`` and TensorBoard) of an uninterrupted run; the same command run again starts a
new version and leaves the first one as it was.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslzoo.cli import main
from tests.conftest import REPO

BIN = Path(sys.executable).parent / "sslzoo"
SSLZOO = [str(BIN)] if BIN.is_file() else [sys.executable, "-m", "sslzoo"]
QUICKSTART = REPO / "configs" / "quickstart" / "simclr.yaml"
# 2 epochs of 5 batches, last.ckpt every 2 steps and at epoch ends (steps 2, 4, 5, 6, 8, 10),
# and the Throughput callback logging at every step (it once crashed a mid-epoch resume)
TINY = [
    "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "5",
    "--trainer.log_every_n_steps", "1", "--trainer.check_val_every_n_epoch", "1",
    "--checkpoint_every_n_steps", "2", "--data.batch_size", "32", "--data.num_workers", "0",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def sslzoo(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.Popen:
    """Start ``sslzoo ARGS`` on one thread (runs are then bitwise reproducible)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [*SSLZOO, *args],
        cwd=cwd or REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def metrics(run: Path) -> list[dict[str, str]]:
    """``metrics.csv`` rows without the timing column."""
    with open(run / "metrics.csv") as f:
        return [
            {k: v for k, v in row.items() if not k.startswith("perf/")} for row in csv.DictReader(f)
        ]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's view of a run: (step, value) of every scalar but timing, after TensorBoard
    has applied the restart records (events after a resume's first step hidden)."""
    events = EventAccumulator(str(run))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if not tag.startswith("perf/")
    }


def test_killed_damaged_and_resumed_run_ends_as_uninterrupted_and_reruns_keep_it(
    tmp_path: Path,
) -> None:
    config = ["fit", "--config", str(QUICKSTART), *TINY]
    full = sslzoo(*config, "--trainer.default_root_dir", str(tmp_path / "full"))
    kill = ["--trainer.callbacks+=tests.test_kill_resume.KillSwitch",
            "--trainer.callbacks.kill_at_step", "9"]  # fmt: skip
    killed = sslzoo(*config, "--trainer.default_root_dir", str(tmp_path / "killed"), *kill)
    code, output = finish(killed)
    assert code == -signal.SIGKILL, output[-3000:]
    run = tmp_path / "killed" / "version_0"
    last, previous = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "previous.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    assert torch.load(previous, weights_only=True)["global_step"] == 6
    assert any(int(row["step"]) >= 8 for row in metrics(run)), "the killed run logged past 8"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a disk fault

    resume = ["--trainer.default_root_dir", str(tmp_path / "killed"), "--ckpt_path", "last"]
    code, resumed_log = finish(sslzoo(*config, *resume))
    assert code == 0, resumed_log[-3000:]
    assert "is unreadable" in resumed_log and "previous.ckpt (step 6)" in resumed_log
    code, full_log = finish(full)
    assert code == 0, full_log[-3000:]
    for log in (full_log, resumed_log):
        assert "exists and is not empty" not in log  # Lightning's warnings, moot here

    done = tmp_path / "full" / "version_0"
    a = torch.load(done / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 10
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert metrics(run) == metrics(done)  # every step once, in order, the same values
    assert [int(r["step"]) for r in metrics(run) if r["train/loss"]] == list(range(10))
    assert scalars(run) == scalars(done)

    before = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    rerun = ["--trainer.default_root_dir", str(tmp_path / "full"), "--trainer.max_steps", "1"]
    code, output = finish(sslzoo(*config, *rerun))
    assert code == 0, output[-3000:]
    assert (tmp_path / "full" / "version_1" / "checkpoints" / "last.ckpt").is_file()
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before


def test_a_batch_larger_than_the_data_fails_before_training(
    cifar_root: str, tmp_path: Path
) -> None:
    code, output = finish(
        sslzoo(
            "fit", "--config", str(REPO / "configs" / "cifar10" / "simclr.yaml"),
            "--data.root", cifar_root, "--data.subset_per_class", "5", "--data.batch_size", "128",
            "--trainer.default_root_dir", str(tmp_path),
        )
    )  # fmt: skip
    assert code != 0
    assert "50" in output and "128" in output, output[-2000:]
    assert "Traceback" not in output
    assert not list(tmp_path.rglob("*.ckpt"))


def test_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "quickstart", "eval", "export", "report"):
        assert f"sslzoo {command}" in out or f"{command} " in out
