"""CIFAR-10 and CIFAR-100 from torchvision's files, an ImageFolder copy, or its .tar.gz."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sslzoo.datamodules.base import SSLDataModule
from sslzoo.datamodules.device_batches import DeviceBatches, UInt8Images
from sslzoo.datamodules.images import (
    ImageArray,
    NormalizedImages,
    Transform,
    decode_to_array,
    extract_archive,
    scan_folder,
    stratified_subset,
)
from sslzoo.errors import MissingDataError

HOW_TO_GET = (
    "Point --data.root at a folder holding torchvision's '{tv}' files (e.g. from "
    "torchvision.datasets.{cls}(root, download=True) on a machine with internet), at a folder "
    "in the ImageFolder layout ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg, or at a "
    ".tar.gz of that folder."
)


class CIFAR10DataModule(SSLDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test images of 32x32 pixels.

    Images are decoded once and kept in memory as one uint8 array. With ``device_augment`` the
    training images are copied once to the training device and each batch is cut there as
    uint8 images; the method makes its views on the device (no worker processes, no PIL). The
    kNN bank and validation images keep the usual evaluation transform.

    Args:
        root: torchvision CIFAR folder, an ImageFolder copy with ``train/`` and ``test/``, or a
            ``.tar.gz`` of that copy (unpacked once into ``~/.cache/sslzoo``).
        subset_per_class: keep at most this many images per class in each split (quick runs).
        subset_seed: seed of that choice.
        device_augment: cut training batches on the device and augment them there with the
            recipe's device views (:meth:`~sslzoo.augment.recipes.Views.device`).
        compile_augment: with ``device_augment``, run the views through ``torch.compile``
            (fuses their elementwise steps; compiling takes a while once per run).
    """

    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    torchvision_dir = "cifar-10-batches-py"
    torchvision_class = "CIFAR10"

    def __init__(
        self,
        root: str,
        batch_size: int = 512,
        num_workers: int = 8,
        image_size: int = 32,
        subset_per_class: int | None = None,
        subset_seed: int = 0,
        pin_memory: bool = True,
        device_augment: bool = False,
        compile_augment: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, image_size, 1.0, pin_memory)
        self.root = str(Path(root).expanduser().resolve())
        self.hparams["root"] = self.root  # checkpoints keep the data's place, whatever the cwd
        self.subset_per_class = subset_per_class
        self.subset_seed = subset_seed
        self.device_augment = device_augment
        self.compile_augment = compile_augment
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _missing(self, path: Path) -> MissingDataError:
        how = HOW_TO_GET.format(tv=self.torchvision_dir, cls=self.torchvision_class)
        return MissingDataError(f"no {self.torchvision_class} data at {str(path)!r}. {how}")

    def _unpacked_root(self) -> Path:
        """``root``, unpacked first if it is an archive."""
        root = Path(self.root).expanduser()
        if not root.exists():
            raise self._missing(root)
        return extract_archive(root) if root.is_file() and ".tar" in root.name else root

    def image_folder(self) -> Path:
        """The folder holding ``train/`` and ``test/`` of an ImageFolder copy."""
        root = self._unpacked_root()
        folder = next((d for d in [root, *sorted(root.glob("*/"))] if (d / "train").is_dir()), None)
        if folder is None:
            raise self._missing(root)
        return folder

    def _load_split(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        root = self._unpacked_root()
        if (root / self.torchvision_dir).is_dir() or root.name == self.torchvision_dir:
            import torchvision

            tv_root = root.parent if root.name == self.torchvision_dir else root
            ds = getattr(torchvision.datasets, self.torchvision_class)(
                str(tv_root), train=train, download=False
            )
            samples = list(enumerate(ds.targets))
            if self.subset_per_class:
                samples = stratified_subset(samples, self.subset_per_class, self.subset_seed)
            idx = [i for i, _ in samples]
            return ds.data[idx], np.asarray(ds.targets, dtype=np.int64)[idx]
        split = self.image_folder() / ("train" if train else "test")
        if not split.is_dir():
            raise self._missing(split)
        samples, _ = scan_folder(split, labeled=True)
        if self.subset_per_class:
            samples = stratified_subset(samples, self.subset_per_class, self.subset_seed)
        return decode_to_array(samples, self.report_file)

    def prepare_data(self) -> None:
        """Fail early, before any model work, if the data is not there."""
        root = Path(self.root).expanduser()
        if not root.exists():
            raise self._missing(root)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (images, labels) of ``train`` or ``test``, cached after the first call."""
        if split not in self._arrays:
            self._arrays[split] = self._load_split(train=split == "train")
        return self._arrays[split]

    def _eval_is_normalize_only(self, images: np.ndarray) -> bool:
        """Whether the evaluation transform leaves these images' size as it is (the default
        transform with images already at ``image_size`` and no resize margin)."""
        at_size = images.shape[1:3] == (self.image_size, self.image_size)
        no_margin = round(self.image_size * self.eval_resize_ratio) == self.image_size
        default = type(self).eval_transform is SSLDataModule.eval_transform
        return at_size and no_margin and default

    def build_datasets(self, views: Transform | None, eval_transform: Transform) -> None:
        train, test = self.arrays("train"), self.arrays("test")
        if self.device_augment:  # whole images go to the device, cropped there too
            self.train_set = UInt8Images(*train)
        else:
            self.train_set = ImageArray(*train, transform=views)
        if self._eval_is_normalize_only(train[0]):  # whole batches at once, no workers
            self.bank_set = NormalizedImages(*train, self.mean, self.std)
            self.val_set = NormalizedImages(*test, self.mean, self.std)
        else:
            self.bank_set = ImageArray(*train, transform=eval_transform)
            self.val_set = ImageArray(*test, transform=eval_transform)

    def labeled_splits(
        self, train_transform: Transform, test_transform: Transform
    ) -> tuple[ImageArray, ImageArray]:
        return (
            ImageArray(*self.arrays("train"), transform=train_transform),
            ImageArray(*self.arrays("test"), transform=test_transform),
        )

    def _loader(self, dataset: Any, train: bool, num_workers: int | None = None) -> Any:
        if isinstance(dataset, NormalizedImages):
            num_workers = 0  # a batch is one indexing and one vectorised conversion
        return super()._loader(dataset, train, num_workers)

    def train_dataloader(self) -> Any:
        """With ``device_augment``: :class:`DeviceBatches` of uint8 images on the device."""
        if not self.device_augment:
            return super().train_dataloader()
        if self.train_set is None:
            raise RuntimeError("setup() has not built the training set")
        return DeviceBatches(self.train_set, self.batch_size, self)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: as CIFAR-10 with 100 classes."""

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    torchvision_dir = "cifar-100-python"
    torchvision_class = "CIFAR100"
