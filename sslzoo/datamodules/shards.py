"""The packed images as datasets: streamed in shuffled shares for training
(:class:`StreamingImages`) or read by index for the kNN bank and validation
(:class:`ShardItems`). Samples are those ``sslzoo data pack`` writes."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from sslzoo.datamodules.epoch_loader import item_seed, seed_host_generators
from sslzoo.datamodules.images import Transform, report_skipped
from sslzoo.seeding import derive_seed


def decode_sample(
    sample: dict[str, Any], transform: Transform | None, where: str, report_file: str | None
) -> tuple[Any, int] | None:
    """``(transform(image), label)`` of a packed sample; None (reported) if it cannot be
    decoded."""
    try:
        with Image.open(io.BytesIO(bytes(sample["image"]))) as img:
            img.load()
            image = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        report_skipped(report_file, f"{where}#{sample['id']} ({sample['path']})", error)
        return None
    return (transform(image) if transform else image), int(sample["label"])


class StreamingImages(StreamingDataset):
    """The packed training images, streamed: each rank and worker reads its share of the
    shards, in an order shuffled per epoch with the global seed.

    The host generators are seeded before each sample is decoded with
    ``item_seed(epoch seed, sample id)``: its augmentation depends on (global seed, epoch,
    sample) only, not on the worker, rank or restart that reads it. In the main process the
    caller's generator states are put back after each sample."""

    def __init__(
        self,
        input_dir: str,
        transform: Transform | None,
        report_file: str | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__(
            input_dir, cache_dir=cache_dir, shuffle=True, seed=seed, storage_options=storage_options
        )
        self.image_transform = transform
        self.report_file = report_file
        self.where = input_dir

    def __getitem__(self, index: Any) -> tuple[Any, int] | None:
        sample = super().__getitem__(index)
        saved = None
        if get_worker_info() is None:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            seed_host_generators(
                item_seed(derive_seed(self.seed, self.current_epoch), sample["id"])
            )
            return decode_sample(sample, self.image_transform, self.where, self.report_file)
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class ShardItems(Dataset):
    """A packed labeled set read by index (the kNN bank and validation images): every rank
    can take its own slice, as of any map-style dataset."""

    def __init__(
        self,
        input_dir: str,
        transform: Transform | None,
        report_file: str | None = None,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
    ) -> None:
        self.shards = StreamingDataset(
            input_dir, cache_dir=cache_dir, storage_options=storage_options
        )
        self.transform = transform
        self.report_file = report_file
        self.where = input_dir

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        sample = self.shards[index]
        return decode_sample(sample, self.transform, self.where, self.report_file)
