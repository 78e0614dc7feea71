"""Command line: ``sslzoo fit|validate|test --config ...`` (LightningCLI), and ``sslzoo
quickstart``, ``sslzoo eval PROTOCOL``, ``sslzoo export``, ``sslzoo report``, ``sslzoo data
pack``, ``sslzoo selftrain``.

Each ``fit`` writes into a new ``version_N`` folder under ``trainer.default_root_dir``
(``runs/<method>_<data>`` unless set): TensorBoard events, ``metrics.csv``, ``config.yaml`` and
``checkpoints/last.ckpt``; ``--ckpt_path last`` continues the newest version in place, its
history too (see :mod:`sslzoo.runs`). ``last.ckpt`` is written at each epoch's end and,
with ``--checkpoint_every_n_steps N``, every N optimizer steps too; always atomically (a kill
while saving leaves the previous one intact) and in a background thread. A run resumed from a
mid-epoch checkpoint continues with the batches, augmentations and random draws an
uninterrupted run would have used.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

import sslzoo.datamodules as datamodules
import sslzoo.methods as methods
from sslzoo.callbacks.batch_seed import BatchSeed
from sslzoo.callbacks.log_flush import FlushLogs
from sslzoo.callbacks.throughput import Throughput
from sslzoo.checkpoints import AtomicCheckpointIO
from sslzoo.cli_errors import exact_names, parser_logger, summarize, unrecognized
from sslzoo.datamodules import SSLDataModule
from sslzoo.errors import UserError, warn_user
from sslzoo.methods import SSLMethod
from sslzoo.runs import RunPlan, plan_run, run_loggers

METHODS = sorted(n for n in methods.__all__ if n != "SSLMethod")
DATAMODULES = sorted(n for n in datamodules.__all__ if n != "SSLDataModule")


def _class_name(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    path = getattr(value, "class_path", None) or (
        value.get("class_path") if isinstance(value, dict) else None
    )
    return path.rsplit(".", 1)[-1] if path else None


class StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every n optimizer steps, and nothing more at the end of training: the
    epoch-end checkpoint holds the final state (Lightning's ``save_last`` would write it once
    more at the end of a process that had not reached n steps, a resumed one, with the epoch
    counted as finished, unlike the uninterrupted run's)."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return None


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
        StepCheckpoint(
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


class SSLZooArgumentParser(LightningArgumentParser):
    """Lightning's parser with errors that come first and short: what was wrong, a "did you
    mean", the valid method or datamodule names; no usage text above them."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a parser used inside another one: let it handle this
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        short = summarize(message, {"model": METHODS, "data": DATAMODULES})
        short = unrecognized(short, parser._option_string_actions)
        if parser is self and "subcommand" in short:
            short += f" (or one of {', '.join(EXTRA_COMMANDS)})"
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {short}\n`{prog} --help` lists every option.\n")
        self.exit(2)


