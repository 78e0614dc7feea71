"""Seeds derived from where a run is (epoch, batch, rank), so what a run draws does not depend
on what ran before it: a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations

import os

import numpy as np


def global_seed() -> int:
    """The run's seed, as ``seed_everything`` set it (``PL_GLOBAL_SEED``); 0 if unset."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derive_seed(*keys: int) -> int:
    """A well-mixed 64-bit seed from non-negative integer ``keys`` (numpy's SeedSequence)."""
    high, low = np.random.SeedSequence(list(keys)).generate_state(2)
    return (int(high) << 32) | int(low)
