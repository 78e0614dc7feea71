"""Data a run cannot use as given: errors that name the files and what to do, and warnings
given once."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sslzoo.datamodules import CIFAR10DataModule, ImageFolderDataModule
from sslzoo.datamodules.images import extract_archive, report_skipped, scan_folder
from sslzoo.errors import DataError, MissingDataError
from sslzoo.methods.simclr import SimCLR
from tests.augment_helpers import cifar_folder
from tests.conftest import TINY_RESNET
from tests.helpers import quiet_trainer


def tiny_simclr() -> SimCLR:
    return SimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False)


def image_folder(root: Path, sizes: dict[str, list[tuple[int, int]]], mode: str = "RGB") -> Path:
    """``root/<class>/<i>.png`` with one random image of each (width, height) listed."""
    rng = np.random.default_rng(0)
    channels = {"RGB": (3,), "L": ()}[mode]
    for name, class_sizes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(class_sizes):
            pixels = rng.integers(0, 256, (h, w, *channels), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i}.png")
    return root


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
        model = tiny_simclr()
        data.views = model.views
        trainer.fit(model, datamodule=data)
    assert "--data.batch_size 20 or less" in str(info.value)
    assert trainer.global_step == 0


def test_each_rank_needs_a_full_batch(tmp_path: Path) -> None:
    data = CIFAR10DataModule(str(cifar_folder(tmp_path)), batch_size=8, num_workers=0)
    data.trainer = SimpleNamespace(world_size=4, lightning_module=None, log_dir=str(tmp_path))
    data.views = tiny_simclr().views
    with pytest.raises(DataError, match=r"batch of 8 per device .* x 4 devices = 32") as info:
        data.setup("fit")
    assert "has 20 images" in str(info.value) and "batch_size 5 or less" in str(info.value)
    data.batch_size = 5  # 4 ranks x 5 images: one full batch each
    data.setup("fit")
    data.batch_size = 32  # only training needs full batches
    data.setup("validate")


# ---------------------------------------------------------- unreadable images


def test_an_unreadable_image_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = tmp_path / "skipped.txt"
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            report_skipped(str(report), "/data/a.jpg", OSError("truncated\nfile"))
        report_skipped(str(report), "/data/b.jpg", ValueError("bad"))
    assert report.read_text().splitlines() == [
        "/data/a.jpg\tOSError: truncated file",
        "/data/b.jpg\tValueError: bad",
    ]
    assert [r.getMessage().split()[3] for r in caplog.records] == ["/data/a.jpg", "/data/b.jpg"]


def test_unreadable_images_are_listed_once_over_epochs_and_workers(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images", {"a": [(16, 16)] * 8, "b": [(16, 16)] * 8})
    bad = sorted(root.rglob("*.png"))[::4]
    for path in bad:
        path.write_bytes(path.read_bytes()[:40])  # truncated
    data = ImageFolderDataModule(
        str(root), str(root), batch_size=4, num_workers=2, image_size=16, pin_memory=False
    )
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=0, default_root_dir=str(tmp_path / "run")
    )
    model = tiny_simclr()
    data.views = model.views
    trainer.fit(model, datamodule=data)
    lines = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(map(str, bad))


# ----------------------------------- images of different sizes held in memory


def test_mixed_image_sizes_name_the_odd_files(tmp_path: Path) -> None:
    for split in ("train", "test"):
        image_folder(tmp_path / split, {"a": [(32, 32)] * 4, "b": [(32, 32), (28, 28), (40, 30)]})
    data = CIFAR10DataModule(str(tmp_path), num_workers=0)
    with pytest.raises(DataError, match=r"5 of 7 are 32x32 px") as info:
        data.arrays("train")
    message = str(info.value)
    assert f"'{tmp_path / 'train' / 'b' / '1.png'}' (28x28)" in message
    assert f"'{tmp_path / 'train' / 'b' / '2.png'}' (40x30)" in message


# ----------------------------------------------- class folders without images


def test_empty_class_folders_are_named(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "some", {"cat": [(16, 16)]})
    (root / "dog").mkdir()
    (root / "emu").mkdir()
    with pytest.raises(DataError, match="2 of the 3 class folders") as info:
        ImageFolderDataModule(str(root), str(root))
    assert str(root / "dog") in str(info.value) and str(root / "emu") in str(info.value)
    assert str(root / "cat") not in str(info.value)
    empty = tmp_path / "empty"
    for name in ("cat", "dog"):
        (empty / name).mkdir(parents=True)
    with pytest.raises(DataError, match=f"none of the 2 class folders of '{empty}'"):
        scan_folder(empty)
    with pytest.raises(MissingDataError, match="nowhere"):
        scan_folder(tmp_path / "nowhere")


# -------------------------------------------- the image size of image folders


def test_small_images_train_and_evaluate_at_their_own_size(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"0": [(28, 28)] * 3, "1": [(28, 28)] * 3}, mode="L")
    data = ImageFolderDataModule(str(root), str(root), num_workers=0)
    assert (data.image_size, data.eval_resize_ratio) == (28, 1.0)
    # the checkpoint's copy of the arguments records the sizes trained at
    assert (data.hparams["image_size"], data.hparams["eval_resize_ratio"]) == (28, 1.0)
    image = data.eval_transform()(Image.open(root / "0" / "0.png").convert("RGB"))
    assert tuple(image.shape) == (3, 28, 28)


def test_large_images_keep_the_imagenet_sizes(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"a": [(300, 256)] * 2, "b": [(256, 320)] * 2})
    data = ImageFolderDataModule(str(root), str(root), num_workers=0)
    assert (data.image_size, data.eval_resize_ratio) == (224, 256 / 224)
    explicit = ImageFolderDataModule(str(root), str(root), image_size=96, eval_resize_ratio=1.5)
    assert (explicit.image_size, explicit.eval_resize_ratio) == (96, 1.5)


def test_upsampling_more_than_twice_warns_with_the_size_to_set(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"0": [(28, 28)] * 2, "1": [(28, 28)] * 2})
    with pytest.warns(UserWarning, match=r"image_size 224 upsamples .* 8\.0x") as warned:
        data = ImageFolderDataModule(str(root), str(root), image_size=224)
    assert data.image_size == 224 and "--data.image_size 28" in str(warned[0].message)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*upsamples")
        ImageFolderDataModule(str(root), str(root), image_size=56)  # 2x: no warning


def test_a_single_class_warns_that_accuracy_means_nothing(tmp_path: Path) -> None:
    root = image_folder(tmp_path, {"only": [(16, 16)] * 2})
    with pytest.warns(UserWarning, match="single class .*meaningless"):
        ImageFolderDataModule(str(root), str(root))


# ------------------------------------------------------------------- archives


def test_a_damaged_archive_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "cifar10.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 20)  # a gzip header, then nothing
    with pytest.raises(DataError, match="cannot unpack .*cifar10.tar.gz.* again"):
        extract_archive(archive, tmp_path / "cache")
