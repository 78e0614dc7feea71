"""Fine-tuning with a fraction of the labels: the whole pretrained backbone and a new linear
classifier trained on a class-balanced subset of the labeled training images, then tested.

    subset = balanced_subset(train labels, label_fraction, seed)      # written to out_dir
    net = classifier(backbone [+ first projection-head layers], num_classes)
    train net on subset with the recipe (SimCLR v2's for convnets, MAE's for ViTs)
    report top-1 / top-5 / ECE on the test images at the last epoch

The recipes and their official defaults are in :mod:`.finetune_recipes`. Nothing is chosen
during training (no early stopping, no epoch picked): with ``val_fraction`` a validation split
is carved from the subset, left out of training and only reported.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse import ArgumentParser, Namespace
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from sslzoo.checkpoints import load_method
from sslzoo.datamodules import SSLDataModule
from sslzoo.errors import ConfigError, warn_user
from sslzoo.eval.finetune_recipes import Recipe, choose_recipe
from sslzoo.eval.labels import balanced_subset, carve_validation, write_indices
from sslzoo.methods import SSLMethod


class FinetuneModule(L.LightningModule):
    """Trains ``net`` with a recipe's optimizer, per-step learning rate, batch mixing and loss;
    ``predict_step`` gives logits."""

    def __init__(self, net: nn.Module, recipe: Recipe, num_classes: int, batch_size: int) -> None:
        super().__init__()
        self.net = net
        self.recipe = recipe
        self.mixing = recipe.mixing(num_classes)
        self.batch_size = batch_size  # per device
        self.peak_lr = 0.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_fit_start(self) -> None:
        # a backbone from load_method is in eval mode: its BatchNorm must train
        self.net.train()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainer = self.trainer
        batch = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        self.peak_lr = self.recipe.peak_lr(batch)
        return self.recipe.optimizer(self.recipe.param_groups(self.net), self.peak_lr)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        trainer = self.trainer
        steps_per_epoch = max(1, math.ceil(trainer.num_training_batches))
        lr = self.recipe.lr_at(
            self.global_step, trainer.estimated_stepping_batches, steps_per_epoch, self.peak_lr
        )
        for group in self.optimizers(use_pl_optimizer=False).param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.log("train/lr", lr)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.mixing is not None:
            images, labels = self.mixing(images, labels)
        loss = self.recipe.loss(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).float()


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The labels of a labeled dataset (its ``labels`` or ``targets``, else read item by item)."""
    for name in ("labels", "targets"):
        if hasattr(dataset, name):
            return torch.as_tensor(list(getattr(dataset, name)), dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def _method(ckpt_or_method: str | Path | SSLMethod) -> SSLMethod:
    if isinstance(ckpt_or_method, SSLMethod):
        return ckpt_or_method
    return load_method(ckpt_or_method)


def untrained_copy(method: SSLMethod) -> SSLMethod:
    """The same method, same architecture, freshly initialised (its constructor arguments)."""
    args = {k: v for k, v in method.hparams.items() if not k.startswith("_")}
    return type(method)(**args)


def _loader(data: SSLDataModule, dataset: Dataset, batch: int, train: bool, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed) if train else None
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=train,
        drop_last=train,
        generator=generator,
        num_workers=data.num_workers,
        pin_memory=data.pin_memory,
        persistent_workers=False,
    )


def _trainer(
    epochs: int, accelerator: str, devices: int, precision: str | None, bar: bool
) -> L.Trainer:
    if precision is None:
        gpu = accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        )
        precision = "bf16-mixed" if gpu else "32-true"
    return L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        num_sanity_val_steps=0,
    )


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    result = {
        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")(logits, labels).item()
    }
    if num_classes > 5:
        top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")(logits, labels)
        result["top5"] = top5.item()
    ece = MulticlassCalibrationError(num_classes, n_bins=15, norm="l1")
    result["ece"] = ece(logits.softmax(1), labels).item()
    return result


