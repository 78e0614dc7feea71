"""Data a run cannot use as given: errors that name the files and what to do, and warnings
given once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from sslzoo.datamodules import CIFAR10DataModule
from sslzoo.errors import DataError
from sslzoo.methods.simclr import SimCLR
from tests.augment_helpers import cifar_folder
from tests.conftest import TINY_RESNET
from tests.helpers import quiet_trainer


def tiny_simclr() -> SimCLR:
    return SimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False)


# ----------------------------------------------- a batch larger than the data


@pytest.mark.parametrize("device_augment", [False, True], ids=["worker_loader", "device_batches"])
def test_batch_larger_than_training_set_fails_before_training(
    tmp_path: Path, device_augment: bool
) -> None:
    root = cifar_folder(tmp_path / "data")  # 20 training images
    data = CIFAR10DataModule(
        str(root), batch_size=32, num_workers=0, pin_memory=False, device_augment=device_augment
    )
    trainer = quiet_trainer(max_epochs=1, default_root_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"has 20 images, fewer than one batch of 32") as info:
        trainer.fit(tiny_simclr(), datamodule=data)
    assert "--data.batch_size 20 or less" in str(info.value)
    assert trainer.global_step == 0


def test_each_rank_needs_a_full_batch(tmp_path: Path) -> None:
    data = CIFAR10DataModule(str(cifar_folder(tmp_path)), batch_size=8, num_workers=0)
    data.trainer = SimpleNamespace(world_size=4, lightning_module=None, log_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"batch of 8 per device .* x 4 devices = 32") as info:
        data.setup("fit")
    assert "has 20 images" in str(info.value) and "batch_size 5 or less" in str(info.value)
    data.batch_size = 5  # 4 ranks x 5 images: one full batch each
    data.setup("fit")
    data.batch_size = 32  # only training needs full batches
    data.setup("validate")
