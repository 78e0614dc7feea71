"""Any image folder: labeled (ROOT/<class>/*) or unlabeled, with labeled folders for probing."""

from __future__ import annotations

from pathlib import Path

from sslzoo.datamodules.base import SSLDataModule
from sslzoo.datamodules.images import ImageFiles, Transform, scan_folder


class ImageFolderDataModule(SSLDataModule):
    """Images decoded from files in the dataloader workers.

    Args:
        train_dir: pretraining images; a labeled ImageFolder, or any folder tree of images when
            ``train_labeled`` is False.
        val_dir: labeled validation images (ROOT/<class>/*), the kNN queries and probe test.
        train_labeled: whether ``train_dir`` has one sub-folder per class. Without labels the
            online probe is skipped and the kNN bank comes from ``bank_dir``.
        bank_dir: labeled images for the kNN bank; defaults to ``train_dir`` when it is labeled.
        mean: normalisation mean (ImageNet's by default).
        std: normalisation std.
        device_augment: workers decode each image and cut its views (random resized crop and
            flip, uint8); the method runs the photometric steps on the device with
            :meth:`~sslzoo.methods.base.SSLMethod.device_view_transform`.
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
        image_size: int = 224,
        eval_resize_ratio: float = 256 / 224,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        pin_memory: bool = True,
        device_augment: bool = False,
        compile_augment: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, image_size, eval_resize_ratio, pin_memory)
        if bank_dir is None and not train_labeled:
            raise ValueError("an unlabeled train_dir needs a labeled bank_dir for kNN monitoring")
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

    def build_datasets(self, views: Transform | None, eval_transform: Transform) -> None:
        report = self.report_file
        train, _ = scan_folder(self.train_dir, labeled=self.train_labeled)
        bank, _ = scan_folder(self.bank_dir, labeled=True)
        val, _ = scan_folder(self.val_dir, labeled=True)
        self.train_set = ImageFiles(train, views, report)
        self.bank_set = ImageFiles(bank, eval_transform, report)
        self.val_set = ImageFiles(val, eval_transform, report)