def finetune(
    ckpt_or_method: str | Path | SSLMethod,
    data: SSLDataModule,
    label_fraction: float = 0.1,
    seed: int = 0,
    out_dir: str | Path | None = None,
    recipe: str | Recipe = "auto",
    pretrained: bool = True,
    val_fraction: float = 0.0,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    precision: str | None = None,
    progress_bar: bool = True,
    save_to: str | Path | None = None,
    **recipe_settings: Any,
) -> dict[str, Any]:
    """Fine-tune the eval backbone of a checkpoint (or method) on ``label_fraction`` of the
    labeled training images of ``data``, balanced over classes and drawn from ``seed``, and
    test it on ``data``'s test images at the last epoch.

    Args:
        ckpt_or_method: a checkpoint written by ``sslzoo fit``, or the method itself (not
            changed: its backbone is copied).
        data: the labeled data (:meth:`SSLDataModule.labeled_splits`).
        label_fraction: share of each class's labeled images trained on, in (0, 1].
        seed: seed of the subset, of the classifier's initialisation and of the training.
        out_dir: where ``finetune_indices_{label_fraction}.json`` (the images trained on) is
            written; nothing is written without it.
        recipe: ``auto`` (MAE's for a ViT, SimCLR v2's otherwise), ``simclrv2``, ``mae``, or
            a recipe instance.
        pretrained: ``False`` fine-tunes the same architecture freshly initialised (the
            baseline the pretrained backbone should beat).
        val_fraction: share of the subset held out as a validation split, reported only.
        epochs, batch_size, lr: override the recipe's (lr: before batch scaling).
        accelerator, devices, precision: Lightning's; precision ``None``: bf16-mixed on a
            GPU, 32-true on the CPU.
        progress_bar: Lightning's progress bar.
        save_to: write the fine-tuned network here as a classifier checkpoint
            (:mod:`sslzoo.eval.classifier_checkpoint`), the teacher of ``sslzoo selftrain``.
        recipe_settings: other settings of the recipe (``from_head_layer``, ``mixup``...).

    Returns:
        A dict of the settings and results: ``finetune_top1``, ``finetune_top5`` (more than
        five classes), ``finetune_ece`` (15-bin expected calibration error), ``val_top1``
        with a validation split, ``selection``, and the tensors ``test_labels`` and
        ``test_predictions`` (per test image, in the test split's order).
    """
    method = _method(ckpt_or_method)
    if not pretrained:
        torch.manual_seed(seed)
        method = untrained_copy(method)
    backbone = copy.deepcopy(method.eval_backbone).requires_grad_(True)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, **recipe_settings}
    chosen = choose_recipe(recipe, backbone, **settings)
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")

    train_set, test_set = data.labeled_splits(chosen.train_transform(data), data.eval_transform())
    labels = dataset_labels(train_set)
    num_classes = data.num_classes or int(labels.max()) + 1
    subset = balanced_subset(labels, fraction=label_fraction, seed=seed)
    train_idx, val_idx = subset, torch.empty(0, dtype=torch.long)
    if val_fraction > 0:
        train_idx, val_idx = carve_validation(labels, subset, val_fraction, seed)
    indices_file = None
    if out_dir is not None:
        indices_file = Path(out_dir) / f"finetune_indices_{label_fraction:g}.json"
        write_indices(
            indices_file, train=train_idx, val=val_idx, label_fraction=label_fraction, seed=seed
        )

    # torch, random and numpy, as seed_everything seeds them, without its environment
    # variables (the process's global seed stays the caller's); workers derive their own
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    net = chosen.classifier(backbone, method.projection_mlp, num_classes, label_fraction)
    batch = chosen.batch_size
    if len(train_idx) < batch:
        warn_user(
            f"{len(train_idx)} labeled images to fine-tune on, fewer than the batch of {batch}: "
            f"batches of {len(train_idx)} instead"
        )
        batch = len(train_idx)
    n_epochs = chosen.epochs_for(label_fraction)
    module = FinetuneModule(net, chosen, num_classes, batch)
    trainer = _trainer(n_epochs, accelerator, devices, precision, progress_bar)
    trainer.fit(module, _loader(data, Subset(train_set, train_idx.tolist()), batch, True, seed))

    def predict(dataset: Dataset) -> torch.Tensor:
        loader = _loader(data, dataset, data.batch_size, False, seed)
        return torch.cat(trainer.predict(module, loader))

    logits = predict(test_set)
    test_labels = dataset_labels(test_set)
    result: dict[str, Any] = {
        "protocol": "finetune",
        "recipe": chosen.name,
        "recipe_settings": dataclasses.asdict(chosen),
        "pretrained": pretrained,
        "label_fraction": label_fraction,
        "seed": seed,
        "epochs": n_epochs,
        "batch_size": batch * trainer.world_size,
        "peak_lr": module.peak_lr,
        "from_head_layer": chosen.head_layer_count(label_fraction),
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "test_images": len(test_labels),
        "indices_file": None if indices_file is None else str(indices_file),
        "selection": "none: the last epoch's weights, trained on the label subset only"
        + ("; the validation split carved from it is reported, not used" if len(val_idx) else ""),
    }
    result.update(
        {f"finetune_{k}": v for k, v in _accuracy(logits, test_labels, num_classes).items()}
    )
    if len(val_idx):
        val_set = Subset(data.labeled_splits(data.eval_transform(), data.eval_transform())[0],
                         val_idx.tolist())  # fmt: skip
        val_logits = predict(val_set)
        result["val_top1"] = _accuracy(val_logits, labels[val_idx], num_classes)["top1"]
    if save_to is not None:
        saved = _save(save_to, ckpt_or_method, method, data, chosen, result, num_classes, net)
        result["saved_to"] = str(saved)
    result["test_labels"] = test_labels
    result["test_predictions"] = logits.argmax(1)
    return result


