"""Which labels an evaluation may use: class-balanced subsets of the labeled training split
(1 % / 10 % / 100 % of the labels, k shots per class) and validation splits carved from them,
each a function of a seed, and written beside the results so a run can be reproduced."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from sslzoo.errors import ConfigError


def _by_class(labels: torch.Tensor, pool: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(c): pool[labels[pool] == c] for c in labels[pool].unique()}


def balanced_subset(
    labels: Sequence[int] | torch.Tensor,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    exclude: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted indices of a class-balanced subset of ``labels``, the same for the same seed.

    Either ``fraction`` of each class (rounded, at least one image: 1 % of CIFAR-10's 5,000
    images a class is 50) or ``per_class`` images of each class. Indices in ``exclude`` are
    never picked. Each class draws from its own generator, so a class's pick does not depend
    on the others'.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction and per_class")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    pool = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        pool[torch.as_tensor(exclude, dtype=torch.long)] = False
    keep = []
    for c, members in _by_class(labels, pool.nonzero().squeeze(1)).items():
        n = per_class if per_class is not None else max(1, round(fraction * len(members)))
        if n > len(members):
            raise ConfigError(
                f"class {c} has {len(members)} labeled images available, fewer than the "
                f"{n} asked for"
            )
        generator = torch.Generator().manual_seed(seed * 100_003 + c)
        keep.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(keep).sort().values


def carve_validation(
    labels: Sequence[int] | torch.Tensor,
    indices: torch.Tensor,
    fraction: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``indices`` (into ``labels``) into (train, validation), ``fraction`` of each class
    held out (at least one image of each class that has two or more)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    train, val = [], []
    for c, members in _by_class(labels, indices).items():
        generator = torch.Generator().manual_seed(seed * 100_003 + c + 7)
        members = members[torch.randperm(len(members), generator=generator)]
        n = min(len(members) - 1, max(1, math.floor(fraction * len(members))))
        val.append(members[:n])
        train.append(members[n:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def write_indices(path: str | Path, **splits: torch.Tensor | list[int] | str | float) -> None:
    """Write the chosen indices (and what chose them) as JSON, so the run can be repeated."""
    record = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in splits.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record))


def read_indices(path: str | Path, key: str = "train") -> torch.Tensor:
    """The indices of ``key`` in a file written by :func:`write_indices`."""
    record = json.loads(Path(path).read_text())
    if key not in record:
        raise ConfigError(f"{path} holds no {key!r} indices (it has {sorted(record)})")
    return torch.as_tensor(record[key], dtype=torch.long)
