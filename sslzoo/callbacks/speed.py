"""Speed options that change how a run computes, never what it computes: channels-last
convolutions and compiled backbones."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch

from sslzoo.backbones import Backbone


class ChannelsLast(L.Callback):
    """Store the method's 4-D weights and buffers in channels-last format at fit start, so
    convolutions (and their outputs, which follow the weights' format) run in the layout GPU
    tensor cores prefer. Teachers are converted alike, so EMA updates pair equal layouts. Not
    for sharded (FSDP) runs, whose flat shards have no 4-D layout."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.to(memory_format=torch.channels_last)


class CompileBackbone(L.Callback):
    """``torch.compile`` every backbone of the method (students and EMA teachers) in place at
    fit start. ``nn.Module.compile`` keeps parameter names, so checkpoints, EMA pairs and
    exports are unchanged. Methods that call a ViT's blocks directly (iBOT, MAE) only gain in
    evaluation.

    Args:
        mode: ``torch.compile`` mode (``None``, ``reduce-overhead``, ``max-autotune``...).
        backend: compiler backend; ``eager`` only traces (a quick check that a model compiles).
        dynamic: allow dynamic shapes (multi-crop sizes are static, so ``False`` by default).
    """

    def __init__(
        self,
        mode: str | None = None,
        backend: str = "inductor",
        dynamic: Literal[True, False] | None = False,
    ) -> None:
        self.mode = mode
        self.backend = backend
        self.dynamic = dynamic

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, Backbone):
                module.model.compile(mode=self.mode, backend=self.backend, dynamic=self.dynamic)