def _save(
    path: str | Path, source: Any, method: SSLMethod, data: SSLDataModule, recipe: Recipe,
    result: dict[str, Any], num_classes: int, net: nn.Module,
) -> Path:  # fmt: skip
    from sslzoo.eval.classifier_checkpoint import finetuned_record, save_classifier

    keys = ("label_fraction", "seed", "indices_file", "pretrained")
    record = finetuned_record(
        source, method, data, recipe, num_classes=num_classes, **{k: result[k] for k in keys}
    )
    return save_classifier(path, net, record)


FINETUNE_OPTIONS = ("label_fraction", "seed", "out_dir", "recipe", "pretrained", "val_fraction",
                    "epochs", "batch_size", "lr", "precision", "from_head_layer", "layer_decay",
                    "drop_path", "mixup", "cutmix", "progress_bar", "save_to")  # fmt: skip


def add_finetune_arguments(parser: ArgumentParser) -> None:
    """Add ``sslzoo eval finetune``'s options to ``parser`` (read back by
    :func:`finetune_kwargs`)."""
    parser.add_argument(
        "--label_fraction",
        type=float,
        default=0.1,
        help="share of each class's labeled training images (0.01, 0.1, 1.0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the label subset and run")
    parser.add_argument(
        "--out_dir",
        type=str | None,
        default=None,
        help="write finetune_indices_{label_fraction}.json here",
    )
    parser.add_argument(
        "--recipe",
        type=str,
        default="auto",
        help="auto (mae for ViTs, simclrv2 otherwise), simclrv2 or mae",
    )
    parser.add_argument(
        "--pretrained",
        type=bool,
        default=True,
        help="false: the same architecture freshly initialised (baseline)",
    )
    parser.add_argument(
        "--val_fraction",
        type=float,
        default=0.0,
        help="hold out this share of the subset as a reported validation split",
    )
    parser.add_argument(
        "--epochs",
        type=int | None,
        default=None,
        help="default: the recipe's (simclrv2: 60 at 1%% labels, else 30; mae: 100)",
    )
    parser.add_argument("--batch_size", type=int | None, default=None, help="default 1024")
    parser.add_argument(
        "--lr",
        type=float | None,
        default=None,
        help="before batch scaling; default simclrv2 0.005 x sqrt(B), mae 5e-4 x B/256",
    )
    parser.add_argument(
        "--precision",
        type=str | None,
        default=None,
        help="Lightning precision; default bf16-mixed on a GPU, 32-true on CPU",
    )
    parser.add_argument(
        "--from_head_layer",
        type=int | None,
        default=None,
        help="simclrv2: projection-head layers kept (default 1 below 100%% labels, else 0)",
    )
    parser.add_argument(
        "--layer_decay",
        type=float | None,
        default=None,
        help="mae: layer-wise lr decay (default 0.65 for ViT-B, else 0.75)",
    )
    parser.add_argument("--drop_path", type=float | None, default=None, help="mae: default 0.1")
    parser.add_argument("--mixup", type=float | None, default=None, help="mae: default 0.8, 0 off")
    parser.add_argument("--cutmix", type=float | None, default=None, help="mae: default 1.0, 0 off")
    parser.add_argument("--progress_bar", type=bool, default=True)  # fmt: skip
    parser.add_argument(
        "--save_to",
        type=str | None,
        default=None,
        help="write the fine-tuned network here (a classifier checkpoint for sslzoo selftrain)",
    )


def finetune_kwargs(args: Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`finetune` from parsed options (those of
    :func:`add_finetune_arguments`, and ``--device`` where the parser has it)."""
    kwargs = {k: args[k] for k in FINETUNE_OPTIONS if k in args}
    device = args.get("device")
    if device is not None:
        kwargs["accelerator"] = "gpu" if str(device).startswith("cuda") else str(device)
    return kwargs
