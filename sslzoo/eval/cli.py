"""``sslzoo eval PROTOCOL --ckpt RUN.ckpt``: what a pretrained backbone is worth.

    sslzoo eval knn --ckpt RUN.ckpt                    # the data the run was trained with
    sslzoo eval knn --ckpt RUN.ckpt --data.root DIR    # the run's data settings, found in DIR
    sslzoo eval knn --ckpt RUN.ckpt --data CIFAR10DataModule --data.root DIR   # other data
    sslzoo eval linear --ckpt RUN.ckpt --epochs 100 [--head mlp] [--label_fraction 0.1]
    sslzoo eval fewshot --ckpt RUN.ckpt --shots [1,5,10]
    sslzoo eval robustness --ckpt RUN.ckpt [--corruptions [gaussian_noise,fog]]
    sslzoo eval finetune --ckpt RUN.ckpt --label_fraction 0.1
    sslzoo eval all --ckpt RUN.ckpt --out REPORT_DIR   # every protocol, trained and untrained

Without ``--data``, the run's datamodule is rebuilt with the arguments its checkpoint recorded;
``--data.KEY VALUE`` replaces one of them. ``--data CLASS`` chooses another datamodule, with its
own defaults. ``--groups FILE.csv`` (image path or index, group) adds accuracy per group to
every protocol. ``--untrained true`` evaluates the same architecture freshly initialised.

kNN: weighted vote on L2-normalised features (DINO protocol k=20 T=0.07, and k=200 T=0.1),
bank = labeled training images, queries = validation (test) images. Probes: features are
extracted once and cached beside the checkpoint, a linear (or 2-layer MLP) classifier is
trained on the training features only and its test accuracy is reported at the final epoch;
nothing is selected on the test set. Methods with a teacher are evaluated with the teacher
(``eval_backbone``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from sslzoo.checkpoints import (
    IMPORT_HELP,
    check_data_paths,
    import_trusted,
    recorded_datamodule,
)
from sslzoo.datamodules import SSLDataModule
from sslzoo.errors import CheckpointError, ConfigError
from sslzoo.eval.checkpoint_features import frozen_features
from sslzoo.eval.groups import read_groups, sample_ids
from sslzoo.eval.protocols import (
    NO_SELECTION,
    Groups,
    collapse_protocol,
    fewshot_protocol,
    finetune_protocol,
    knn_protocol,
    probe_protocol,
)

PROTOCOLS = {
    "knn": "weighted kNN on frozen features",
    "linear": "linear or MLP probe on frozen features",
    "fewshot": "logistic regression on k labeled images per class",
    "robustness": "kNN and linear probe on corrupted test images",
    "finetune": "the whole backbone fine-tuned on a fraction of the labels",
    "all": "every protocol, trained and untrained backbone, one report",
}


def _add_knn(sub: ArgumentParser) -> None:
    sub.add_argument("--k", type=list[int], default=[20, 200])
    sub.add_argument("--temperature", type=list[float], default=[0.07, 0.1])


def _add_probe(sub: ArgumentParser, prefix: str = "") -> None:
    sub.add_argument(f"--{prefix}epochs", type=int, default=100, help="probe epochs")
    sub.add_argument(f"--{prefix}lr", type=float, default=1e-2, help="probe AdamW lr")
    sub.add_argument(f"--{prefix}weight_decay", type=float, default=1e-4)


def _add_fewshot(sub: ArgumentParser) -> None:
    sub.add_argument("--shots", type=list[int], default=[1, 5, 10], help="labeled images/class")
    sub.add_argument("--draws", type=int, default=5, help="draws of the shots (mean and std)")
    sub.add_argument("--C", type=float, default=1.0, help="inverse L2 strength")


def _add_robustness(sub: ArgumentParser) -> None:
    sub.add_argument(
        "--corruptions", type=list[str] | None, default=None, help="default: every one available"
    )
    sub.add_argument("--severities", type=list[int], default=[1, 2, 3, 4, 5])


def _add_finetune(sub: ArgumentParser) -> None:
    from sslzoo.eval.finetune import add_finetune_arguments

    add_finetune_arguments(sub)


def _add_selftrain(sub: ArgumentParser) -> None:
    sub.add_argument(
        "--selftrain",
        type=bool,
        default=False,
        help="after each fine-tuning, self-train students from it (sslzoo selftrain)",
    )
    sub.add_argument("--selftrain_modes", type=list[str], default=["distill", "noisy-student"])
    sub.add_argument("--selftrain_iterations", type=int, default=1, help="rounds per mode")
    sub.add_argument(
        "--selftrain_epochs", type=int | None, default=None, help="default: fine-tuning's"
    )


def _parser(data: dict[str, Any] | None = None) -> ArgumentParser:
    """The ``sslzoo eval`` parser; ``data`` (``class_path`` and ``init_args``) is the default of
    ``--data``, which ``--data.KEY VALUE`` arguments then override."""
    parser = ArgumentParser(prog="sslzoo eval", description=__doc__)
    commands = parser.add_subcommands(dest="protocol")
    for name, about in PROTOCOLS.items():
        sub = ArgumentParser(description=about)
        sub.add_argument("--ckpt", required=True, help="checkpoint written by sslzoo fit")
        sub.add_argument("--import_module", default=None, help=IMPORT_HELP)
        sub.add_subclass_arguments(
            SSLDataModule, "data", required=False, default=data, help="evaluation data"
        )
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--groups", default=None, help="CSV: image (path or index), group")
        if name not in ("finetune", "all"):  # fine-tuning's options have their own seed
            sub.add_argument("--seed", type=int, default=0, help="label subsets, probes, draws")
        sub.add_argument("--no_cache", type=bool, default=False, help="re-extract features")
        if name != "all":
            sub.add_argument("--output", default=None, help="write the result as JSON here")
        if name not in ("finetune", "all"):  # fine-tuning has --pretrained false
            sub.add_argument("--untrained", type=bool, default=False, help="fresh weights")
        if name in ("knn", "robustness", "all"):
            _add_knn(sub)
        if name == "linear":
            _add_probe(sub)
            sub.add_argument("--head", choices=["linear", "mlp"], default="linear")
            sub.add_argument("--label_fraction", type=float, default=1.0)
        if name == "robustness":
            _add_probe(sub)
            _add_robustness(sub)
        if name == "fewshot":
            _add_fewshot(sub)
        if name == "finetune":
            _add_finetune(sub)
        if name == "all":
            sub.add_argument("--out", default=None, help="report folder (default: beside ckpt)")
            sub.add_argument("--label_fractions", type=list[float], default=[0.01, 0.1, 1.0])
            sub.add_argument("--skip", type=list[str], default=[], help="protocols left out")
            _add_probe(sub, "probe_")
            _add_fewshot(sub)
            _add_robustness(sub)
            _add_finetune(sub)
            _add_selftrain(sub)
        commands.add_subcommand(name, sub)
    return parser


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


def load_groups(args: Namespace, data: SSLDataModule) -> Groups | None:
    """The group of each test image, from ``--groups``."""
    if not args.groups:
        return None
    if data.val_set is None:
        data.build_datasets(None, data.eval_transform())
    return read_groups(args.groups, sample_ids(data.val_set), getattr(data, "val_dir", None))


def run_protocol(
    protocol: str, args: Namespace, data: SSLDataModule, groups: Groups | None
) -> dict[str, Any]:
    """One protocol (not ``all``) on the checkpoint ``args.ckpt``; prints its headline."""
    if protocol == "finetune":
        from sslzoo.eval.finetune import finetune_kwargs

        result = {
            "ckpt": str(args.ckpt),
            **finetune_protocol(args.ckpt, data, groups, **finetune_kwargs(args)),
        }
        print(
            f"fine-tuned on {result['label_fraction']:g} of the labels: top-1 {result['top1']:.4f}"
        )
        return result
    trained = not args.untrained
    result: dict[str, Any] = {"ckpt": str(args.ckpt), "protocol": protocol, "trained": trained}
    f = frozen_features(args.ckpt, data, args.device, cache=not args.no_cache, trained=trained)
    result.update(train_images=len(f.train_labels), val_images=len(f.test_labels))
    result["selection"] = NO_SELECTION
    result["collapse"] = collapse_protocol(f)
    if protocol == "knn":
        if len(args.k) != len(args.temperature):
            raise ConfigError("--k and --temperature need the same number of values")
        for name, scored in knn_protocol(f, args.k, args.temperature, groups).items():
            result[f"knn_top1_{name}"] = scored["top1"]
            if "groups" in scored:
                result.setdefault("groups", {})[f"knn_{name}"] = scored["groups"]
            print(f"kNN {name:<12} top-1 {scored['top1']:.4f}")
    elif protocol == "linear":
        scored, _ = probe_protocol(
            f, args.head, args.label_fraction, args.epochs, args.lr, args.weight_decay,
            args.seed, groups,
        )  # fmt: skip
        top1 = result[f"{args.head}_top1"] = scored.pop("top1")
        result.update(scored)
        print(f"{args.head} probe ({args.epochs} epochs, final epoch) top-1 {top1:.4f}")
    elif protocol == "fewshot":
        result["fewshot"] = fewshot_protocol(f, args.shots, args.draws, args.C, args.seed, groups)
        for k, scored in result["fewshot"]["shots"].items():
            print(f"{k:>3}-shot top-1 {scored['mean']:.4f} +- {scored['std']:.4f}")
    elif protocol == "robustness":
        probe = (args.epochs, args.lr, args.weight_decay)
        from sslzoo.eval.robustness import robustness_protocol

        result["robustness"] = robustness_protocol(args, data, f, trained, probe, groups=groups)
    print(f"RankMe {result['collapse']['rankme']:.1f}")
    return result


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
    if protocol == "all":
        from sslzoo.eval.everything import evaluate_all

        return evaluate_all(args, data, load_groups(args, data))
    result = run_protocol(protocol, args, data, load_groups(args, data))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result
