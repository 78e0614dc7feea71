"""Training from litdata shards (written by ``sslzoo data pack``), local or on object storage.

Each rank streams its own share of the shards; the loader's position is saved in every
checkpoint, so a run killed mid-epoch resumes with the samples an uninterrupted run would
have seen next."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from sslzoo.datamodules.base import SSLDataModule
from sslzoo.datamodules.folder import (
    DEFAULT_EVAL_RESIZE_RATIO,
    DEFAULT_IMAGE_SIZE,
    warn_if_single_class,
)
from sslzoo.datamodules.images import (
    ImageFiles,
    Transform,
    collate_skip_none,
    scan_folder,
)
from sslzoo.datamodules.pack import read_pack_record
from sslzoo.errors import ConfigError, DataError, MissingDataError
from sslzoo.seeding import global_seed


def absolute(where: str) -> str:
    """A local path made absolute; a URL unchanged."""
    return where if "://" in where else str(Path(where).expanduser().resolve())


def is_shard_set(where: str) -> bool:
    """A URL (``s3://``, ``gs://``, ``azure://``, ...) or a local folder with ``index.json``."""
    return "://" in where or (Path(where).expanduser() / "index.json").exists()


class StreamingDataModule(SSLDataModule):
    """Images streamed from litdata shards written by ``sslzoo data pack``.

    ``input_dir`` is a local folder or a URL litdata reads (``s3://bucket/prefix``,
    ``gs://...``, ``azure://...``); remote shards are downloaded chunk by chunk into
    ``cache_dir``. The kNN bank and validation images are a labeled pack or a labeled image
    folder (ROOT/<class>/*).

    Under DDP or FSDP every rank streams its own shards (litdata reads the rank and world size
    from ``torch.distributed``) and each image is seen once per epoch over all ranks, except
    fewer than ``world size x (batch size + 1)`` at the epoch's end: with more than one rank
    litdata drops the images that would give the ranks unequal shares, and each rank drops its
    last incomplete batch (different images each epoch, since the order is reshuffled).

    The loader's position (epoch and samples read) is saved in every checkpoint;
    ``--ckpt_path`` resumes it mid-epoch with the same world size, ``num_workers`` and
    ``batch_size``.

    Args:
        input_dir: the training pack (folder or URL).
        val_dir: labeled validation images (pack or image folder).
        bank_dir: labeled images for the kNN bank (pack or image folder); defaults to
            ``input_dir`` when it is labeled.
        image_size: side of the training crops and evaluation images; None: the pack's typical
            shorter side (``pack.json``) at most 224, or 224 for remote packs.
        eval_resize_ratio: evaluation images are resized to ``image_size x ratio``, then centre
            cropped; None: 256/224 when the images are larger than ``image_size``, else 1.
        num_classes: classes of the labeled sets; None: read from a local pack's ``pack.json``
            or the image folder (needed for remote packs only).
        cache_dir: where chunks of remote packs are kept (litdata's default cache if None).
        storage_options: passed to litdata for remote packs (e.g. an S3 ``endpoint_url``);
            credentials come from the usual environment variables or files of each cloud.
        mean, std: normalisation (ImageNet's by default).
        device_augment, compile_augment: as for
            :class:`~sslzoo.datamodules.ImageFolderDataModule`: workers decode and crop
            (uint8), the photometric steps run on the device.
    """

    def __init__(
        self,
        input_dir: str,
        val_dir: str,
        bank_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int | None = None,
        eval_resize_ratio: float | None = None,
        num_classes: int | None = None,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        pin_memory: bool = True,
        device_augment: bool = False,
        compile_augment: bool = False,
    ) -> None:
        record = read_pack_record(input_dir)
        if record is None and not is_shard_set(input_dir):
            raise MissingDataError(
                f"--data.input_dir {input_dir!r} is not a pack (no index.json): write one with "
                "`sslzoo data pack SRC --out DIR`"
            )
        side = record["shorter_side_median"] if record else None
        if image_size is None:
            image_size = min(side, DEFAULT_IMAGE_SIZE) if side else DEFAULT_IMAGE_SIZE
        if eval_resize_ratio is None:
            larger = side is None or side > image_size
            eval_resize_ratio = DEFAULT_EVAL_RESIZE_RATIO if larger else 1.0
        super().__init__(batch_size, num_workers, image_size, eval_resize_ratio, pin_memory)
        train_labeled = bool(record and record["labeled"])
        if bank_dir is None and not train_labeled:
            raise ConfigError(
                "--data.bank_dir is needed (labeled images for the kNN bank): "
                f"{input_dir!r} is {'unlabeled' if record else 'a remote pack'}"
            )
        input_dir, val_dir = absolute(input_dir), absolute(val_dir)
        bank_dir = absolute(bank_dir) if bank_dir else None
        # checkpoints keep the data's place, whatever the directory a run is evaluated from
        self.hparams.update(input_dir=input_dir, val_dir=val_dir, bank_dir=bank_dir)
        self.input_dir, self.val_dir = input_dir, val_dir
        self.bank_dir = bank_dir or input_dir
        self.cache_dir = cache_dir
        self.storage_options = storage_options
        self.mean, self.std = mean, std
        self.device_augment = device_augment
        self.compile_augment = compile_augment
        classes = labeled_classes(val_dir)
        if classes is not None:
            warn_if_single_class(val_dir, classes)
            num_classes = num_classes or len(classes)
        if not num_classes:
            raise ConfigError(
                f"--data.num_classes is needed: the classes of {val_dir!r} (a remote pack) "
                "cannot be read before training"
            )
        self.num_classes = num_classes

    def labeled_set(self, where: str, transform: Transform) -> Dataset:
        from sslzoo.datamodules.shards import ShardItems

        if is_shard_set(where):
            return ShardItems(
                where, transform, self.report_file, self.cache_dir, self.storage_options
            )
        samples, _ = scan_folder(where, labeled=True)
        return ImageFiles(samples, transform, self.report_file)

    def build_datasets(self, views: Transform | None, eval_transform: Transform) -> None:
        from sslzoo.datamodules.shards import StreamingImages

        self.train_set = StreamingImages(
            self.input_dir,
            views,
            self.report_file,
            self.cache_dir,
            seed=global_seed(),
            storage_options=self.storage_options,
        )
        self.bank_set = self.labeled_set(self.bank_dir, eval_transform)
        self.val_set = self.labeled_set(self.val_dir, eval_transform)

    def check_full_batch(self) -> None:
        """Raise unless this rank streams at least one full batch per epoch."""
        images = self.train_set.get_len(self.num_workers, self.batch_size)
        if images < self.batch_size:
            raise DataError(
                f"each device streams {images} images of {self.input_dir!r} per epoch, fewer "
                f"than one batch of {self.batch_size} (--data.batch_size): nothing would train; "
                "lower --data.batch_size or pack more images"
            )

    def train_dataloader(self) -> DataLoader:
        from litdata import StreamingDataLoader

        if self.train_set is None:
            raise RuntimeError("setup() has not built the training set (no method attached?)")
        # litdata gives each worker its own share, so the length Lightning warns about is right
        warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
        return StreamingDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_skip_none,
            drop_last=True,
        )


def labeled_classes(where: str) -> list[str] | None:
    """Class names of a labeled local pack or image folder; None for a remote pack."""
    if is_shard_set(where):
        record = read_pack_record(where)
        if record is not None and not record["labeled"]:
            raise DataError(
                f"{where!r} is an unlabeled pack; the kNN bank and validation need labels"
            )
        return record["classes"] if record else None
    return scan_folder(where, labeled=True)[1]
