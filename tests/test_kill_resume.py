"""A run killed with SIGKILL mid-epoch (no clean shutdown), then resumed with ``--ckpt_path last``,
ends with exactly the checkpoint of an uninterrupted run; a kill while ``last.ckpt`` is being
written leaves the previous ``last.ckpt`` whole.

Every run is ``python -m sslzoo fit`` in a child process with one thread, on the digits set:
2 epochs of 7 batches, ``checkpoint_every_n_steps: 3`` (``last.ckpt`` at steps 3, 6, 9, 12 and
at the epoch ends 7 and 14). The :class:`KillSwitch` callback below is what kills the child.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from sslzoo.checkpoints import partial_path, write_atomic
from tests.augment_helpers import cifar_folder
from tests.conftest import REPO, TINY_RESNET

STEPS = 14  # 2 epochs x 7 batches
EVERY = 3

DINO = {
    "class_path": "sslzoo.methods.DINO",
    "init_args": {
        "backbone": "vit_tiny_patch16_224",
        "backbone_kwargs": {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32,
                            "num_heads": 2},
        "drop_path_rate": 0.1,  # random draws inside the training step
        "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
        "warmup_teacher_temp_epochs": 1,
        "sync_batchnorm": False,
        "views": {"local_crops_number": 2},
        "optim": {"warmup_epochs": 1},
    },
}  # fmt: skip

SWAV = {
    "class_path": "sslzoo.methods.SwAV",
    "init_args": {
        **TINY_RESNET,
        "feat_dim": 16, "hidden_mlp": 32, "nmb_prototypes": 10,
        "freeze_prototypes_niters": 2,
        "queue_length": 32,  # 2 batches of 16: full, and used, from step 3 on
        "epoch_queue_starts": 0,
        "sync_batchnorm": False,
        "views": {"nmb_crops": [2], "size_crops": [16], "min_scale_crops": [0.14],
                  "max_scale_crops": [1.0]},
        "optim": {"optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0, "start_warmup_lr": 0.0,
                  "min_lr": 0.0},
    },
}  # fmt: skip


class KillSwitch(L.Callback):
    """Test-only: SIGKILL this process at the start of the step after ``kill_at_step`` optimizer
    steps (once the checkpoint writes in flight have landed), or halfway through writing the
    ``last.ckpt`` of step ``kill_in_save_at`` (in the writer thread, while training goes on);
    write the step training starts from to ``record``."""

    def __init__(
        self,
        kill_at_step: int | None = None,
        kill_in_save_at: int | None = None,
        record: str | None = None,
    ) -> None:
        self.kill_at_step = kill_at_step
        self.kill_in_save_at = kill_in_save_at
        self.record = record

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.record:
            Path(self.record).write_text(str(trainer.global_step))
        if self.kill_in_save_at is None:
            return
        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            name = str(getattr(f, "name", f))
            step = obj.get("global_step") if isinstance(obj, dict) else None
            if step == self.kill_in_save_at and name.endswith(".last.ckpt.partial"):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, f, *args, **kwargs)

        torch.save = save

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.kill_at_step:
            # checkpoints are written in a background thread: let the last one land, so the
            # test knows which one the kill leaves (kill_in_save_at kills mid-write)
            trainer.strategy.checkpoint_io.wait()
            os.kill(os.getpid(), signal.SIGKILL)


DIGITS = {"class_path": "sslzoo.datamodules.DigitsDataModule", "init_args": {"image_size": 16}}


def write_config(
    path: Path,
    root: Path,
    model: dict,
    num_workers: int,
    data: dict = DIGITS,
    trainer: dict | None = None,
    **kill: Any,
) -> Path:
    data_args = {**data["init_args"], "batch_size": 16, "num_workers": num_workers}
    config = {
        "seed_everything": 0,
        "checkpoint_every_n_steps": EVERY,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_train_batches": 7,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "sslzoo.callbacks.OnlineProbe"},
                {"class_path": "tests.test_kill_resume.KillSwitch", "init_args": kill},
            ],
        },
        "model": model,
        "data": {"class_path": data["class_path"], "init_args": data_args},
    }
    config["trainer"].update(trainer or {})
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "sslzoo", "fit", "--config", str(config), *extra]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: DDP ranks are its children
    )


def finish(process: subprocess.Popen, log: Path) -> int:
    try:
        code = process.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a DDP rank left behind
            os.killpg(process.pid, signal.SIGKILL)
    if code not in (0, -signal.SIGKILL):
        pytest.fail(f"child exited with {code}:\n{log.read_text()[-4000:]}")
    return code


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts / lists of tensors and numbers: same structure, bitwise-equal values."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def kill_and_resume(
    tmp_path: Path,
    model: dict,
    num_workers: int,
    resumes_from: int,
    data: dict = DIGITS,
    trainer: dict | None = None,
    **kill: Any,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run uninterrupted and killed (side by side), then resume the killed run. Returns the
    final checkpoints of both and the ``last.ckpt`` the killed run left."""
    setup = (model, num_workers, data, trainer)
    full_cfg = write_config(tmp_path / "full.yaml", tmp_path / "full", *setup)
    killed_root = tmp_path / "killed"
    killed_cfg = write_config(tmp_path / "killed.yaml", killed_root, *setup, **kill)
    record = tmp_path / "resumed_from.txt"
    resume_cfg = write_config(tmp_path / "resume.yaml", killed_root, *setup, record=str(record))
    full = start(full_cfg, tmp_path / "full.log")
    killed = start(killed_cfg, tmp_path / "killed.log")
    assert finish(killed, tmp_path / "killed.log") == -signal.SIGKILL
    last = killed_root / "version_0" / "checkpoints" / "last.ckpt"
    left = load(last)  # loads with weights_only=True: not corrupt
    assert left["global_step"] == resumes_from
    if kill.get("kill_in_save_at") is not None:
        partial = partial_path(last)  # the interrupted write: half a file, never renamed
        assert partial.stat().st_size > 0
        with pytest.raises(Exception):  # noqa: B017 - any unpickling / zip error
            load(partial)
    resumed = start(resume_cfg, tmp_path / "resume.log", "--ckpt_path", "last")
    assert finish(full, tmp_path / "full.log") == 0
    assert finish(resumed, tmp_path / "resume.log") == 0
    assert int(record.read_text()) == resumes_from  # it did resume, from the mid-epoch step
    final_full = load(tmp_path / "full" / "version_0" / "checkpoints" / "last.ckpt")
    final_resumed = load(last)
    assert final_full["global_step"] == final_resumed["global_step"] == STEPS
    return final_full, final_resumed, left


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Weights (student, EMA teacher, centre, prototypes, BN statistics), optimizer state and
    learning rates, probe, step and epoch: bitwise equal, since both runs do the same float
    operations in the same order on one CPU thread."""
    for key in ("global_step", "epoch", "state_dict", "optimizer_states"):
        assert_same(a[key], b[key], key)
    assert_same(a["callbacks"]["OnlineProbe"], b["callbacks"]["OnlineProbe"], "probe")
    assert a["callbacks"]["OnlineProbe"], "the probe trained"


def test_swav_killed_while_saving_keeps_last_and_resumes_exactly(tmp_path: Path) -> None:
    # killed halfway through writing step 6's last.ckpt: step 3's stays, 3 batches into epoch 0
    full, resumed, left = kill_and_resume(
        tmp_path, SWAV, num_workers=0, resumes_from=3, kill_in_save_at=6
    )
    # the resumed run's own writes replaced the stale partial file
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    assert not partial_path(last).exists()
    assert left["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": 3}
    ]
    assert left["swav_queue"].abs().sum(-1).gt(0).all(), "the queue is full (and in use)"
    assert_same(full["swav_queue"], resumed["swav_queue"], "swav_queue")
    assert_same_training_state(full, resumed)


@pytest.mark.parametrize("datamodule", ["CIFAR10DataModule", "ImageFolderDataModule"])
def test_device_augmented_run_killed_mid_epoch_resumes_exactly(
    tmp_path: Path, datamodule: str
) -> None:
    # DINO with a ResNet and local crops on device views: in-memory images cut and augmented
    # on the device, or folder images cropped in a worker with the colour steps on the device
    root = cifar_folder(tmp_path / "images", per_class=60)  # 120 images: 7 batches of 16
    where = (
        {"root": str(root)}
        if datamodule == "CIFAR10DataModule"
        else {"train_dir": str(root / "train"), "val_dir": str(root / "test"),
              "eval_resize_ratio": 1.0}
    )  # fmt: skip
    data = {
        "class_path": f"sslzoo.datamodules.{datamodule}",
        "init_args": {**where, "image_size": 16, "device_augment": True},
    }
    init_args = DINO["init_args"]
    dino_resnet = {
        "class_path": "sslzoo.methods.DINO",
        "init_args": {
            **init_args,
            **TINY_RESNET,
            "views": {**init_args["views"], "local_crop_size": 8},
        },
    }
    workers = 0 if datamodule == "CIFAR10DataModule" else 1
    full, resumed, left = kill_and_resume(
        tmp_path, dino_resnet, workers, resumes_from=9, data=data, kill_at_step=11
    )
    loader_state = left["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": 1, "batches": 2}]
    assert_same_training_state(full, resumed)


def test_ddp_swav_killed_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    # two gloo ranks of 16 images each, both killed
    # before the 12th step; every rank's SwAV queue is in the checkpoint and comes back
    ddp = {"strategy": "ddp", "devices": 2}
    swav = {**SWAV, "init_args": {**SWAV["init_args"], "queue_length": 32}}
    full, resumed, left = kill_and_resume(
        tmp_path, swav, num_workers=0, resumes_from=9, trainer=ddp, kill_at_step=11
    )
    assert left["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 2}
    ]
    assert len(left["swav_queue"]) == 2, "one queue per rank"
    assert_same(full["swav_queue"], resumed["swav_queue"], "swav_queue")
    assert_same_training_state(full, resumed)


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    write_atomic(path, lambda f: f.write(b"complete"))

    def fail_halfway(f: Any) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail_halfway)
    assert path.read_bytes() == b"complete"
    assert not partial_path(path).exists()
