"""``sslzoo data pack`` and StreamingDataModule: bad and duplicate files are listed, packed
pixels read back, two gloo ranks share each epoch exactly, a run killed mid-epoch resumes
exactly, and a method trains from shards through the CLI with the kNN monitor."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchvision.transforms as T
import yaml
from PIL import Image

import tests.test_kill_resume as kill_resume
from sslzoo.cli import main
from sslzoo.datamodules.images import read_image
from sslzoo.datamodules.pack import pack_folder, resize_shorter_side
from sslzoo.datamodules.shards import ShardItems, StreamingImages
from sslzoo.errors import ConfigError
from tests.augment_helpers import cifar_folder
from tests.conftest import TINY_HEADS, TINY_RESNET
from tests.helpers import free_port

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i, dtype=np.float64) for i in (a, b))
    return float(10 * np.log10(255**2 / np.mean((x - y) ** 2)))


def pixels_key(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 24 tiny smooth images each (PNG, JPEG, BMP; nested folders; 16-24 px),
    plus a corrupt, a truncated and a zero-byte file and two exact copies."""
    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    formats = (".png", ".jpg", ".bmp")
    for c in ("cat", "dog"):
        for i in range(24):
            folder = root / c / ("nested" if i % 5 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(16, 25)), int(rng.integers(16, 25))
            coarse = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
            image = coarse.resize((w, h), Image.Resampling.BILINEAR)  # smooth, like photos
            image.save(folder / f"{i}{formats[i % 3]}")
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8not a jpeg at all" * 4)
    whole = (root / "dog" / "1.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    shutil.copy(root / "cat" / "2.bmp", root / "dog" / "copy.bmp")  # same pixels, other class
    Image.open(root / "dog" / "3.png").save(root / "dog" / "nested" / "again.png")  # re-encoded
    return root


@pytest.fixture(scope="module")
def packed(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "lossless"
    pack_folder(source, out, workers=1)
    return out


def test_pack_skips_unreadable_and_drops_duplicates(source: Path, packed: Path) -> None:
    skipped = dict(
        line.split("\t", 1) for line in (packed / "skipped_images.txt").read_text().splitlines()
    )
    bad = {str(source / "cat" / "zero.png"), str(source / "cat" / "corrupt.jpg"),
           str(source / "dog" / "truncated.jpg")}  # fmt: skip
    assert set(skipped) == bad
    assert "empty" in skipped[str(source / "cat" / "zero.png")]
    duplicates = (packed / "duplicates.txt").read_text().splitlines()
    assert sorted(duplicates) == sorted(
        [f"{source / 'cat' / '2.bmp'} <- {source / 'dog' / 'copy.bmp'}",
         f"{source / 'dog' / '3.png'} <- {source / 'dog' / 'nested' / 'again.png'}"]
    )  # fmt: skip
    record = json.loads((packed / "pack.json").read_text())
    assert record["classes"] == ["cat", "dog"] and record["labeled"]
    assert record["counts"] == {"found": 53, "packed": 48, "skipped": 3, "duplicates": 2}


def test_a_tree_with_images_at_its_top_packs_unlabeled(source: Path, tmp_path: Path) -> None:
    from sslzoo.datamodules import StreamingDataModule

    # dog/ holds images and a nested folder: no classes. copy.bmp has no twin here; again.png
    # is nested/'s copy of 3.png
    record = pack_folder(source / "dog", tmp_path / "dog", workers=1)
    assert not record["labeled"] and record["classes"] == []
    assert record["counts"] == {"found": 27, "packed": 25, "skipped": 1, "duplicates": 1}
    shards = ShardItems(str(tmp_path / "dog"), transform=None)
    assert {shards[i][1] for i in range(len(shards))} == {-1}
    with pytest.raises(ConfigError, match="bank_dir is needed"):
        StreamingDataModule(str(tmp_path / "dog"), val_dir=str(source))


def test_packed_images_read_back_exactly(source: Path, packed: Path) -> None:
    shards = ShardItems(str(packed), transform=None)
    assert len(shards) == 48
    for index in range(len(shards)):
        sample = shards.shards[index]
        assert sample["id"] == index
        image, label = shards[index]
        path = source / sample["path"]
        assert label == ["cat", "dog"].index(sample["path"].split("/")[0])
        assert np.array_equal(np.asarray(image), np.asarray(read_image(path))), path


def test_resized_pack_is_within_jpeg_tolerance(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "small"
    main(["data", "pack", str(source), "--out", str(out), "--size", "16", "--quality", "90",
          "--workers", "2"])  # fmt: skip
    assert "packed 48 of 53 images" in capsys.readouterr().out
    shards = ShardItems(str(out), transform=None)
    for index in range(0, len(shards), 5):
        image, _ = shards[index]
        expected = resize_shorter_side(read_image(source / shards.shards[index]["path"]), 16)
        assert image.size == expected.size and min(image.size) == 16
        assert psnr(image, expected) > 30, index  # quality 90, 16 px: 31.5-36 dB
        other = shards[index + 1][0].resize(image.size)
        assert psnr(image, other) < 20, "the bound tells images apart"


def test_pack_refuses_a_folder_that_is_not_empty(
    source: Path, packed: Path, capsys: pytest.CaptureFixture
) -> None:
    before = sorted(p.name for p in packed.iterdir())
    with pytest.raises(ConfigError, match="already holds a finished pack"):
        pack_folder(source, packed)
    with pytest.raises(SystemExit):
        main(["data", "pack", str(source), "--out", str(packed)])
    assert "would mix two packs" in capsys.readouterr().err
    assert sorted(p.name for p in packed.iterdir()) == before


def test_a_corrupt_sample_in_the_shards_is_skipped_and_reported(tmp_path: Path) -> None:
    from litdata import StreamingDataLoader
    from litdata.streaming.writer import BinaryWriter

    from sslzoo.datamodules.images import collate_skip_none

    writer = BinaryWriter(str(tmp_path / "shards"), chunk_bytes="1MB")
    for i in range(8):
        image = io.BytesIO()
        Image.new("RGB", (8, 8), (i, 0, 0)).save(image, format="PNG")
        data = b"\x89PNG broken" if i == 3 else image.getvalue()
        writer.add_item(i, {"image": data, "label": i, "id": i, "path": f"{i}.png"})
    writer.done()
    writer.merge()
    report = tmp_path / "skipped_images.txt"
    dataset = StreamingImages(str(tmp_path / "shards"), T.PILToTensor(), str(report))
    loader = StreamingDataLoader(dataset, batch_size=4, collate_fn=collate_skip_none)
    labels = sorted(label for _, batch in loader for label in batch.tolist())
    assert labels == [0, 1, 2, 4, 5, 6, 7]
    assert report.read_text().startswith(f"{tmp_path / 'shards'}#3 (3.png)\tUnidentifiedImageError")


def read_ids(rank: int, packed: str, keys: dict[str, int], out: str) -> None:
    """One gloo rank: the sample ids its StreamingDataModule-style loader yields, 2 epochs."""
    from litdata import StreamingDataLoader

    from sslzoo.datamodules.images import collate_skip_none

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    to_key = T.Lambda(pixels_key)
    dataset = StreamingImages(packed, to_key, seed=0)
    loader = StreamingDataLoader(dataset, batch_size=4, num_workers=1, drop_last=True,
                                 collate_fn=collate_skip_none)  # fmt: skip
    epochs = [[keys[k] for batch, _ in loader for k in batch] for _ in range(2)]
    Path(out, f"{rank}.json").write_text(json.dumps(epochs))
    torch.distributed.destroy_process_group()


def test_two_ranks_read_disjoint_shares_covering_each_epoch(
    packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = ShardItems(str(packed), transform=None)
    keys = {pixels_key(shards[i][0]): shards.shards[i]["id"] for i in range(len(shards))}
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # for these ranks only, not left behind
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    mp.start_processes(read_ids, args=(str(packed), keys, str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first) == len(second) == 24  # 48 images: 6 batches of 4 per rank
        assert sorted(first + second) == list(range(48)), "each image once per epoch"
    assert ranks[0][0] != ranks[0][1], "each epoch is shuffled anew"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_loader_yields_the_remaining_samples(packed: Path, workers: int) -> None:
    # the loader's state after 5 of 12 batches of epoch 2, loaded into a new loader, gives
    # the 7 batches the uninterrupted loader went on with, then the same epoch 3
    from litdata import StreamingDataLoader

    from sslzoo.datamodules.images import collate_skip_none

    shards = ShardItems(str(packed), transform=None)
    keys = {pixels_key(shards[i][0]): shards.shards[i]["id"] for i in range(len(shards))}

    def loader() -> StreamingDataLoader:
        dataset = StreamingImages(str(packed), T.Lambda(pixels_key), seed=0)
        return StreamingDataLoader(dataset, batch_size=4, num_workers=workers,
                                   collate_fn=collate_skip_none, drop_last=True)  # fmt: skip

    def ids(batches: Any) -> list[int]:
        return [keys[k] for batch, _ in batches for k in batch]

    run = loader()
    ids(run)  # epoch 1
    epoch = iter(run)
    seen = ids(next(epoch) for _ in range(5))
    state = run.state_dict()
    rest, after = ids(epoch), ids(run)
    assert sorted(seen + rest) == list(range(48))
    restored = loader()
    restored.load_state_dict(state)
    assert ids(restored) == rest and ids(restored) == after


class RecordKNN(L.Callback):
    """Test-only: append the kNN accuracy to ``path`` after each validation."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with open(self.path, "a") as f:
            f.write(f"{float(trainer.callback_metrics['knn/val_top1'])}\n")


def with_knn(path: Path, root: Path, *setup: Any, **kill: Any) -> Path:
    """test_kill_resume's config, validated at the end of epoch 2 with the kNN monitor, whose
    accuracy :class:`RecordKNN` appends to ``<root>.knn``."""
    kill_resume.write_config(path, root, *setup, **kill)
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(limit_val_batches=1.0, check_val_every_n_epoch=2)
    config["trainer"]["callbacks"] += [
        {"class_path": "sslzoo.callbacks.KNNMonitor", "init_args": {"k": 5}},
        {"class_path": "tests.test_streaming.RecordKNN",
         "init_args": {"path": str(root) + ".knn"}},
    ]  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def test_simclr_from_shards_killed_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    # SimCLR through the CLI on 112 packed images (7 batches of 16), no worker processes; the
    # kNN bank is the training pack, the queries an image folder. The killed run is a child
    # process (SIGKILL after step 11, last.ckpt of step 9); the uninterrupted run and the
    # resume run in this process, on one thread as the child, while the child starts
    images = cifar_folder(tmp_path / "images", per_class=56)
    pack_folder(images / "train", tmp_path / "shards")
    data = {
        "class_path": "sslzoo.datamodules.StreamingDataModule",
        "init_args": {"input_dir": str(tmp_path / "shards"), "val_dir": str(images / "test"),
                      "image_size": 16, "eval_resize_ratio": 1.0, "pin_memory": False},
    }  # fmt: skip
    simclr = {
        "class_path": "sslzoo.methods.SimCLR",
        "init_args": {**TINY_RESNET, **TINY_HEADS["SimCLR"], "sync_batchnorm": False},
    }
    setup = (simclr, 0, data)
    killed_root, record = tmp_path / "killed", tmp_path / "resumed_from.txt"
    killed = kill_resume.start(
        with_knn(tmp_path / "killed.yaml", killed_root, *setup, kill_at_step=11),
        tmp_path / "killed.log",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["fit", "--config", str(with_knn(tmp_path / "full.yaml", tmp_path / "full", *setup))])
        assert kill_resume.finish(killed, tmp_path / "killed.log") == -signal.SIGKILL
        last = killed_root / "version_0" / "checkpoints" / "last.ckpt"
        left = kill_resume.load(last)
        resume = with_knn(tmp_path / "resume.yaml", killed_root, *setup, record=str(record))
        main(["fit", "--config", str(resume), "--ckpt_path", "last"])
    finally:
        torch.set_num_threads(threads)
    assert left["global_step"] == 9 and int(record.read_text()) == 9
    loader = left["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["current_epoch"] == 2 and loader["num_samples_yielded"] == 2 * 16
    full = kill_resume.load(tmp_path / "full" / "version_0" / "checkpoints" / "last.ckpt")
    resumed = kill_resume.load(last)
    assert full["global_step"] == resumed["global_step"] == kill_resume.STEPS
    kill_resume.assert_same_training_state(full, resumed)
    knn = [float(x) for x in (tmp_path / "full.knn").read_text().split()]
    assert len(knn) == 1 and 0.0 <= knn[0] <= 1.0
    assert (tmp_path / "killed.knn").read_text() == (tmp_path / "full.knn").read_text()


@pytest.mark.parametrize("device_augment", [False, True])
def test_views_from_shards_are_the_recipes_and_seeded_per_sample(
    packed: Path, device_augment: bool
) -> None:
    # PIL views, or worker crops with the colour steps on the device as ImageFolderDataModule;
    # each sample's augmentation depends on (seed, epoch, sample) only, not on the worker
    from sslzoo.datamodules import StreamingDataModule
    from sslzoo.methods.simclr import VIEWS

    def first_batch(workers: int) -> Any:
        dm = StreamingDataModule(str(packed), str(packed), batch_size=8, num_workers=workers,
                                 image_size=16, pin_memory=False,
                                 device_augment=device_augment)  # fmt: skip
        dm.views = VIEWS
        dm.setup("fit")
        return next(iter(dm.train_dataloader())), dm

    (views, labels), dm = first_batch(0)
    (again, labels_again), _ = first_batch(1)
    assert torch.equal(labels, labels_again) and set(labels.tolist()) <= {0, 1}
    assert len(views) == 2 and all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    expected = torch.uint8 if device_augment else torch.float32
    assert [(v.dtype, tuple(v.shape)) for v in views] == [(expected, (8, 3, 16, 16))] * 2
    if device_augment:
        views, _ = dm.on_after_batch_transfer((views, labels), 0)
        assert [(v.dtype, tuple(v.shape)) for v in views] == [(torch.float32, (8, 3, 16, 16))] * 2
    assert not torch.equal(views[0], views[1]), "two different views"
