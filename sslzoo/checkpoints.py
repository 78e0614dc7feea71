"""Rebuild a method (and its datamodule) from a checkpoint written by ``sslzoo fit``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from sslzoo.datamodules import SSLDataModule
from sslzoo.methods import SSLMethod


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _build(hparams: dict[str, Any], overrides: dict[str, Any] | None = None) -> Any:
    cls = _import(hparams["_class_path"])
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    kwargs.update(overrides or {})
    return cls(**kwargs)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_method(path: str | Path) -> SSLMethod:
    """The trained method of a checkpoint, in eval mode."""
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters", {})
    if "_class_path" not in hparams:
        raise ValueError(f"{path}: no method class recorded; was it written by `sslzoo fit`?")
    model = _build(hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_datamodule(path: str | Path, **overrides: Any) -> SSLDataModule:
    """The datamodule a checkpoint was trained with, with ``overrides`` (e.g. ``root``)."""
    hparams = read_checkpoint(path).get("datamodule_hyper_parameters")
    if not hparams or "_class_path" not in hparams:
        raise ValueError(f"{path}: no datamodule recorded; pass --data to choose one")
    return _build(hparams, overrides)
