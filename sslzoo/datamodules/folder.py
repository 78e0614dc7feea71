"""Any image folder: labeled (ROOT/<class>/*) or unlabeled, with labeled folders for probing."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sslzoo.datamodules.base import SSLDataModule
from sslzoo.datamodules.images import (
    ImageFiles,
    Transform,
    sample_images,
    scan_folder,
    typical_shorter_side,
)
from sslzoo.errors import ConfigError

DEFAULT_IMAGE_SIZE = 224  # ImageNet's crops, for images at least this large
DEFAULT_EVAL_RESIZE_RATIO = 256 / 224  # ImageNet's evaluation: resize to 256, centre crop 224
MAX_UPSAMPLING = 2  # crops larger than this times the images' size are warned about


def choose_image_size(
    train_dir: str, labeled: bool, image_size: int | None, eval_resize_ratio: float | None
) -> tuple[int, float]:
    """``image_size`` and ``eval_resize_ratio`` for the images of ``train_dir``, judged from the
    typical shorter side of a sample of them.

    ``image_size`` None: that side, at most 224 (small images train and evaluate at their own
    size). ``eval_resize_ratio`` None: 256/224 for images larger than ``image_size``, else 1
    (nothing to crop off). An ``image_size`` upsampling the images more than 2x is kept, with a
    warning: memory and compute grow with its square.
    """
    side = typical_shorter_side(sample_images(train_dir, labeled))
    chosen = image_size is None
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE if side is None else min(side, DEFAULT_IMAGE_SIZE)
    if eval_resize_ratio is None:
        larger = side is None or side > image_size
        eval_resize_ratio = DEFAULT_EVAL_RESIZE_RATIO if larger else 1.0
    if chosen:
        seen = "unreadable" if side is None else f"{side} px on their shorter side"
        rank_zero_info(
            f"image_size {image_size} (evaluation: resize to "
            f"{round(image_size * eval_resize_ratio)}, centre crop {image_size}): the sampled "
            f"training images in {train_dir!r} are {seen}; set --data.image_size to change it"
        )
    elif side is not None and image_size > MAX_UPSAMPLING * side:
        rank_zero_warn(
            f"--data.image_size {image_size} upsamples the training images in {train_dir!r} "
            f"{image_size / side:.1f}x (they are {side} px on their shorter side): memory and "
            f"compute grow with the square of image_size for no added detail. Set "
            f"--data.image_size {side}, or leave it unset to train at the images' own size"
        )
    return image_size, eval_resize_ratio


def warn_if_single_class(val_dir: str, classes: list[str]) -> None:
    """With one class every kNN vote and probe prediction is right: the accuracy says nothing."""
    if len(classes) == 1:
        rank_zero_warn(
            f"{val_dir!r} has a single class ({classes[0]!r}): kNN and linear-probe accuracy "
            "are meaningless (always 1.0); give val_dir at least two class folders"
        )


class ImageFolderDataModule(SSLDataModule):
    """Images decoded from files in the dataloader workers.

    Args:
        train_dir: pretraining images; a labeled ImageFolder, or any folder tree of images when
            ``train_labeled`` is False.
        val_dir: labeled validation images (ROOT/<class>/*), the kNN queries and probe test.
        train_labeled: whether ``train_dir`` has one sub-folder per class. Without labels the
            online probe is skipped and the kNN bank comes from ``bank_dir``.
        bank_dir: labeled images for the kNN bank; defaults to ``train_dir`` when it is labeled.
        image_size: side of the training crops and evaluation images; None: the training images'
            own size, at most 224 (see :func:`choose_image_size`).
        eval_resize_ratio: evaluation images are resized to ``image_size x ratio``, then centre
            cropped; None: 256/224 for images larger than ``image_size``, else 1.
        mean: normalisation mean (ImageNet's by default).
        std: normalisation std.
        device_augment: workers decode each image and cut its views (random resized crop and
            flip, uint8); the method runs the photometric steps on the device with
            :meth:`~sslzoo.augment.recipes.Views.device`.
        compile_augment: with ``device_augment``, run the device steps through
            ``torch.compile``.
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str,
        train_labeled: bool = True,
        bank_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int | None = None,
        eval_resize_ratio: float | None = None,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        pin_memory: bool = True,
        device_augment: bool = False,
        compile_augment: bool = False,
    ) -> None:
        # resolved before the base class saves the arguments: checkpoints record the sizes used
        image_size, eval_resize_ratio = choose_image_size(
            train_dir, train_labeled, image_size, eval_resize_ratio
        )
        super().__init__(batch_size, num_workers, image_size, eval_resize_ratio, pin_memory)
        if bank_dir is None and not train_labeled:
            raise ConfigError("an unlabeled train_dir needs a labeled bank_dir for kNN monitoring")
        train_dir, val_dir = (str(Path(d).expanduser().resolve()) for d in (train_dir, val_dir))
        bank_dir = str(Path(bank_dir).expanduser().resolve()) if bank_dir else None
        # checkpoints keep the data's place, whatever the directory a run is evaluated from
        self.hparams.update(train_dir=train_dir, val_dir=val_dir, bank_dir=bank_dir)
        self.train_dir, self.val_dir, self.bank_dir = train_dir, val_dir, bank_dir or train_dir
        self.train_labeled = train_labeled
        self.mean, self.std = mean, std
        self.device_augment = device_augment
        self.compile_augment = compile_augment
        _, classes = scan_folder(val_dir, labeled=True)
        self.classes = classes
        self.num_classes = len(classes)
        warn_if_single_class(val_dir, classes)

    def build_datasets(self, views: Transform | None, eval_transform: Transform) -> None:
        report = self.report_file
        train, _ = scan_folder(self.train_dir, labeled=self.train_labeled)
        bank, _ = scan_folder(self.bank_dir, labeled=True)
        val, _ = scan_folder(self.val_dir, labeled=True)
        self.train_set = ImageFiles(train, views, report)
        self.bank_set = ImageFiles(bank, eval_transform, report)
        self.val_set = ImageFiles(val, eval_transform, report)
