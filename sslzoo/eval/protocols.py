"""The protocols on frozen features, each returning a JSON-ready result: kNN, linear / MLP
probes (on all labels or a class-balanced fraction), few-shot, collapse metrics; with groups,
every protocol also reports accuracy per group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from sslzoo.eval.collapse import feature_std, rankme
from sslzoo.eval.fewshot import fewshot_accuracy
from sslzoo.eval.groups import group_accuracy
from sslzoo.eval.knn import knn_predict
from sslzoo.eval.labels import balanced_subset, write_indices
from sslzoo.eval.probes import Head, Probe, fit_probe

NO_SELECTION = "none: final-epoch accuracy, trained on the training split only"


@dataclass
class Features:
    """Frozen features of the labeled training split (the kNN bank) and the test split."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


Groups = tuple[torch.Tensor, list[str]]


def _scored(predicted: torch.Tensor, f: Features, groups: Groups | None) -> dict[str, object]:
    result: dict[str, object] = {"top1": float((predicted == f.test_labels).float().mean())}
    if groups is not None:
        result["groups"] = group_accuracy(predicted, f.test_labels, *groups)
    return result


def knn_protocol(
    f: Features,
    k: Sequence[int] = (20, 200),
    temperature: Sequence[float] = (0.07, 0.1),
    groups: Groups | None = None,
) -> dict[str, object]:
    """Weighted kNN for each (k, temperature) pair: ``{"k20_t0.07": {"top1": ...}}``."""
    result = {}
    for kk, t in zip(k, temperature, strict=True):
        scores = knn_predict(f.test, f.train, f.train_labels, f.num_classes, kk, t)
        result[f"k{kk}_t{t:g}"] = _scored(scores.argmax(1), f, groups)
    return result


def probe_protocol(
    f: Features,
    head: Head = "linear",
    label_fraction: float = 1.0,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    groups: Groups | None = None,
    indices_file: str | Path | None = None,
) -> tuple[dict[str, object], Probe]:
    """A probe on the features of a class-balanced ``label_fraction`` of the training labels
    (all of them at 1.0; the chosen indices written to ``indices_file``): its top-1 and its
    expected calibration error (15 bins, torchmetrics)."""
    idx = torch.arange(len(f.train_labels))
    if label_fraction < 1:
        idx = balanced_subset(f.train_labels, fraction=label_fraction, seed=seed)
    if indices_file is not None:
        write_indices(indices_file, train=idx, label_fraction=label_fraction, seed=seed)
    probe = fit_probe(
        f.train[idx], f.train_labels[idx], f.num_classes, head, epochs, lr, weight_decay, seed=seed
    )
    with torch.no_grad():
        probabilities = probe.eval()(f.test).softmax(1)
    result = _scored(probabilities.argmax(1), f, groups)
    result["ece"] = float(
        multiclass_calibration_error(probabilities, f.test_labels, f.num_classes, n_bins=15)
    )
    result.update(head=head, label_fraction=label_fraction, labeled_images=len(idx), epochs=epochs)
    return result, probe


def fewshot_protocol(
    f: Features,
    shots: Sequence[int] = (1, 5, 10),
    draws: int = 5,
    c: float = 1.0,
    seed: int = 0,
    groups: Groups | None = None,
) -> dict[str, object]:
    """Logistic regression on ``shots`` labeled images per class, ``draws`` draws each."""
    result = fewshot_accuracy(
        f.train, f.train_labels, f.test, f.test_labels, shots, draws, c, seed, groups
    )
    return {"shots": result, "draws": draws, "C": c}


def collapse_protocol(f: Features, samples: int = 4096) -> dict[str, float]:
    """RankMe and the feature spread on (at most ``samples`` of) the training features."""
    return {"rankme": rankme(f.train[:samples]), "feature_std": feature_std(f.train[:samples])}


def finetune_protocol(ckpt: str, data: Any, groups: Groups | None, **kwargs: Any) -> dict[str, Any]:
    """:func:`sslzoo.eval.finetune.finetune`, its per-image predictions turned into accuracy
    per group; ``top1`` is the fine-tuned test top-1."""
    from sslzoo.eval.finetune import finetune

    result = finetune(ckpt, data, **kwargs)
    labels, predicted = result.pop("test_labels"), result.pop("test_predictions")
    result["top1"] = result["finetune_top1"]
    if groups is not None:
        result["groups"] = group_accuracy(predicted, labels, *groups)
    return result
