"""Run folders: a new version for every run, ``--ckpt_path last`` continuing the newest one, a
damaged ``last.ckpt`` replaced by the one before it, and a history that continues."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from sslzoo.checkpoints import AtomicCheckpointIO
from sslzoo.errors import CheckpointError
from sslzoo.report import run_folder, run_label
from sslzoo.runs import HistoryWriter, plan_run, versions


def checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)
    return path


def test_each_run_gets_a_new_version(tmp_path: Path) -> None:
    assert plan_run(tmp_path, None).directory == tmp_path / "version_0"
    for n in (0, 1, 9):
        (tmp_path / f"version_{n}").mkdir()
    (tmp_path / "version_x").mkdir()  # not a version
    assert versions(tmp_path) == [tmp_path / f"version_{n}" for n in (0, 1, 9)]
    plan = plan_run(tmp_path, None)
    assert plan.directory == tmp_path / "version_10" and not plan.resumes
    # validate / test never continue a run
    assert plan_run(tmp_path, "last", resume=False).directory == tmp_path / "version_10"


def test_last_continues_the_newest_version_only(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    old = checkpoint(tmp_path / "version_0" / "checkpoints" / "last.ckpt", 5)
    plan = plan_run(tmp_path, "last")
    assert (plan.directory, plan.ckpt_path, plan.resumes) == (old.parent.parent, str(old), True)
    (tmp_path / "version_1").mkdir()  # a newer run that died before its first checkpoint
    plan = plan_run(tmp_path, "last")
    assert plan.directory == tmp_path / "version_2" and plan.ckpt_path is None
    assert "version_1, has no checkpoint; starting a new run" in capsys.readouterr().err


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "version_0" / "checkpoints"
    io = AtomicCheckpointIO(background=False)
    for step in (3, 6):
        io.save_checkpoint({"global_step": step}, folder / "last.ckpt")
    assert torch.load(folder / "previous.ckpt", weights_only=True)["global_step"] == 3
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    plan = plan_run(tmp_path, "last")
    assert plan.ckpt_path == str(folder / "previous.ckpt") and plan.resumes
    assert "is unreadable" in capsys.readouterr().err
    (folder / "previous.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="previous.ckpt"):
        plan_run(tmp_path, "last")


def test_an_explicit_checkpoint_continues_its_own_run(tmp_path: Path) -> None:
    inside = checkpoint(tmp_path / "a" / "version_3" / "checkpoints" / "epoch=1.ckpt", 8)
    plan = plan_run(tmp_path / "b", str(inside))
    assert plan.directory == inside.parent.parent and plan.resumes
    elsewhere = checkpoint(tmp_path / "weights.ckpt", 8)  # not a run folder: a new run from it
    plan = plan_run(tmp_path / "b", str(elsewhere))
    assert plan.directory == tmp_path / "b" / "version_0" and not plan.resumes
    assert plan.ckpt_path == str(elsewhere)


def write_rows(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss"])
        writer.writeheader()
        writer.writerows(rows)


def test_history_drops_what_followed_the_checkpoint_once(tmp_path: Path) -> None:
    write_rows(
        tmp_path / "metrics.csv", [{"epoch": 0, "step": s, "train/loss": s} for s in range(6)]
    )
    writer = HistoryWriter(str(tmp_path), resumes=True)
    writer.log_metrics({"train/loss": 40.0, "knn/val_top1": 0.5}, step=4)  # resumed at step 4
    writer.log_metrics({"train/loss": 50.0}, step=5)
    writer.save()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        ("0", "0"), ("1", "1"), ("2", "2"), ("3", "3"), ("4", "40.0"), ("5", "50.0")
    ]  # fmt: skip
    assert rows[4]["knn/val_top1"] == "0.5" and rows[0]["knn/val_top1"] == ""
    # a new run in a folder that happens to hold a metrics.csv keeps it whole
    HistoryWriter(str(tmp_path), resumes=False).log_metrics({"train/loss": 1.0}, step=0)
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 7


def test_report_reads_the_newest_version_of_a_root(tmp_path: Path) -> None:
    for n in (0, 1):
        (tmp_path / "simclr_cifar10" / f"version_{n}").mkdir(parents=True)
        (tmp_path / "simclr_cifar10" / f"version_{n}" / "metrics.csv").write_text("epoch,step\n")
    assert run_folder(tmp_path / "simclr_cifar10") == tmp_path / "simclr_cifar10" / "version_1"
    assert run_label(tmp_path / "simclr_cifar10") == "simclr_cifar10/version_1"
