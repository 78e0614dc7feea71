"""``sslzoo eval knn|linear``: evaluate a pretrained backbone on frozen features.

    sslzoo eval knn --ckpt RUN.ckpt                    # the data the run was trained with
    sslzoo eval knn --ckpt RUN.ckpt --data.root DIR    # the run's data settings, found in DIR
    sslzoo eval knn --ckpt RUN.ckpt --data CIFAR10DataModule --data.root DIR   # other data
    sslzoo eval linear --ckpt RUN.ckpt --epochs 100

Without ``--data``, the run's datamodule is rebuilt with the arguments its checkpoint recorded;
``--data.KEY VALUE`` replaces one of them. ``--data CLASS`` chooses another datamodule, with its
own defaults.

kNN: weighted vote on L2-normalised features (DINO protocol k=20 T=0.07, and k=200 T=0.1),
bank = labeled training images, queries = validation images. Linear: features are extracted
once and cached beside the checkpoint, a linear classifier is trained on the training features
only and its validation accuracy is reported at the final epoch; nothing is selected on the
validation set. Methods with a teacher are evaluated with the teacher (``eval_backbone``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser

from sslzoo.checkpoints import (
    IMPORT_HELP,
    check_data_paths,
    import_trusted,
    load_method,
    recorded_datamodule,
)
from sslzoo.datamodules import SSLDataModule
from sslzoo.errors import CheckpointError
from sslzoo.eval.features import extract_features
from sslzoo.eval.knn import knn_accuracy
from sslzoo.eval.probes import linear_probe_accuracy


def _parser(data: dict[str, Any] | None = None) -> ArgumentParser:
    """The ``sslzoo eval`` parser; ``data`` (``class_path`` and ``init_args``) is the default of
    ``--data``, which ``--data.KEY VALUE`` arguments then override."""
    parser = ArgumentParser(prog="sslzoo eval", description=__doc__)
    commands = parser.add_subcommands(dest="protocol")
    for name in ("knn", "linear"):
        sub = ArgumentParser()
        sub.add_argument("--ckpt", required=True, help="checkpoint written by sslzoo fit")
        sub.add_argument("--import_module", default=None, help=IMPORT_HELP)
        sub.add_subclass_arguments(
            SSLDataModule, "data", required=False, default=data, help="evaluation data"
        )
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--output", default=None, help="write the result as JSON here")
        if name == "knn":
            sub.add_argument("--k", type=list[int], default=[20, 200])
            sub.add_argument("--temperature", type=list[float], default=[0.07, 0.1])
        else:
            sub.add_argument("--epochs", type=int, default=100)
            sub.add_argument("--lr", type=float, default=1e-2)
            sub.add_argument("--weight_decay", type=float, default=1e-4)
            sub.add_argument("--no_cache", type=bool, default=False)
        commands.add_subcommand(name, sub)
    return parser


def frozen_features(
    ckpt: str, data: SSLDataModule, device: str, cache: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train features, labels) and (val features, labels) of the checkpoint's eval backbone.

    With ``cache``, features are stored beside the checkpoint, keyed by checkpoint and data.
    """
    key = hashlib.sha1(
        f"{Path(ckpt).resolve()}:{Path(ckpt).stat().st_mtime}:{data.hparams}".encode()
    ).hexdigest()[:12]
    cache_file = Path(ckpt).with_name(f"{Path(ckpt).stem}.features-{key}.pt")
    if cache and cache_file.is_file():
        saved = torch.load(cache_file, weights_only=True)
        return tuple(saved["train"]), tuple(saved["val"])
    model = load_method(ckpt).to(device)
    data.build_datasets(None, data.eval_transform())
    train = extract_features(model.eval_backbone, data.knn_bank_dataloader(), device)
    val = extract_features(model.eval_backbone, data.val_dataloader(), device)
    if cache:
        torch.save({"train": list(train), "val": list(val)}, cache_file)
    return train, val


def _recorded_data(argv: list[str]) -> dict[str, Any] | None:
    """The datamodule (``class_path`` and ``init_args``) recorded in the checkpoint that ``argv``
    names, unless ``argv`` chooses one itself (``--data CLASS``)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--ckpt")
    pre.add_argument("--data")
    pre.add_argument("--import_module")
    known, _ = pre.parse_known_args(argv)
    import_trusted(known.import_module)
    if known.ckpt is None:
        return None
    # the file is read and checked before any datamodule is built, the user's own too
    recorded = recorded_datamodule(known.ckpt)
    if recorded is None or known.data is not None:
        return None
    cls, init_args = recorded
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, evaluate, print and return the result."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recorded = _recorded_data(argv)
    parser = _parser(recorded)
    cfg = parser.parse_args(argv)
    protocol = cfg.protocol
    args = cfg[protocol]
    if args.data is None:
        raise CheckpointError(f"{args.ckpt}: no datamodule recorded; pass --data to choose one")
    if recorded is not None:
        check_data_paths(args.ckpt, recorded["init_args"], args.data.init_args.as_dict())
    data = parser.instantiate_classes(cfg)[protocol].data
    train, val = frozen_features(
        args.ckpt, data, args.device, cache=protocol == "linear" and not args.no_cache
    )
    result: dict[str, Any] = {
        "ckpt": str(args.ckpt),
        "protocol": protocol,
        "train_images": len(train[1]),
        "val_images": len(val[1]),
        "selection": "none: final-epoch accuracy, trained on the training split only",
    }
    if protocol == "knn":
        if len(args.k) != len(args.temperature):
            parser.error("--k and --temperature need the same number of values")
        for k, t in zip(args.k, args.temperature, strict=True):
            acc = knn_accuracy(*train, *val, k=k, temperature=t)
            result[f"knn_top1_k{k}_t{t:g}"] = acc
            print(f"kNN k={k:<4} T={t:<5g} top-1 {acc:.4f}")
    else:
        acc = linear_probe_accuracy(
            *train, *val, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay
        )
        result["linear_top1"] = acc
        print(f"linear probe ({args.epochs} epochs, final epoch) top-1 {acc:.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result
