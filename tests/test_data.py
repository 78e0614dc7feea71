"""Data: corrupt images are skipped and reported, missing data is named, both CIFAR layouts
load, and the digits quickstart set is what it says."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from sslzoo.callbacks.knn import shard_loader
from sslzoo.datamodules import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from sslzoo.datamodules import images as images_module
from sslzoo.datamodules.images import (
    ImageArray,
    ImageFiles,
    NormalizedImages,
    collate_skip_none,
    decode_to_array,
    decode_workers,
)
from sslzoo.methods.simclr import SimCLR
from tests.conftest import TINY_RESNET
from tests.helpers import quiet_trainer


def make_folder(root: Path, per_class: int = 6, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg")
    return root


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])  # a truncated JPEG


def test_corrupt_image_is_skipped_and_reported(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "images")
    bad = folder / "dog" / "3.jpg"
    corrupt(bad)
    report = tmp_path / "skipped.txt"
    samples = [(str(p), 0) for p in sorted(folder.rglob("*.jpg"))]
    dataset = ImageFiles(samples, T.ToTensor(), str(report))
    batch = collate_skip_none([dataset[i] for i in range(len(dataset))])
    assert batch is not None and len(batch[1]) == len(dataset) - 1
    assert str(bad) in report.read_text()


def test_parallel_decoding_keeps_order_and_reports_bad_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert decode_workers(100) == 0 and decode_workers(10**6) <= 16  # none for few images
    folder = make_folder(tmp_path / "images", per_class=7)
    bad = folder / "dog" / "4.jpg"
    corrupt(bad)
    samples = [(str(p), i) for i, p in enumerate(sorted(folder.rglob("*.jpg")))]
    monkeypatch.setattr(images_module, "DECODE_CHUNK", 3)  # 5 chunks over 2 processes
    serial = decode_to_array(samples, str(tmp_path / "serial.txt"), workers=0)
    parallel = decode_to_array(samples, str(tmp_path / "parallel.txt"), workers=2)
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])
    bad_index = next(i for path, i in samples if path == str(bad))
    assert parallel[1].tolist() == [i for _, i in samples if i != bad_index]
    for k, i in enumerate(parallel[1]):
        assert np.array_equal(parallel[0][k], np.asarray(Image.open(samples[i][0]).convert("RGB")))
    for report in ("serial.txt", "parallel.txt"):
        assert (tmp_path / report).read_text().startswith(f"{bad}\t")


def test_training_survives_a_corrupt_image(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "images")
    bad = folder / "cat" / "2.jpg"
    corrupt(bad)
    data = ImageFolderDataModule(
        str(folder), str(folder), batch_size=4, num_workers=0, image_size=16, pin_memory=False
    )
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False)
    data.views = model.views
    trainer = quiet_trainer(max_epochs=1, default_root_dir=str(tmp_path / "run"))
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3  # 12 files in batches of 4; one batch is 3 images short
    lines = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert lines and all(line.startswith(str(bad)) for line in lines)


def test_missing_data_names_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        CIFAR10DataModule(str(missing)).prepare_data()
    assert "ImageFolder layout" in str(info.value) and "download=True" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataModule(str(missing), str(missing))


def test_cifar_image_folder_layout_with_subset(tmp_path: Path) -> None:
    for split in ("train", "test"):
        make_folder(tmp_path / "top" / split, per_class=5, size=32)
    data = CIFAR10DataModule(str(tmp_path), subset_per_class=3, num_workers=0)
    images, labels = data.arrays("train")
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_cifar_eval_images_at_size_skip_pil_and_workers_with_the_same_tensors(
    tmp_path: Path,
) -> None:
    for split in ("train", "test"):
        make_folder(tmp_path / "top" / split, per_class=5, size=32)
    data = CIFAR10DataModule(str(tmp_path), batch_size=4, num_workers=2, pin_memory=False)
    data.build_datasets(None, data.eval_transform())
    assert isinstance(data.val_set, NormalizedImages)
    images, labels = data.arrays("test")
    reference = ImageArray(images, labels, transform=data.eval_transform())
    loader = data.val_dataloader()
    assert loader.num_workers == 0
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    expected = [reference[i] for i in range(len(reference))]
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.stack([x for x, _ in expected]))
    assert torch.cat([y for _, y in batches]).tolist() == [y for _, y in expected]
    # a rank's shard of the kNN bank goes through the same batched fetch
    shard = shard_loader(data.knn_bank_dataloader(), 1, 2)
    bank = ImageArray(*data.arrays("train"), transform=data.eval_transform())
    shard_images = torch.cat([x for x, _ in shard])
    assert torch.equal(shard_images, torch.stack([bank[i][0] for i in range(1, len(bank), 2)]))

    small = CIFAR10DataModule(str(tmp_path), image_size=16, num_workers=2)
    small.build_datasets(None, small.eval_transform())  # resized: the PIL transform, in workers
    assert isinstance(small.val_set, ImageArray) and small.val_dataloader().num_workers == 2


def test_cifar_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's pickled batches; its md5 check is bypassed for these synthetic files."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 255, (4, 3072), dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0, 1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    data = CIFAR10DataModule(str(tmp_path), num_workers=0)
    images, labels = data.arrays("train")
    assert images.shape == (20, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3] * 5
    assert data.arrays("test")[0].shape == (4, 32, 32, 3)


def test_digits_split_and_eval_images() -> None:
    data = DigitsDataModule(image_size=16, num_workers=0)
    data.build_datasets(None, data.eval_transform())
    assert len(data.train_set) + len(data.val_set) == 1797
    assert abs(len(data.val_set) / 1797 - 0.25) < 0.01
    image, label = data.val_set[0]
    assert image.shape == (3, 16, 16) and 0 <= label < 10
    assert torch.allclose(image.mean(), torch.tensor(0.0), atol=1.0)
