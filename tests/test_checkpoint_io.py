"""The checkpoint writer behind ``sslzoo fit``: files written in a background thread from a
point-in-time copy, in order, with errors re-raised in the training thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from sslzoo.checkpoints import AtomicCheckpointIO, partial_path


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_background_write_holds_the_values_at_save_time(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    gate = threading.Event()
    io._executor = ThreadPoolExecutor(1)
    io._executor.submit(gate.wait)  # the writer is busy until the gate opens
    weights = torch.arange(6.0)
    io.save_checkpoint({"state_dict": {"w": weights}, "global_step": 3}, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists(), "save returned before writing"
    weights.mul_(-1)  # training goes on, in place
    gate.set()
    io.teardown()
    saved = load(tmp_path / "last.ckpt")
    assert torch.equal(saved["state_dict"]["w"], torch.arange(6.0))
    assert saved["global_step"] == 3


def test_writes_land_in_order_and_load_waits(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    for step in range(5):
        io.save_checkpoint({"global_step": step, "w": torch.full((1000,), float(step))}, path)
    assert io.load_checkpoint(path)["global_step"] == 4
    io.teardown()
    assert not partial_path(path).exists()


def test_a_failed_background_write_is_raised_by_the_next_save(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint folder should be")
    io.save_checkpoint({"global_step": 1}, blocker / "last.ckpt")  # fails in the thread
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2}, tmp_path / "last.ckpt")
    io.save_checkpoint({"global_step": 3}, tmp_path / "last.ckpt")  # the error is reported once
    io.teardown()
    assert load(tmp_path / "last.ckpt")["global_step"] == 3


def test_foreground_writer_writes_before_returning(tmp_path: Path) -> None:
    io = AtomicCheckpointIO(background=False)
    io.save_checkpoint({"global_step": 7}, tmp_path / "last.ckpt")
    assert load(tmp_path / "last.ckpt")["global_step"] == 7
    assert io._executor is None


def test_saves_after_teardown_are_written_before_returning(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    io.teardown()  # the end of fit
    io.save_checkpoint({"global_step": 2}, tmp_path / "manual.ckpt")
    assert load(tmp_path / "manual.ckpt")["global_step"] == 2
    assert io._executor is None
