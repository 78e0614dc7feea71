"""Classifier checkpoints: a fine-tuned network (or a self-trained student) as plain tensors and
plain values, read back with ``torch.load(weights_only=True)`` and rebuilt from what it records,
never by unpickling objects.

    {"format": "sslzoo-classifier/1", "kind": "finetuned" | "student", "state_dict": {...},
     "num_classes": int, "label_fraction": float, "seed": int, "indices_file": str | None,
     "datamodule_hyper_parameters": {"_class_path": ..., ...},
     # finetuned: the pretraining checkpoint, its method and the fine-tuning recipe
     "source_ckpt": str | None, "pretrained": bool,
     "hyper_parameters": {"_class_path": ..., ...}, "recipe": {"name": ..., "settings": {...}},
     # student: its backbone (sslzoo.backbones.build_backbone arguments) and dropout
     "backbone": {"name": ..., "cifar_stem": bool, "kwargs": {...}}, "dropout": float}
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslzoo.backbones import build_backbone
from sslzoo.checkpoints import _import, _init_args, read_checkpoint, write_atomic
from sslzoo.errors import CheckpointError, ConfigError
from sslzoo.eval.finetune_recipes import RECIPES, Recipe
from sslzoo.methods import SSLMethod

FORMAT = "sslzoo-classifier/1"


def class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def plain(value: Any, what: str) -> Any:
    """``value`` if ``torch.load(weights_only=True)`` reads it back; a ConfigError otherwise."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any object torch refuses to load back
        raise ConfigError(
            f"{what} holds objects other than plain values, which a classifier checkpoint "
            "cannot record; fine-tune a method loaded from a checkpoint file"
        ) from error
    return value


def method_record(source: str | Path | None, method: SSLMethod) -> dict[str, Any]:
    """The method's constructor arguments with its class: the checkpoint's own record when
    there is a source file, else the method's hyper-parameters (plain values only)."""
    if source is not None:
        recorded = read_checkpoint(source).get("hyper_parameters") or {}
        if "_class_path" in recorded:
            return dict(recorded)
    hparams = {"_class_path": class_path(method), **_init_args(dict(method.hparams))}
    return plain(hparams, "the method's hyper-parameters")


def data_record(data: Any) -> dict[str, Any]:
    """The datamodule's class and the arguments its constructor takes (the base class records
    its own too, which a subclass may not accept)."""
    accepted = inspect.signature(type(data)).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    hparams = {
        k: v for k, v in _init_args(dict(data.hparams)).items() if takes_any or k in accepted
    }
    return plain({"_class_path": class_path(data), **hparams}, "the datamodule's hyper-parameters")


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    return {"name": recipe.name, "settings": dataclasses.asdict(recipe)}


def save_classifier(path: str | Path, net: nn.Module, record: dict[str, Any]) -> Path:
    """Write ``net``'s weights and ``record`` (what rebuilds it) to ``path``, atomically."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    checkpoint = {"format": FORMAT, **plain(record, "the classifier's record"), "state_dict": state}
    write_atomic(path, lambda f: torch.save(checkpoint, f))
    return Path(path)


def student_network(backbone: dict[str, Any], num_classes: int, dropout: float) -> nn.Sequential:
    """``Sequential(backbone, Dropout, Linear)`` from ``build_backbone`` arguments."""
    net = build_backbone(backbone["name"], backbone["cifar_stem"], **backbone["kwargs"])
    return nn.Sequential(net, nn.Dropout(dropout), nn.Linear(net.num_features, num_classes))


def _recipe(record: dict[str, Any]) -> Recipe:
    cls = RECIPES[record["name"]]
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    settings = {
        k: tuple(v) if isinstance(v, list) and "tuple" in str(kinds.get(k)) else v
        for k, v in record["settings"].items()
    }
    return cls(**settings)


def build_classifier(record: dict[str, Any], source: str | Path = "checkpoint") -> nn.Module:
    """The network a classifier record describes, freshly initialised (weights not loaded)."""
    if record.get("kind") == "student":
        return student_network(record["backbone"], record["num_classes"], record["dropout"])
    hparams = record["hyper_parameters"]
    with torch.random.fork_rng():
        method = _import(hparams["_class_path"], SSLMethod, source)(**_init_args(hparams))
    backbone = copy.deepcopy(method.eval_backbone).requires_grad_(True)
    recipe = _recipe(record["recipe"])
    return recipe.classifier(
        backbone, method.projection_mlp, record["num_classes"], record["label_fraction"]
    )


def load_classifier(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode, its record) from a file :func:`save_classifier` wrote."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a classifier checkpoint (write one with `sslzoo eval finetune "
            "--save_to FILE` or `sslzoo selftrain`)"
        )
    record = {k: v for k, v in ckpt.items() if k != "state_dict"}
    net = build_classifier(record, path)
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), record


def finetuned_record(
    ckpt_or_method: Any,
    method: SSLMethod,
    data: Any,
    recipe: Recipe,
    **settings: Any,
) -> dict[str, Any]:
    """The record of a network :func:`sslzoo.eval.finetune.finetune` trained: the
    pretraining checkpoint and its method, the recipe, the data, and ``settings``
    (``num_classes``, ``label_fraction``, ``seed``, ``indices_file``, ``pretrained``)."""
    source = None if isinstance(ckpt_or_method, SSLMethod) else str(Path(ckpt_or_method).resolve())
    return {
        "kind": "finetuned",
        "source_ckpt": source,
        "hyper_parameters": method_record(source, method),
        "datamodule_hyper_parameters": data_record(data),
        "recipe": recipe_record(recipe),
        **settings,
    }
