"""``sslzoo eval all``: every protocol on the trained backbone and on the same architecture
freshly initialised, features extracted once per backbone, one report (Markdown, JSON, PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from sslzoo.datamodules import SSLDataModule
from sslzoo.eval.checkpoint_features import frozen_features
from sslzoo.eval.protocols import (
    NO_SELECTION,
    Groups,
    collapse_protocol,
    fewshot_protocol,
    finetune_protocol,
    knn_protocol,
    probe_protocol,
)
from sslzoo.eval.report import write_report

STAGES = ("knn", "linear", "mlp", "fewshot", "robustness", "finetune")


def report_folder(args: Namespace) -> Path:
    """``--out``, or ``eval_<checkpoint name>`` beside the checkpoint."""
    if args.out:
        return Path(args.out)
    return Path(args.ckpt).resolve().parent / f"eval_{Path(args.ckpt).stem}"


def evaluate_backbone(
    args: Namespace, data: SSLDataModule, trained: bool, groups: Groups | None, out: Path
) -> dict[str, Any]:
    """Every protocol not in ``--skip`` on one backbone."""
    name = "trained" if trained else "untrained"
    print(f"== {name} backbone")
    f = frozen_features(args.ckpt, data, args.device, cache=not args.no_cache, trained=trained)
    result: dict[str, Any] = {"collapse": collapse_protocol(f)}
    probe = (args.probe_epochs, args.probe_lr, args.probe_weight_decay)
    if "knn" not in args.skip:
        result["knn"] = knn_protocol(f, args.k, args.temperature, groups)
    if "linear" not in args.skip:
        result["linear"] = {}
        for fraction in args.label_fractions:
            indices = out / f"indices/linear_{fraction:g}_seed{args.seed}.json"
            scored, _ = probe_protocol(
                f, "linear", fraction, *probe, args.seed, groups, indices_file=indices
            )
            result["linear"][f"{fraction:g}"] = scored
    if "mlp" not in args.skip:
        result["mlp"], _ = probe_protocol(f, "mlp", 1.0, *probe, args.seed, groups)
    if "fewshot" not in args.skip:
        result["fewshot"] = fewshot_protocol(f, args.shots, args.draws, args.C, args.seed, groups)
    if "robustness" not in args.skip:
        from sslzoo.eval.robustness import robustness_protocol

        result["robustness"] = robustness_protocol(args, data, f, trained, probe, groups=groups)
    if "finetune" not in args.skip:
        from sslzoo.eval.finetune import finetune_kwargs

        result["finetune"] = {}
        for fraction in args.label_fractions:
            kwargs = finetune_kwargs(args)
            kwargs.update(
                label_fraction=fraction, pretrained=trained, out_dir=out / "finetune" / name
            )
            teacher = None
            if args.get("selftrain"):
                teacher = out / "finetune" / name / f"finetuned_{fraction:g}.ckpt"
            kwargs["save_to"] = teacher
            result["finetune"][f"{fraction:g}"] = finetune_protocol(
                args.ckpt, data, groups, **kwargs
            )
            if teacher is not None:
                result.setdefault("selftrain", {})[f"{fraction:g}"] = selftrain_protocol(
                    args, data, teacher, out / "selftrain" / name / f"{fraction:g}"
                )
    return result


def selftrain_protocol(
    args: Namespace, data: SSLDataModule, teacher: Path, root: Path
) -> dict[str, Any]:
    """Each ``--selftrain_modes`` mode from the fine-tuned ``teacher``: the test top-1 of
    each round's student (``sslzoo selftrain``'s summary)."""
    from sslzoo.errors import ConfigError, warn_user
    from sslzoo.eval.finetune import finetune_kwargs
    from sslzoo.selftrain.run import SelfTrainSettings, self_train

    common = finetune_kwargs(args)
    found = {}
    for mode in args.selftrain_modes:
        settings = SelfTrainSettings(
            mode=mode,
            iterations=args.selftrain_iterations,
            epochs=args.selftrain_epochs or common.get("epochs"),
            batch_size=common.get("batch_size"),
            lr=common.get("lr"),
        )
        try:
            found[mode] = self_train(
                teacher, data, root / mode, settings, seed=args.seed,
                accelerator=common.get("accelerator", "auto"),
                precision=common.get("precision"), progress_bar=common.get("progress_bar", True),
            )  # fmt: skip
        except ConfigError as error:  # e.g. no pseudo-label above the threshold: the others go on
            warn_user(f"self-training ({mode}) from {teacher}: {error}")
            found[mode] = {"left_out": str(error), "rounds": []}
    return found


def evaluate_all(args: Namespace, data: SSLDataModule, groups: Groups | None) -> dict[str, Any]:
    """Run every protocol on both backbones and write the report into the report folder."""
    if args.get("selftrain") and "finetune" in args.skip:
        from sslzoo.errors import ConfigError

        raise ConfigError("--selftrain true needs fine-tuning: remove finetune from --skip")
    unknown = sorted(set(args.skip) - set(STAGES))
    if unknown:
        from sslzoo.errors import ConfigError

        raise ConfigError(f"--skip: unknown protocol {unknown[0]!r}; choose from {list(STAGES)}")
    out = report_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "ckpt": str(Path(args.ckpt).resolve()),
        "data": {"class": type(data).__name__, **{k: str(v) for k, v in data.hparams.items()}},
        "selection": NO_SELECTION + "; fine-tuning chooses nothing on the test split either "
        "(anything it selects is selected on a validation split carved from its labeled "
        "training subset)",
        "groups_file": args.groups,
        "backbones": {},
    }
    for trained in (True, False):
        name = "trained" if trained else "untrained"
        report["backbones"][name] = evaluate_backbone(args, data, trained, groups, out)
        (out / "report.json").write_text(json.dumps(report, indent=2))  # partial results kept
    write_report(report, out)
    print(f"report written to {out}/report.md")
    return report
