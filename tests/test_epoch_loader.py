"""The training loader: each item's randomness follows its own seed, and a loader restored
mid-epoch yields exactly the rest of the epoch, with or without worker processes."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from sslzoo.datamodules.epoch_loader import EpochSeededLoader, item_seed, seed_host_generators

N, BATCH = 20, 4


class RandomItems(Dataset):
    """Item i: (i, then one draw each from torch, numpy and python)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> torch.Tensor:
        draws = [float(i), torch.rand(()).item(), np.random.rand(), random.random()]
        return torch.tensor(draws, dtype=torch.float64)


def loader(epoch: int, num_workers: int = 0) -> EpochSeededLoader:
    return EpochSeededLoader(
        RandomItems(),
        current_epoch=lambda: epoch,
        epoch_seed=lambda e: 1000 + e,
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
    )


def test_order_and_items_follow_the_epoch_and_item_seeds() -> None:
    rows = torch.cat(list(loader(epoch=2)))
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1002))  # epoch seed
    for position, row in enumerate(rows):
        seed_host_generators(item_seed(1002, position))
        assert torch.equal(row, RandomItems()[int(order[position])])


def test_restored_loader_yields_the_rest_of_the_epoch() -> None:
    full = list(loader(epoch=1))
    assert len(full) == N // BATCH
    first = loader(epoch=1)
    batches = iter(first)
    for _ in range(2):
        next(batches)
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    resumed = loader(epoch=1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))
    assert resumed.state_dict() == {"epoch": 1, "batches": len(full)}

    # a state from another epoch (a checkpoint on epoch 1's last batch) skips nothing
    later = loader(epoch=2)
    later.load_state_dict({"epoch": 1, "batches": len(full)})
    assert len(list(later)) == len(full)


def test_workers_yield_what_the_main_process_yields() -> None:
    main = list(loader(epoch=0))
    workers = list(loader(epoch=0, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(main, workers, strict=True))


def test_main_process_generators_are_left_alone() -> None:
    def draws() -> list[float]:
        return [torch.rand(()).item(), float(np.random.rand()), random.random()]

    seed_host_generators(7)
    expected = draws()
    seed_host_generators(7)
    list(loader(epoch=0))
    assert draws() == expected
