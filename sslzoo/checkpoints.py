"""Checkpoint files: written atomically during ``sslzoo fit``, and read back to rebuild a method
(and its datamodule)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sslzoo.datamodules import SSLDataModule
from sslzoo.methods import SSLMethod


def partial_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_atomic` writes ``path`` before renaming it: ``.<name>.partial`` beside
    it (not a ``.ckpt`` name, so ``ckpt_path="last"`` never picks it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that ``path`` only ever holds a complete version.

    ``write`` fills a temporary file in the same directory, which is flushed, fsynced and then
    renamed over ``path`` (``os.replace``, atomic on POSIX and Windows); the directory is fsynced
    so the rename survives a power loss. A process killed at any point leaves either the old
    file or the new one, plus at worst a stale ``.partial`` file that the next write replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, with local files written by
    :func:`write_atomic`: a run killed while saving keeps its previous ``last.ckpt`` intact.
    Remote paths (``s3://``...) use Lightning's own transactional write."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomic(path, lambda f: torch.save(checkpoint, f))


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