class SSLZooCLI(LightningCLI):
    """LightningCLI with ``--model`` and ``--data`` in subclass mode, sslzoo's run layout and
    resumable checkpoints, and errors that list the valid method and dataset names.

    Unless the config sets its own: a ``ModelCheckpoint`` writing ``<root>/checkpoints/last.ckpt``
    (every ``checkpoint_every_n_steps`` steps too, if set), the :class:`AtomicCheckpointIO`
    plugin, the :class:`~sslzoo.callbacks.BatchSeed` callback, and the
    :class:`~sslzoo.callbacks.Throughput` callback (``perf/images_per_sec`` on the dashboard).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._parser_logger, self._dropped = parser_logger()
        kwargs.setdefault("parser_class", SSLZooArgumentParser)
        # "fit": {} keeps prog and description to the main parser
        main_parser = {"prog": "sslzoo", "description": DESCRIPTION, "fit": {}}
        kwargs.setdefault("parser_kwargs", main_parser)
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

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("logger", self._parser_logger)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None or isinstance(args, list | tuple):
            given = list(sys.argv[1:] if args is None else args)
            exact = exact_names(given, {"--model": METHODS, "--data": DATAMODULES})
            args = exact if exact != given else args
        with warnings.catch_warnings():  # args given in place of sys.argv: the names respelled
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            super().parse_arguments(parser, args)
        for message in self._dropped.messages(bases=("SSLMethod", "SSLDataModule")):
            warn_user(message)

    def before_instantiate_classes(self) -> None:
        """Choose the run's ``version_N`` folder under ``default_root_dir`` and, for
        ``--ckpt_path last``, the checkpoint file to resume (see :func:`sslzoo.runs.plan_run`)."""
        config = self._run_config()
        trainer = config.get("trainer")
        self.run_plan: RunPlan | None = None
        if trainer is None:
            return
        root = trainer.get("default_root_dir")
        if not root:
            method = (_class_name(config.get("model")) or "run").lower()
            data = (_class_name(config.get("data")) or "data").replace("DataModule", "").lower()
            root = str(Path("runs") / f"{method}_{data}")
        fitting = self.subcommand == "fit"
        self.run_plan = plan_run(root, config.get("ckpt_path"), resume=fitting)
        trainer["default_root_dir"] = str(self.run_plan.directory)
        if fitting:
            config["ckpt_path"] = self.run_plan.ckpt_path
        if self.run_plan.resumes:  # of course its checkpoints folder is not empty
            warnings.filterwarnings("ignore", message="Checkpoint directory .* not empty")

    def instantiate_classes(self) -> None:
        """Build the classes, then hand the model's view recipe to the datamodule, which
        builds the training views from it (unless it was given a recipe of its own)."""
        super().instantiate_classes()
        if self.datamodule is not None and getattr(self.datamodule, "views", None) is None:
            self.datamodule.views = getattr(self.model, "views", None)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        root = config.get("default_root_dir") or "runs/default"
        if config.get("logger") in (None, True):
            resumes = self.run_plan is not None and self.run_plan.resumes
            config["logger"] = run_loggers(Path(root), resumes)
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
        if not any(isinstance(c, FlushLogs) for c in configured):
            callbacks = [*callbacks, FlushLogs()]
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
    "quickstart": ("sslzoo.quickstart", "main", "train on the offline digits, compare"),
    "eval": ("sslzoo.eval.cli", "run", "kNN, probes, fine-tuning, few-shot, robustness: a report"),
    "export": ("sslzoo.export", "main", "write a checkpoint's backbone for plain timm/torchvision"),
    "report": ("sslzoo.report", "main", "plot kNN, probe and loss curves of runs"),
    "data": ("sslzoo.datamodules.pack", "main", "pack an image folder into streaming shards"),
    "selftrain": ("sslzoo.selftrain.cli", "main", "distil or noisy-student a fine-tuned net"),
}
DESCRIPTION = (
    "Self-supervised pretraining of vision backbones. Train with the LightningCLI commands "
    "below (sslzoo fit --config CONFIG); sslzoo also has: "
    + "; ".join(f"sslzoo {name} ({about})" for name, (_, _, about) in EXTRA_COMMANDS.items())
    + ". Each takes --help."
)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sslzoo`` command. Errors in what the user gave
    (:class:`~sslzoo.errors.UserError`) print their message, not a traceback (set
    ``SSLZOO_DEBUG=1`` for it), and exit with status 1.

    Modules in the working directory can be named (``--model my_idea.MyMethod``), as under
    ``python -m sslzoo``; they come after the installed packages, so they shadow none."""
    argv = sys.argv[1:] if args is None else args
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            import importlib

            module, function, _ = EXTRA_COMMANDS[argv[0]]
            getattr(importlib.import_module(module), function)(argv[1:])
            return
        SSLZooCLI(args=args)
    except Exception as error:
        cause = user_error(error)
        if cause is None or os.environ.get("SSLZOO_DEBUG"):
            raise
        sys.stderr.write(f"error: {cause}\n")
        raise SystemExit(1) from None


def user_error(error: BaseException) -> UserError | None:
    """The :class:`~sslzoo.errors.UserError` behind ``error``, if any: the parser wraps errors
    raised while it builds a class (a datamodule's missing folder) in its own."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    main()
