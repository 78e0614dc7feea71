"""``sslzoo selftrain --teacher FINETUNED.ckpt``: self-training after fine-tuning.

    sslzoo eval finetune --ckpt RUN.ckpt --label_fraction 0.1 --out_dir FT --save_to FT/ft.ckpt
    sslzoo selftrain --teacher FT/ft.ckpt --mode distill
    sslzoo selftrain --teacher FT/ft.ckpt --mode noisy-student --iterations 2
    sslzoo selftrain --teacher FT/ft.ckpt --mode distill --ckpt_path last   # resume

The data is the teacher's (its recorded datamodule; ``--data.KEY VALUE`` replaces one
argument, ``--data CLASS`` chooses another); the labeled images are the fine-tuning run's
(its index file). Runs go to ``--root`` (default ``selftrain_<mode>`` beside the teacher).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, get_type_hints

from jsonargparse import ArgumentParser

from sslzoo.checkpoints import check_data_paths, read_checkpoint
from sslzoo.datamodules import SSLDataModule
from sslzoo.errors import CheckpointError
from sslzoo.selftrain.run import SelfTrainSettings, self_train


def _recorded_data(argv: list[str]) -> dict[str, Any] | None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--teacher")
    pre.add_argument("--data")
    known, _ = pre.parse_known_args(argv)
    if known.teacher is None or known.data is not None:
        return None
    hparams = dict(read_checkpoint(known.teacher).get("datamodule_hyper_parameters") or {})
    if "_class_path" not in hparams:
        return None
    path = hparams.pop("_class_path")
    return {"class_path": path, "init_args": hparams}


def parser(data: dict[str, Any] | None = None) -> ArgumentParser:
    """The ``sslzoo selftrain`` parser; ``data`` is the default of ``--data``."""
    p = ArgumentParser(prog="sslzoo selftrain", description=__doc__)
    p.add_argument("--teacher", required=True, help="classifier checkpoint (--save_to of finetune)")
    p.add_subclass_arguments(SSLDataModule, "data", required=False, default=data)
    p.add_argument("--label_fraction", type=float | None, default=None,
                   help="check: the teacher's label fraction")  # fmt: skip
    p.add_argument("--root", type=str | None, default=None, help="run folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt_path", type=str | None, default=None, help="last: resume")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--precision", type=str | None, default=None)
    p.add_argument("--progress_bar", type=bool, default=True)
    p.add_argument("--limit_train_batches", type=int | float | None, default=None)
    hints = get_type_hints(SelfTrainSettings)
    for field in dataclasses.fields(SelfTrainSettings):
        p.add_argument(f"--{field.name}", type=hints[field.name], default=field.default)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, self-train, print each round's test top-1 and return the summary."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recorded = _recorded_data(argv)
    p = parser(recorded)
    cfg = p.parse_args(argv)
    if cfg.data is None:
        raise CheckpointError(f"{cfg.teacher}: no datamodule recorded; pass --data to choose one")
    if recorded is not None:
        check_data_paths(cfg.teacher, recorded["init_args"], cfg.data.init_args.as_dict())
    data = p.instantiate_classes(cfg).data
    names = {f.name for f in dataclasses.fields(SelfTrainSettings)}
    settings = SelfTrainSettings(**{k: cfg[k] for k in names})
    root = cfg.root or str(Path(cfg.teacher).resolve().parent / f"selftrain_{settings.mode}")
    summary = self_train(
        cfg.teacher, data, root, settings, cfg.label_fraction, cfg.seed, cfg.ckpt_path,
        cfg.accelerator, cfg.devices, cfg.precision, cfg.progress_bar, cfg.limit_train_batches,
    )  # fmt: skip
    print(f"teacher top-1 {summary['teacher']['top1']:.4f}")
    for r in summary["rounds"]:
        print(f"round {r['round']} ({settings.mode}) student top-1 {r['top1']:.4f}")
    return summary
