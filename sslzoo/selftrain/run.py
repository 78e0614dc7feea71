"""Rounds of self-training: a fine-tuned teacher (a classifier checkpoint) teaches a student
on the unlabeled training images; with ``iterations`` > 1 the student becomes the next teacher.

    labeled = the fine-tuning run's subset (its index file); unlabeled = every training image
              but the validation split, labels unused; never a test image
    for round in 1..iterations:
        student = backbone (the teacher's architecture unless chosen) from scratch + linear
        distill:        student learns softmax(teacher(x) / tau) on the same augmented x
        noisy-student:  pseudo-labels from the teacher on clean images (eval mode, no
                        augmentation), filtered by confidence; student trained with noise
                        (RandAugment, dropout, stochastic depth) on labeled + pseudo-labeled
        test the student at the last epoch; it becomes the teacher

Each round writes ``ROOT/round_R/version_N/`` (TensorBoard, ``metrics.csv``,
``checkpoints/last.ckpt``, ``student.ckpt``, ``result.json``); ``ckpt_path="last"`` resumes.
Nothing is selected: each student is its last epoch's weights.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sslzoo.checkpoints import AtomicCheckpointIO
from sslzoo.datamodules import SSLDataModule
from sslzoo.errors import ConfigError, warn_user
from sslzoo.eval.classifier_checkpoint import (
    data_record,
    load_classifier,
    save_classifier,
    student_network,
)
from sslzoo.eval.finetune import _accuracy, _loader, dataset_labels
from sslzoo.eval.finetune_recipes import SimCLRv2Finetune
from sslzoo.eval.labels import read_indices, write_indices
from sslzoo.runs import plan_run, run_loggers
from sslzoo.selftrain.module import Mode, SelfTrainModule
from sslzoo.selftrain.pseudo_labels import NormalizedSelfTrainingLoss, pseudo_labels
from sslzoo.selftrain.student import (
    PseudoLabeled,
    Unlabeled,
    backbone_arguments,
    noisy,
    parameter_count,
    with_drop_path,
)


@dataclass(frozen=True)
class SelfTrainSettings:
    """How the student learns.

    Args:
        mode: ``distill`` (SimCLR v2 step 3) or ``noisy-student`` (Xie et al. 2020).
        student: backbone name for :func:`sslzoo.backbones.build_backbone` (``timm/...``,
            ``tv/...``); ``None``: the teacher's architecture. Always initialised from
            scratch, as both papers do (SimCLR v2's self-distillation too).
        student_kwargs: constructor arguments of ``student`` (``None``: the teacher's when
            the architecture is the teacher's, else none).
        temperature: distill: tau of teacher and student softmax (SimCLR v2 uses 1).
        alpha: distill: weight of the distillation loss, ``1 - alpha`` that of the labeled
            loss; 1 (unlabeled images only) is the paper's main setting.
        hard: noisy-student: one-hot pseudo-labels instead of the teacher's probabilities.
        threshold: noisy-student: keep images whose top teacher probability is at least this
            (Noisy Student filters below 0.3).
        pseudo_weight: noisy-student: alpha of Zoph et al.'s ``L_h + alpha * L_s``.
        normalize_loss: noisy-student: Zoph et al.'s loss normalisation by moving averages.
        loss_momentum: momentum of those moving averages (not given in the paper).
        dropout: before the classifier; ``None``: 0.5 for noisy-student (Noisy Student's),
            0 for distill.
        drop_path: stochastic depth of the last block (timm backbones); ``None``: 0.2 for
            noisy-student (survival 0.8 at the last layer), 0 for distill.
        randaugment_ops, randaugment_magnitude: noisy-student's RandAugment (N=2, M=27).
        iterations: rounds; each student teaches the next.
        epochs, batch_size, lr, weight_decay: the student's optimisation, SimCLR v2's
            fine-tuning recipe (LARS, cosine, crop + flip) with these overrides; an epoch is a
            pass over the unlabeled images.
    """

    mode: Mode = "distill"
    student: str | None = None
    student_kwargs: dict[str, Any] | None = None
    temperature: float = 1.0
    alpha: float = 1.0
    hard: bool = False
    threshold: float = 0.3
    pseudo_weight: float = 1.0
    normalize_loss: bool = True
    loss_momentum: float = 0.99
    dropout: float | None = None
    drop_path: float | None = None
    randaugment_ops: int = 2
    randaugment_magnitude: int = 27
    iterations: int = 1
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None

    def noise(self) -> tuple[float, float]:
        """(dropout, drop path) of the student."""
        default = (0.5, 0.2) if self.mode == "noisy-student" else (0.0, 0.0)
        dropout = default[0] if self.dropout is None else self.dropout
        return dropout, default[1] if self.drop_path is None else self.drop_path


def labeled_split(record: dict[str, Any], train_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labeled, validation) indices of the teacher's fine-tuning run, from its index file."""
    path = record.get("indices_file")
    if not path or not Path(path).is_file():
        raise ConfigError(
            f"the teacher records no readable index file ({path!r}): fine-tune it with --out_dir "
            "so the labeled subset is written, and keep that file"
        )
    labeled, val = read_indices(path, "train"), read_indices(path, "val")
    if len(labeled) and int(labeled.max()) >= train_size:
        raise ConfigError(f"{path}: indices beyond the {train_size} training images of the data")
    return labeled, val


# datamodule arguments that change how images are loaded, not which images there are
RUNTIME_ARGUMENTS = ("batch_size", "num_workers", "pin_memory", "device_augment", "compile_augment")


def check_same_data(record: dict[str, Any], data: SSLDataModule) -> None:
    """Refuse data whose images may differ from those the teacher's index file counts (an
    argument both record, other than how images are loaded, has another value)."""
    recorded = record.get("datamodule_hyper_parameters") or {}
    used = data_record(data)
    differ = sorted(
        k for k in set(recorded) & set(used)
        if k not in RUNTIME_ARGUMENTS and recorded[k] != used[k]
    )  # fmt: skip
    if differ:
        raise ConfigError(
            f"the data differs from the teacher's fine-tuning data in {', '.join(differ)} "
            f"({', '.join(f'{k}={used.get(k)!r} vs {recorded.get(k)!r}' for k in differ)}); "
            "its index file counts the images of that data"
        )


def _device(accelerator: str) -> torch.device:
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


@torch.no_grad()
def predict_logits(net: nn.Module, dataset: Dataset, data: SSLDataModule, device: Any) -> Any:
    """Logits of ``net`` in eval mode on ``dataset``'s images, in order."""
    net = net.eval().to(device)
    out = [net(x.to(device)).float().cpu() for x, _ in _loader(data, dataset, 256, False, 0)]
    net.cpu()
    return torch.cat(out)


def _student(settings: SelfTrainSettings, teacher: nn.Module, num_classes: int) -> tuple:
    arguments = backbone_arguments(teacher)
    if settings.student is not None:
        same = settings.student == arguments["name"]
        kwargs = arguments["kwargs"] if same and settings.student_kwargs is None else {}
        arguments = {**arguments, "name": settings.student, "kwargs": kwargs}
    if settings.student_kwargs is not None:
        arguments = {**arguments, "kwargs": dict(settings.student_kwargs)}
    dropout, drop_path = settings.noise()
    arguments = with_drop_path(arguments, drop_path)
    student = student_network(arguments, num_classes, dropout)
    if settings.mode == "distill" and parameter_count(student) > parameter_count(teacher):
        warn_user(
            f"the student ({parameter_count(student)} parameters) is larger than its teacher "
            f"({parameter_count(teacher)}); SimCLR v2 distils into equal or smaller networks"
        )
    return student, arguments, dropout


def self_train(
    teacher_ckpt: str | Path,
    data: SSLDataModule,
    root: str | Path,
    settings: SelfTrainSettings | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
    ckpt_path: str | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    precision: str | None = None,
    progress_bar: bool = True,
    limit_train_batches: int | float | None = None,
) -> dict[str, Any]:
    """Self-train students from the classifier checkpoint ``teacher_ckpt`` on ``data``; see
    the module's docstring. Returns the teacher's and each round's test results."""
    settings = settings or SelfTrainSettings()
    teacher, record = load_classifier(teacher_ckpt)
    fraction = record["label_fraction"]
    if label_fraction is not None and abs(label_fraction - fraction) > 1e-12:
        raise ConfigError(
            f"--label_fraction {label_fraction:g}: the teacher was fine-tuned on {fraction:g} "
            "of the labels; self-training reuses that subset"
        )
    check_same_data(record, data)
    num_classes = record["num_classes"]
    overrides = {"epochs": settings.epochs, "batch_size": settings.batch_size,
                 "lr": settings.lr, "weight_decay": settings.weight_decay}  # fmt: skip
    recipe = dataclasses.replace(
        SimCLRv2Finetune(), **{k: v for k, v in overrides.items() if v is not None}
    )
    clean_train, test_set = data.labeled_splits(data.eval_transform(), data.eval_transform())
    train_transform = recipe.train_transform(data)
    if settings.mode == "noisy-student":
        train_transform = noisy(
            train_transform, settings.randaugment_ops, settings.randaugment_magnitude
        )
    train_set = data.labeled_splits(train_transform, data.eval_transform())[0]
    labels = dataset_labels(clean_train)
    labeled, val = labeled_split(record, len(labels))
    pool = torch.ones(len(labels), dtype=torch.bool)
    pool[val] = False
    unlabeled = pool.nonzero().squeeze(1)
    device = _device(accelerator)
    test_labels = dataset_labels(test_set)
    root = Path(root)
    # the images each round trains on, beside the runs: the fine-tuning run's labeled subset
    write_indices(root / "selftrain_indices.json", labeled=labeled, val=val,
                  unlabeled=unlabeled, source=str(record["indices_file"]))  # fmt: skip
    teacher_logits = predict_logits(teacher, test_set, data, device)
    summary: dict[str, Any] = {
        "teacher_ckpt": str(teacher_ckpt),
        "settings": dataclasses.asdict(settings),
        "label_fraction": fraction,
        "labeled_images": len(labeled),
        "unlabeled_images": len(unlabeled),
        "val_images": len(val),
        "indices_file": record["indices_file"],
        "selection": "none: each student is its last epoch's weights; test images never trained on",
        "teacher": _accuracy(teacher_logits, test_labels, num_classes),
        "rounds": [],
    }
    source = str(teacher_ckpt)
    for round_index in range(settings.iterations):
        torch.manual_seed(seed + round_index)
        student, arguments, dropout = _student(settings, teacher, num_classes)
        batch = min(recipe.batch_size, len(unlabeled))
        loaders: dict[str, DataLoader] = {}
        pseudo_loss, kept_count = None, len(unlabeled)
        if settings.mode == "noisy-student":
            logits = predict_logits(teacher, Subset(clean_train, unlabeled.tolist()), data, device)
            targets, kept = pseudo_labels(logits, settings.hard, settings.threshold)
            kept_count = int(kept.sum())
            if kept_count == 0:
                raise ConfigError(f"--threshold {settings.threshold}: no pseudo-label kept")
            batch = min(batch, kept_count)
            unlabeled_set = PseudoLabeled(train_set, unlabeled[kept], targets[kept])
            pseudo_loss = NormalizedSelfTrainingLoss(
                settings.pseudo_weight, settings.loss_momentum, settings.normalize_loss
            )
        else:
            unlabeled_set = Unlabeled(train_set, unlabeled)
        loaders["unlabeled"] = _loader(data, unlabeled_set, batch, True, seed + round_index)
        if settings.mode == "noisy-student" or settings.alpha < 1:
            labeled_batch = min(batch, len(labeled))
            loaders["labeled"] = _loader(
                data, Subset(train_set, labeled.tolist()), labeled_batch, True, seed + round_index
            )
        module = SelfTrainModule(
            student, teacher if settings.mode == "distill" else None, recipe, num_classes,
            batch, settings.mode, settings.temperature, settings.alpha, pseudo_loss,
        )  # fmt: skip
        plan = plan_run(root / f"round_{round_index}", ckpt_path, resume=True)
        if plan.resumes:  # of course its checkpoints folder is not empty
            warnings.filterwarnings("ignore", message="Checkpoint directory .* not empty")
        trainer = _trainer(plan.directory, plan.resumes, recipe.epochs_for(fraction), accelerator,
                           devices, precision, progress_bar, limit_train_batches)  # fmt: skip
        trainer.fit(module, CombinedLoader(loaders, "max_size_cycle"), ckpt_path=plan.ckpt_path)
        student_record = {
            "kind": "student",
            "backbone": arguments,
            "dropout": dropout,
            "num_classes": num_classes,
            "label_fraction": fraction,
            "seed": seed,
            "indices_file": record["indices_file"],
            "teacher_ckpt": source,
            "mode": settings.mode,
            "round": round_index + 1,
            "datamodule_hyper_parameters": data_record(data),
        }
        saved = save_classifier(plan.directory / "student.ckpt", student, student_record)
        result = {
            "round": round_index + 1,
            "run_dir": str(plan.directory),
            "student_ckpt": str(saved),
            "student": arguments,
            "pseudo_labeled_images": kept_count,
            "epochs": recipe.epochs_for(fraction),
            "global_step": trainer.global_step,
            **_accuracy(predict_logits(student, test_set, data, device), test_labels, num_classes),
        }
        if len(val):
            val_logits = predict_logits(student, Subset(clean_train, val.tolist()), data, device)
            result["val_top1"] = _accuracy(val_logits, labels[val], num_classes)["top1"]
        (plan.directory / "result.json").write_text(json.dumps(result, indent=2))
        summary["rounds"].append(result)
        teacher, source = student.eval(), str(saved)
    root.mkdir(parents=True, exist_ok=True)
    (root / "selftrain.json").write_text(json.dumps(summary, indent=2))
    return summary


def _trainer(
    directory: Path, resumes: bool, epochs: int, accelerator: str, devices: int,
    precision: str | None, bar: bool, limit_train_batches: int | float | None,
) -> L.Trainer:  # fmt: skip
    from sslzoo.cli import default_checkpoints

    if precision is None:
        precision = "bf16-mixed" if _device(accelerator).type == "cuda" else "32-true"
    return L.Trainer(
        default_root_dir=directory,
        max_epochs=epochs,
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=run_loggers(directory, resumes),
        callbacks=default_checkpoints(directory / "checkpoints", None),
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        enable_progress_bar=bar,
        num_sanity_val_steps=0,
        limit_train_batches=limit_train_batches,
        log_every_n_steps=1 if limit_train_batches else 50,
    )
