"""Training batches of in-memory uint8 images cut on the training device: no worker processes,
no PIL. The method turns each uint8 batch into its views on the device
(:meth:`sslzoo.datamodules.base.SSLDataModule.on_after_batch_transfer`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sslzoo.datamodules.epoch_loader import ResumePoint
from sslzoo.datamodules.images import check_uint8_images
from sslzoo.seeding import global_seed


class UInt8Images(Dataset):
    """Images held as one uint8 tensor (N, 3, H, W); items are ``(image, label)`` with the image
    a uint8 CHW tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        check_uint8_images(images)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class DeviceBatches:
    """Shuffled training batches ``(uint8 images (B, 3, H, W), labels (B,))`` on the device.

    The images are copied to the training device once; an epoch is one random permutation
    (seeded by the global seed and the epoch, the same on every rank) of which rank r takes
    every world-size-th index, cut into full batches with ``index_select`` on the device.
    ``state_dict``/``load_state_dict`` resume mid-epoch at the next batch. (The method seeds
    the augmentation of each batch itself: see ``SSLDataModule.on_after_batch_transfer``.)

    Args:
        dataset: the training images.
        batch_size: images per batch and device; the last incomplete batch is dropped.
        datamodule: gives the trainer (device, rank, world size) and the training epoch.
    """

    def __init__(self, dataset: UInt8Images, batch_size: int, datamodule: Any) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.datamodule = datamodule
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None
        self.resume_point = ResumePoint()

    def _context(self) -> tuple[torch.device, int, int]:
        trainer = self.datamodule.trainer
        if trainer is None:
            return torch.device("cpu"), 0, 1
        return trainer.strategy.root_device, trainer.global_rank, trainer.world_size

    def __len__(self) -> int:
        _, _, world = self._context()
        return len(self.dataset) // world // self.batch_size

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._on_device is None or self._on_device[0].device != device:
            ds = self.dataset
            self._on_device = (ds.images.to(device), ds.labels.to(device))
        return self._on_device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device, rank, world = self._context()
        images, labels = self._tensors(device)
        epoch = self.datamodule.training_epoch()
        shuffle_seed = (global_seed() * 1_000_003 + epoch) % 2**63
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(shuffle_seed))
        per_rank = len(images) // world
        order = order[rank : per_rank * world : world].to(device)
        for b in range(self.resume_point.start(epoch), len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            self.resume_point.advance()
            yield images.index_select(0, index), labels.index_select(0, index)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": consumed}`` of the current epoch."""
        return self.resume_point.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the next epoch at ``state_dict``'s batch if it is the same epoch."""
        self.resume_point.load_state_dict(state_dict)
