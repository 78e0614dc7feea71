"""The datamodule contract: multi-view training images, labeled images for the kNN bank, and
labeled validation images. The views are built from a view recipe
(:mod:`sslzoo.augment.recipes`), the model's own: ``sslzoo fit`` hands it over; in Python,
``datamodule.views = model.views``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslzoo.augment.on_device import compile_views, seed_device_augmentation
from sslzoo.augment.recipes import Views
from sslzoo.datamodules.epoch_loader import EpochSeededLoader
from sslzoo.datamodules.images import Transform, collate_skip_none
from sslzoo.errors import ConfigError, DataError
from sslzoo.seeding import global_seed


class SSLDataModule(L.LightningDataModule):
    """Base class of every datamodule.

    Subclasses implement :meth:`build_datasets` (called in ``setup`` with the view and eval
    transforms) and set ``num_classes``, ``mean`` and ``std``.

    Args:
        batch_size: images per device and step.
        num_workers: dataloader worker processes.
        image_size: side of the training crops and evaluation images.
        eval_resize_ratio: evaluation images are resized to ``image_size x ratio`` then centre
            cropped (256/224 for ImageNet-like data, 1 for images already at size).
        pin_memory: pin host memory for faster host-to-device copies.
    """

    num_classes: int = 0
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 4,
        image_size: int = 224,
        eval_resize_ratio: float = 256 / 224,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.eval_resize_ratio = eval_resize_ratio
        self.pin_memory = pin_memory
        self.views: Views | None = None  # the model's recipe (see the module's docstring)
        self._device_views: tuple[torch.device, nn.Module] | None = None
        self.train_set: Dataset | None = None
        self.bank_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def eval_transform(self) -> Transform:
        """No augmentation: resize, centre crop, normalise."""
        resize = round(self.image_size * self.eval_resize_ratio)
        return T.Compose(
            [
                T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    @property
    def report_file(self) -> str | None:
        """Where unreadable images are listed: ``skipped_images.txt`` in the run's log dir."""
        if self.trainer is None:
            return None
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        return str(Path(log_dir) / "skipped_images.txt")

    def build_datasets(self, views: Transform | None, eval_transform: Transform) -> None:
        """Create ``train_set`` (views), ``bank_set`` and ``val_set`` (eval transform)."""
        raise NotImplementedError

    def labeled_splits(
        self, train_transform: Transform, test_transform: Transform
    ) -> tuple[Dataset, Dataset]:
        """The labeled training images (those of the kNN bank) and the validation (test)
        images, each with its own transform: what fine-tuning and robustness evaluation read.
        ``(image, label)`` items in a fixed order, the same on every call."""
        self.build_datasets(None, train_transform)
        train = self.bank_set
        self.build_datasets(None, test_transform)
        return train, self.val_set

    device_augment: bool = False  # subclasses that support it take it as an argument
    compile_augment: bool = False

    def train_transform(self) -> Transform:
        """The per-image training transform: the recipe's PIL views, or with
        ``device_augment`` only their crops and flips (uint8, see
        :class:`~sslzoo.augment.CropViews`), whose photometric steps then run on the device
        (:meth:`on_after_batch_transfer`)."""
        if self.views is None:
            raise ConfigError(
                f"{type(self).__name__} has no view recipe to train with: set "
                "datamodule.views = model.views (sslzoo fit does it)"
            )
        if not self.device_augment:
            return self.views.pil(self.image_size, tuple(self.mean), tuple(self.std))
        return self.views.worker_crops(self.image_size, tuple(self.mean), tuple(self.std))

    def device_views(self, device: torch.device) -> nn.Module:
        """The recipe's device views on ``device`` (built once per device, compiled with
        ``compile_augment``)."""
        if self._device_views is None or self._device_views[0] != device:
            views = self.views.device(self.image_size, tuple(self.mean), tuple(self.std))
            views = views.to(device)
            if self.compile_augment:
                views = compile_views(views)
            self._device_views = (device, views)
        return self._device_views[1]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A training batch of uint8 images, or of uint8 views already cropped in the workers,
        becomes ``(views, labels)`` here, on its device, each image drawing its own
        augmentation; evaluation batches pass unchanged."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return batch
        images, labels = batch
        first = images[0] if isinstance(images, (tuple, list)) and images else images
        if not (isinstance(first, torch.Tensor) and first.dtype == torch.uint8):
            return batch
        if self.trainer is not None and self.trainer.training:
            seed_device_augmentation(self.trainer, first.device)
        return self.device_views(first.device)(images), labels

    def setup(self, stage: str) -> None:
        views = self.train_transform() if stage == "fit" else None
        self.build_datasets(views, self.eval_transform())
        if stage == "fit":
            self.check_full_batch()

    def check_full_batch(self) -> None:
        """Raise unless each device (rank) gets at least one full training batch: every
        training loader drops an epoch's last incomplete batch, so with fewer images nothing
        would train."""
        world = self.trainer.world_size if self.trainer is not None else 1
        images, batch = len(self.train_set), self.batch_size
        if images >= batch * world:
            return
        asked = f"one batch of {batch} (--data.batch_size)"
        if world > 1:
            asked = (
                f"one batch of {batch} per device (--data.batch_size) x {world} devices "
                f"= {batch * world}"
            )
        fix = "train on more images"
        if images >= world:
            fix = f"set --data.batch_size {images // world} or less, or {fix}"
        raise DataError(
            f"the training set has {images} images, fewer than {asked}; each device trains "
            f"on full batches only, so nothing would train: {fix}"
        )

    def _loader(self, dataset: Dataset, train: bool, num_workers: int | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers if num_workers is None else num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_skip_none,
            persistent_workers=False,
        )

    def training_epoch(self) -> int:
        """Index of the training epoch being (or about to be) trained."""
        if self.trainer is None:
            return 0
        # the count Lightning gives samplers' set_epoch, read at the epoch's first batch: by
        # then it is final, also right after a resume from any checkpoint
        return self.trainer.fit_loop.epoch_progress.current.processed

    def epoch_seed(self, epoch: int) -> int:
        """Seed of a training epoch: a function of (global seed, epoch, rank)."""
        seed = global_seed()
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return (seed * 1_000_003 + epoch * 1009 + rank) % 2**32

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("setup() has not built the training set (no method attached?)")
        return EpochSeededLoader(
            self.train_set,
            current_epoch=self.training_epoch,
            epoch_seed=self.epoch_seed,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_skip_none,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def knn_bank_dataloader(self) -> DataLoader:
        """Labeled training images without augmentation: the kNN feature bank."""
        return self._loader(self.bank_set, train=False)
