"""The training loader of every datamodule: an epoch's order and augmentations are a function of
(global seed, epoch, rank), and a loader restored from a mid-epoch checkpoint continues with the
batch an uninterrupted run would have seen next."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from sslzoo.seeding import derive_seed


def item_seed(epoch_seed: int, position: int) -> int:
    """64-bit seed of the item at ``position`` (0-based, in this rank's epoch order)."""
    return derive_seed(epoch_seed, position)


def seed_host_generators(seed: int) -> None:
    """Seed python's, numpy's and torch's CPU generators (CUDA generators are left alone)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, position)`` keys: the host generators are seeded with
    :func:`item_seed` before each item is loaded, so its augmentation depends on neither the
    worker that loads it nor the items loaded before it. In the main process the caller's
    generator states are restored after each batch."""

    def __init__(self, dataset: Dataset, epoch_seed: int) -> None:
        self.dataset = dataset
        self.epoch_seed = epoch_seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch of items (the DataLoader's batched fetch): one save and restore of the
        host generators per batch, not per item."""
        saved = None
        if get_worker_info() is None:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            items = []
            for index, position in keys:
                seed_host_generators(item_seed(self.epoch_seed, position))
                items.append(self.dataset[index])
            return items
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class ResumePoint:
    """Where a resumable training loader stands: the epoch and the batches consumed in it.

    ``state_dict()`` is ``{"epoch": e, "batches": consumed}``; Lightning saves it in every
    checkpoint and loads it when it resumes mid-epoch. :meth:`start` then tells the next epoch
    how many batches to skip: the restored count if it is the same epoch, else none (a
    checkpoint taken on an epoch's last batch resumes at the next epoch's start).
    """

    def __init__(self) -> None:
        self.epoch, self.batches = -1, 0
        self._restored: dict[str, int] | None = None

    def start(self, epoch: int) -> int:
        """Begin ``epoch``; returns the batches already consumed in it."""
        restored, self._restored = self._restored, None
        same = restored is not None and restored["epoch"] == epoch
        self.epoch, self.batches = epoch, restored["batches"] if same else 0
        return self.batches

    def advance(self) -> None:
        """One more batch consumed."""
        self.batches += 1

    def state_dict(self) -> dict[str, int]:
        if self._restored is not None:  # restored, not started yet
            return dict(self._restored)
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._restored = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


class RemainingBatches:
    """The batches of ``batch_sampler`` from batch number ``start`` on, as lists of
    ``(index, position)`` keys for :class:`SeededItems`. Skipped batches are drawn from the
    sampler (so the order is unchanged) but never loaded."""

    def __init__(self, batch_sampler: Iterable[list[int]], start: int) -> None:
        self.batch_sampler = batch_sampler
        self.start = start

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.start)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = 0
        for number, batch in enumerate(self.batch_sampler):
            if number >= self.start:
                yield [(index, position + j) for j, index in enumerate(batch)]
            position += len(batch)


class EpochIterator(Iterator):
    """One epoch of an :class:`EpochSeededLoader`. It starts at the first ``next()`` (seeding,
    skipping what a restored checkpoint already consumed, starting workers), when the trainer's
    epoch counter is final even right after a resume."""

    def __init__(self, loader: EpochSeededLoader) -> None:
        self.loader = loader
        self._batches: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        self.loader.resume_point.advance()
        return batch

    def _start(self) -> Iterator[Any]:
        loader = self.loader
        epoch = loader.current_epoch()
        seed = loader.epoch_seed(epoch)
        loader.generator.manual_seed(seed)  # the shuffle order
        skip = loader.resume_point.start(epoch)
        epoch_loader = DataLoader(
            SeededItems(loader.dataset, seed),
            batch_sampler=RemainingBatches(loader.batch_sampler, skip),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=torch.Generator().manual_seed(seed),  # worker seeds
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
            persistent_workers=False,
            in_order=loader.in_order,
        )
        iterator = iter(epoch_loader)
        loader._iterator = iterator  # so Lightning's teardown shuts its workers down
        return iterator


class EpochSeededLoader(DataLoader):
    """A DataLoader whose epochs are reproducible and resumable.

    Each epoch (see :class:`EpochIterator`) shuffles with ``epoch_seed(epoch)``, a function of
    (global seed, epoch, rank), and seeds the augmentation of the item at position ``p`` with
    ``item_seed(epoch_seed, p)``: a resumed run sees the order and augmentations of an
    uninterrupted one, whatever the number of workers.

    ``state_dict()`` is its :class:`ResumePoint`'s: after a mid-epoch restore the next epoch
    iterator skips the batches consumed without loading them.

    Args:
        current_epoch: the index of the epoch being (or about to be) trained.
        epoch_seed: the seed of an epoch.
        *args, **kwargs: DataLoader arguments; a batch size is required and workers are
            started afresh each epoch (``persistent_workers`` is ignored).
    """

    def __init__(
        self,
        *args: Any,
        current_epoch: Callable[[], int],
        epoch_seed: Callable[[int], int],
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        if self.batch_sampler is None:
            raise ValueError("EpochSeededLoader needs a batch size (it resumes whole batches)")
        self.current_epoch = current_epoch
        self.epoch_seed = epoch_seed
        self.resume_point = ResumePoint()

    def __iter__(self) -> EpochIterator:
        return EpochIterator(self)

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands: ``{"epoch": e, "batches": consumed}``."""
        return self.resume_point.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the next epoch iterator at ``state_dict`` (if it is the same epoch)."""
        self.resume_point.load_state_dict(state_dict)
