"""Checkpoint files: written atomically during ``sslzoo fit``, and read back to rebuild a method
(and its datamodule)."""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from sslzoo.datamodules import SSLDataModule
from sslzoo.errors import CheckpointError, MissingDataError
from sslzoo.methods import SSLMethod
from sslzoo.runs import LAST, PREVIOUS


def partial_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_atomic` writes ``path`` before renaming it: ``.<name>.partial`` beside
    it (not a ``.ckpt`` name, so ``ckpt_path="last"`` never picks it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def write_atomic(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], None],
    keep: str | os.PathLike | None = None,
) -> None:
    """Write a file so that ``path`` only ever holds a complete version.

    ``write`` fills a temporary file in the same directory, which is flushed, fsynced and then
    renamed over ``path`` (``os.replace``, atomic on POSIX and Windows); the directory is fsynced
    so the rename survives a power loss. A process killed at any point leaves either the old
    file or the new one, plus at worst a stale ``.partial`` file that the next write replaces.
    With ``keep``, the version being replaced stays there (a hard link where the file system
    has them, so ``path`` never goes missing), a fallback should the new one later be damaged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep is not None and path.is_file():
            _keep_copy(path, Path(keep))
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


def _keep_copy(path: Path, keep: Path) -> None:
    """Make ``keep`` the current version of ``path`` without copying its bytes."""
    link = partial_path(keep)
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links here: move it; the caller's rename follows at once
        os.replace(path, keep)
        return
    os.replace(link, keep)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, with local files written by
    :func:`write_atomic`: a run killed while saving keeps its previous ``last.ckpt`` intact, and
    each new ``last.ckpt`` keeps the one it replaces as ``previous.ckpt`` beside it (a resume
    falls back to it if ``last.ckpt`` turns out unreadable, see :mod:`sslzoo.runs`). Remote
    paths (``s3://``...) use Lightning's own transactional write.

    With ``background`` (the default), a save copies the checkpoint's tensors to host memory
    and returns; a worker thread serialises, writes and fsyncs the file while training goes on.
    Writes land one at a time, in order: the next save, a removal, a load and the end of the
    run (``teardown``) wait for the one in flight, and re-raise its error if it failed. Saves
    after the run's end (``trainer.save_checkpoint`` after ``fit``) are written before they
    return, so the file can be read at once.
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._torn_down = False

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        self.wait()
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        keep = Path(path).with_name(PREVIOUS) if Path(path).name == LAST else None
        if not self.background or self._torn_down:
            write_atomic(path, lambda f: torch.save(checkpoint, f), keep)
            return
        # a point-in-time copy: training goes on updating the originals
        snapshot = apply_to_collection(checkpoint, torch.Tensor, _host_copy)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending = self._executor.submit(
            write_atomic, path, lambda f: torch.save(snapshot, f), keep
        )

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def load_checkpoint(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        self.wait()
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        self._torn_down = True
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


T = TypeVar("T")
# the datamodules' arguments that are paths to data (CIFAR's root, ImageFolderDataModule's folders)
DATA_PATH_ARGUMENTS = ("root", "train_dir", "val_dir", "bank_dir")


def _import(class_path: Any, base: type[T], source: str | Path) -> type[T]:
    """The class ``class_path`` names, if it is a subclass of ``base``; a
    :class:`~sslzoo.errors.CheckpointError` otherwise, before anything is called.

    A checkpoint's hyper-parameters may name anything, so the class is looked up only in
    sslzoo's modules and in modules already imported: importing any other module runs its code.
    """
    module_name, _, name = str(class_path).rpartition(".")
    module = sys.modules.get(module_name)
    if module is None and (module_name == "sslzoo" or module_name.startswith("sslzoo.")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        hint = ""
        if module is None and module_name:
            hint = f"; if {module_name!r} is your own code, pass --import_module {module_name}"
        raise CheckpointError(
            f"{source}: refusing to build {class_path!r}: from a checkpoint, sslzoo builds only "
            f"subclasses of {base.__name__} (defined in sslzoo or in a module already imported)"
            + hint
        )
    return cls


IMPORT_HELP = (
    "comma-separated modules of your own to import first, for a run of a method defined in "
    "them (a checkpoint may name only sslzoo's classes or those of modules already imported)"
)


def import_trusted(modules: str | None) -> None:
    """Import the comma-separated ``modules`` the user trusts (their own methods), so that a
    checkpoint naming a class in them can be built."""
    for name in filter(None, (m.strip() for m in (modules or "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise MissingDataError(f"--import_module {name}: {error}") from error


def _refuse_nested_classes(value: Any, source: str | Path, key: str) -> None:
    """Refuse a ``class_path`` anywhere inside a hyper-parameter's value: sslzoo's methods and
    datamodules take none, and a parser handed these values as defaults would build it."""
    if isinstance(value, dict):
        if "class_path" in value:
            raise CheckpointError(
                f"{source}: refusing to build {value['class_path']!r} named in the argument "
                f"{key!r}: sslzoo methods and datamodules take no classes as arguments"
            )
        items = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return
    for item in items:
        _refuse_nested_classes(item, source, key)


def _init_args(hparams: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments among hyper-parameters (Lightning's own keys start with ``_``)."""
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code is executed) and check the
    classes its hyper-parameters name: a method and a datamodule of sslzoo, and no class inside
    their arguments; anything else is refused before it is imported or called."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(
            f"{path}: not a checkpoint sslzoo can read (damaged, or holding objects other than "
            "tensors and plain values)"
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint written by `sslzoo fit`")
    for key, base in (
        ("hyper_parameters", SSLMethod),
        ("datamodule_hyper_parameters", SSLDataModule),
    ):
        hparams = ckpt.get(key) or {}
        if not isinstance(hparams, dict):
            raise CheckpointError(f"{path}: its {key} are not a mapping")
        if "_class_path" in hparams:
            _import(hparams["_class_path"], base, path)
        for name, value in hparams.items():
            _refuse_nested_classes(value, path, name)
    return ckpt


def load_method(path: str | Path, trained: bool = True, seed: int = 0) -> SSLMethod:
    """The trained method of a checkpoint, in eval mode; with ``trained=False`` the same method
    and architecture freshly initialised (from ``seed``), the baseline an evaluation puts
    beside it."""
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if "_class_path" not in hparams:
        raise CheckpointError(f"{path}: no method class recorded; was it written by `sslzoo fit`?")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _import(hparams["_class_path"], SSLMethod, path)(**_init_args(hparams))
    if trained:
        model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def recorded_datamodule(path: str | Path) -> tuple[type[SSLDataModule], dict[str, Any]] | None:
    """The datamodule class a checkpoint was trained with and its arguments; None if it records
    none."""
    hparams = read_checkpoint(path).get("datamodule_hyper_parameters") or {}
    if "_class_path" not in hparams:
        return None
    return _import(hparams["_class_path"], SSLDataModule, path), _init_args(hparams)


def check_data_paths(path: str | Path, recorded: dict[str, Any], used: dict[str, Any]) -> None:
    """Refuse a data path that a checkpoint recorded relative to the directory its run started
    in (sslzoo before absolute paths) and that is not there from the current directory."""
    for key in DATA_PATH_ARGUMENTS:
        value = used.get(key)
        if not isinstance(value, str) or value != recorded.get(key):
            continue  # none, or the user's own
        relative = Path(value).expanduser()
        if not relative.is_absolute() and not relative.exists():
            raise MissingDataError(
                f"{path} records {key}={value!r}, a path relative to the directory its run was "
                f"started in, and {value!r} does not exist from {Path.cwd()}; pass "
                f"--data.{key} with the data's path"
            )
