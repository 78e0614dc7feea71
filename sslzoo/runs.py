"""Run directories: each ``sslzoo fit`` writes into a new ``ROOT/version_N`` (so a rerun never
overwrites an earlier run), ``--ckpt_path last`` continues the latest version that has a
checkpoint, and the logged history (``metrics.csv``, TensorBoard) continues across a resume
without gaps or repeated steps.

    ROOT/version_N/
        config.yaml  hparams.yaml  metrics.csv  events.out.tfevents.*  skipped_images.txt
        checkpoints/last.ckpt       the newest checkpoint
        checkpoints/previous.ckpt   the one before it, the fallback if last.ckpt is unreadable
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from sslzoo.errors import CheckpointError, warn_user

VERSION = re.compile(r"^version_(\d+)$")
LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"  # no "last" in the name: Lightning's own search for last*.ckpt skips it
# set by rank 0 for the processes it launches, so every rank writes to the same version
RUN_DIR_ENV = "SSLZOO_RUN_DIR"


def versions(root: str | os.PathLike) -> list[Path]:
    """The ``version_N`` folders under ``root``, by increasing N."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := VERSION.match(p.name))]
    return [p for _, p in sorted(found)]


def next_version(root: str | os.PathLike) -> Path:
    """``root/version_N`` with N one past the highest existing version (0 if none)."""
    existing = versions(root)
    number = int(VERSION.match(existing[-1].name)[1]) + 1 if existing else 0
    return Path(root) / f"version_{number}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step of a checkpoint. Memory-maps the file, so only the few bytes read are
    loaded; raises :class:`CheckpointError` if it cannot be read (truncated, not a checkpoint)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception as error:  # noqa: BLE001 - truncated zip, bad pickle, missing key: all unreadable
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({error})") from error


def readable_checkpoint(path: Path) -> Path:
    """``path`` if it can be read, else ``previous.ckpt`` beside it (with a warning naming
    both); raises :class:`CheckpointError` if neither can be read."""
    try:
        checkpoint_step(path)
        return path
    except CheckpointError as error:
        previous = path.with_name(PREVIOUS)
        if path.name != LAST or not previous.is_file():
            raise
        step = checkpoint_step(previous)
        warn_user(f"{error}; resuming from the one before it, {previous} (step {step})")
        return previous


@dataclass
class RunPlan:
    """Where a run writes (``directory``), the checkpoint it restores (``ckpt_path``, a file or
    None) and whether it continues the history already in ``directory`` (``resumes``)."""

    directory: Path
    ckpt_path: str | None = None
    resumes: bool = False


def _is_rank_zero() -> bool:
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def plan_run(root: str | os.PathLike, ckpt_path: str | None, resume: bool = True) -> RunPlan:
    """Choose the run directory under ``root`` and the checkpoint to restore.

    ``ckpt_path``: None starts ``root/version_<next>``; ``"last"`` continues the newest version
    (a new one if it has no checkpoint: an older version is another run); a file inside
    ``DIR/checkpoints/`` continues ``DIR``, any other file starts a new version from it (a run
    of its own, starting from those weights and that state). Without ``resume``
    (validate, test), every run gets a new version. Only rank 0 chooses: the processes it
    launches inherit its choice through ``SSLZOO_RUN_DIR``.
    """
    root = Path(root)
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and not _is_rank_zero():
        directory = Path(inherited)
    else:
        directory = next_version(root)
    plan = RunPlan(directory, ckpt_path)
    if resume and ckpt_path == "last":
        newest = versions(root)[-1:]
        found = [v / "checkpoints" / n for v in newest for n in (LAST, PREVIOUS)]
        found = [p for p in found if p.is_file()]
        if not found:
            where = f"the newest run, {newest[0]}, has" if newest else f"{str(root)!r} holds"
            warn_user(f"--ckpt_path last: {where} no checkpoint; starting a new run")
            plan.ckpt_path = None
        else:
            path = readable_checkpoint(found[0])
            plan.directory, plan.ckpt_path, plan.resumes = path.parent.parent, str(path), True
    elif resume and ckpt_path is not None and Path(ckpt_path).is_file():
        path = readable_checkpoint(Path(ckpt_path))
        plan.ckpt_path = str(path)
        if path.parent.name == "checkpoints":  # a run of ours: continue it in place
            plan.directory, plan.resumes = path.parent.parent, True
    if _is_rank_zero():
        os.environ[RUN_DIR_ENV] = str(plan.directory)
    return plan


class HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of
    deleted (Lightning deletes it, with a warning). When a resumed run logs its first row, the
    rows the interrupted run logged at that step or later (after its checkpoint) are dropped,
    then new rows are appended under the same header."""

    def __init__(self, log_dir: str, resumes: bool) -> None:
        self._truncate_at_first_row = resumes
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._truncate_at_first_row and step is not None:
            self._truncate_at_first_row = False
            self._drop_rows_from(step)
        super().log_metrics(metrics_dict, step)

    def _drop_rows_from(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if int(float(row.get("step") or 0)) < step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class HistoryCSVLogger(CSVLogger):
    """A CSV logger writing ``metrics.csv`` straight into ``save_dir`` and, with ``resumes``,
    continuing the history already there (see :class:`HistoryWriter`)."""

    def __init__(self, save_dir: str | os.PathLike, resumes: bool = False) -> None:
        super().__init__(save_dir, name="", version="")
        self.resumes = resumes

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(self.log_dir, self.resumes)
        return self._experiment


class HistoryTensorBoardLogger(TensorBoardLogger):
    """A TensorBoard logger writing straight into ``save_dir``. With ``resumes``, the first
    step it logs is marked as a restart (the record ``SummaryWriter(purge_step=...)`` writes),
    so TensorBoard hides the interrupted run's events from that step on."""

    def __init__(self, save_dir: str | os.PathLike, resumes: bool = False) -> None:
        # the placeholder hp_metric (-1 at step 0) went in with the run's first session
        super().__init__(save_dir, name="", version="", default_hp_metric=not resumes)
        self._mark_restart = resumes

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._mark_restart and step is not None:
            self._mark_restart = False
            restart = SessionLog(status=SessionLog.START)
            self.experiment.file_writer.add_event(Event(step=step, session_log=restart))
        super().log_metrics(metrics, step)


def run_loggers(directory: Path, resumes: bool) -> list[Any]:
    """TensorBoard and CSV loggers writing into ``directory``; with ``resumes`` they continue
    the history an interrupted run left there."""
    return [HistoryTensorBoardLogger(directory, resumes), HistoryCSVLogger(directory, resumes)]
