"""Command line: ``sslzoo fit|validate|test --config ...`` (LightningCLI), and ``sslzoo
quickstart``, ``sslzoo eval knn|linear``, ``sslzoo export``, ``sslzoo report``.

Runs log to ``trainer.default_root_dir`` (``runs/<method>_<data>`` unless set): TensorBoard
events, ``metrics.csv``, ``config.yaml`` and ``checkpoints/last.ckpt``, so
``--ckpt_path last`` resumes the run in place. ``last.ckpt`` is written at each epoch's end and,
with ``--checkpoint_every_n_steps N``, every N optimizer steps too; always atomically (a kill
while saving leaves the previous one intact) and in a background thread. A run resumed from a
mid-epoch checkpoint continues with the batches, augmentations and random draws an
uninterrupted run would have used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

import sslzoo.datamodules as datamodules
import sslzoo.methods as methods
from sslzoo.callbacks.batch_seed import BatchSeed
from sslzoo.callbacks.throughput import Throughput
from sslzoo.checkpoints import AtomicCheckpointIO
from sslzoo.datamodules import SSLDataModule
from sslzoo.methods import SSLMethod

METHODS = sorted(n for n in methods.__all__ if n != "SSLMethod")
DATAMODULES = sorted(n for n in datamodules.__all__ if n != "SSLDataModule")


def _class_name(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    path = getattr(value, "class_path", None) or (
        value.get("class_path") if isinstance(value, dict) else None
    )
    return path.rsplit(".", 1)[-1] if path else None


def default_checkpoints(directory: Path, every_n_steps: int | None) -> list[ModelCheckpoint]:
    """``last.ckpt``, written once at each training epoch's end whatever the validation
    schedule (Lightning otherwise saves only after validation epochs); with ``every_n_steps``,
    also every that many optimizer steps (Lightning's triggers are exclusive, hence two
    callbacks; both overwrite the one ``last.ckpt``)."""
    epoch_end = ModelCheckpoint(
        dirpath=directory,
        filename=ModelCheckpoint.CHECKPOINT_NAME_LAST,  # the one kept file is last.ckpt
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    if not every_n_steps:
        return [epoch_end]
    return [
        epoch_end,
        ModelCheckpoint(
            dirpath=directory,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_steps,
            enable_version_counter=False,
        ),
    ]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


class SSLZooCLI(LightningCLI):
    """LightningCLI with ``--model`` and ``--data`` in subclass mode, sslzoo's run layout and
    resumable checkpoints, and errors that list the valid method and dataset names.

    Unless the config sets its own: a ``ModelCheckpoint`` writing ``<root>/checkpoints/last.ckpt``
    (every ``checkpoint_every_n_steps`` steps too, if set), the :class:`AtomicCheckpointIO`
    plugin, the :class:`~sslzoo.callbacks.BatchSeed` callback, and the
    :class:`~sslzoo.callbacks.Throughput` callback (``perf/images_per_sec`` on the dashboard).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(SSLMethod, SSLDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int | None,
            default=None,
            help="Also write checkpoints/last.ckpt every N optimizer steps (mid-epoch "
            "checkpoints; resume after a crash with --ckpt_path last).",
        )

    def _run_config(self) -> Any:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except SystemExit:
            argv = list(args) if isinstance(args, list | tuple) else sys.argv[1:]
            self._explain_names(argv)
            raise

    @staticmethod
    def _explain_names(argv: list[str]) -> None:
        """After a parse error, say which method or datamodule names exist."""
        for flag, valid in (("--model", METHODS), ("--data", DATAMODULES)):
            for i, arg in enumerate(argv):
                value = None
                if arg == flag and i + 1 < len(argv):
                    value = argv[i + 1]
                elif arg.startswith(flag + "="):
                    value = arg.split("=", 1)[1]
                if value and not value.startswith("{") and value.rsplit(".", 1)[-1] not in valid:
                    print(
                        f"error: unknown {flag[2:]} {value!r}; valid names: {', '.join(valid)}",
                        file=sys.stderr,
                    )

    def before_instantiate_classes(self) -> None:
        config = self._run_config()
        trainer = config.get("trainer")
        if trainer is not None and not trainer.get("default_root_dir"):
            method = (_class_name(config.get("model")) or "run").lower()
            data = (_class_name(config.get("data")) or "data").replace("DataModule", "").lower()
            trainer["default_root_dir"] = str(Path("runs") / f"{method}_{data}")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        root = config.get("default_root_dir") or "runs/default"
        if config.get("logger") in (None, True):
            config["logger"] = [
                TensorBoardLogger(root, name="", version=""),
                CSVLogger(root, name="", version=""),
            ]
        configured = _as_list(config.get("callbacks")) + list(callbacks)
        every = self._run_config().get("checkpoint_every_n_steps")
        if config.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in configured
        ):
            callbacks = [*callbacks, *default_checkpoints(Path(root) / "checkpoints", every)]
        elif every:
            raise ValueError(
                "checkpoint_every_n_steps configures the default checkpoints; with checkpointing "
                "off or your own ModelCheckpoint, set its every_n_train_steps instead"
            )
        if not any(isinstance(c, BatchSeed) for c in configured):
            callbacks = [BatchSeed(), *callbacks]
        if not any(isinstance(c, Throughput) for c in configured):
            log_every = config.get("log_every_n_steps") or 50  # Lightning's default
            callbacks = [*callbacks, Throughput(log_every_n_steps=log_every)]
        plugins = _as_list(config.get("plugins"))
        strategy = config.get("strategy")
        xla = "tpu" in str(config.get("accelerator")) or "xla" in str(strategy).lower()
        if not (
            xla
            or any(isinstance(p, CheckpointIO) for p in plugins)
            or getattr(strategy, "_checkpoint_io", None) is not None
        ):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)


EXTRA_COMMANDS = {
    "quickstart": ("sslzoo.quickstart", "main"),
    "eval": ("sslzoo.eval", "run"),
    "export": ("sslzoo.export", "main"),
    "report": ("sslzoo.report", "main"),
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sslzoo`` command."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in EXTRA_COMMANDS:
        import importlib

        module, function = EXTRA_COMMANDS[argv[0]]
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    SSLZooCLI(args=args)


if __name__ == "__main__":
    main()
