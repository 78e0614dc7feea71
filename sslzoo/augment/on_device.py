"""Running device views inside training: their seeds per batch, and compiling them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslzoo.augment.views import DeviceViews
from sslzoo.seeding import derive_seed, global_seed


def seed_device_augmentation(trainer: Any, device: torch.device) -> None:
    """Seed ``device``'s generator from (global seed, epoch, batch index, rank), so the views
    of a batch do not depend on what ran before it (a mid-epoch resume draws the same views).
    Seeding is host-side state: no sync with the device."""
    batch_idx = trainer.fit_loop.epoch_loop.batch_idx + 1  # the batch being transferred
    key = [global_seed(), trainer.current_epoch, batch_idx, trainer.global_rank]
    # the trailing 7 keeps these seeds apart from BatchSeed's seed of the same batch
    seed = derive_seed(*key, 7)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    # host-side draws of the views too (iBOT's masks); BatchSeed reseeds the host generators
    # for the training step itself
    torch.default_generator.manual_seed(seed)


def compile_views(views: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` the device views as one graph: the whole module, or its ``views``
    submodule when it also does host work (iBOT's masks)."""
    if isinstance(views, DeviceViews):
        return torch.compile(views, fullgraph=True, backend=backend)
    views.views = torch.compile(views.views, fullgraph=True, backend=backend)
    return views
