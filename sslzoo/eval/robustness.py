"""Robustness to common corruptions: the clean test images corrupted on the fly (the families
of CIFAR-10-C / ImageNet-C, :mod:`sslzoo.eval.corruptions`) at each severity, classified with
the kNN bank and the probe fitted on clean training features."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jsonargparse import Namespace
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sslzoo.checkpoints import load_method
from sslzoo.datamodules import SSLDataModule
from sslzoo.eval.checkpoint_features import Features, unnormalized_test_images
from sslzoo.eval.groups import group_accuracy
from sslzoo.eval.knn import knn_predict
from sslzoo.eval.protocols import knn_protocol, probe_protocol

Classify = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def corrupted_features(
    backbone: nn.Module,
    images: Dataset,
    corruption: str,
    severity: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Features of ``images`` (``(image in [0, 1], label)`` items at the evaluation size), each
    batch corrupted with a generator seeded by (seed, corruption, severity, batch), then
    normalised with ``mean`` and ``std``."""
    from sslzoo.eval.corruptions import corrupt

    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    base = zlib.crc32(corruption.encode()) + 7919 * severity + 1_000_003 * seed
    was_training = backbone.training
    backbone.eval()
    feats = []
    for b, (x, _) in enumerate(DataLoader(images, batch_size=batch_size, shuffle=False)):
        generator = torch.Generator(device=device).manual_seed((base + b) % 2**63)
        x = corrupt(x.to(device).float(), corruption, severity, generator)
        feats.append(backbone((x - mean_t) / std_t).float().cpu())
    backbone.train(was_training)
    return torch.cat(feats)


def robustness(
    backbone: nn.Module,
    images: Dataset,
    labels: torch.Tensor,
    classifiers: dict[str, Classify],
    corruptions: Sequence[str],
    severities: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    clean: dict[str, float],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    groups: tuple[torch.Tensor, list[str]] | None = None,
) -> dict[str, object]:
    """Accuracy of each classifier (name -> features -> predicted labels, fitted on clean
    training features) for every corruption and severity; per classifier the mean corruption
    accuracy (over corruptions and severities) and its drop from the clean accuracy, and with
    ``groups`` each group's accuracy over all corruptions and severities."""
    table: dict[str, dict[str, dict[str, float]]] = {name: {} for name in classifiers}
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in classifiers}
    pairs = [(c, s) for c in corruptions for s in severities]
    for corruption, severity in tqdm(pairs, desc="corruptions", disable=not progress):
        feats = corrupted_features(
            backbone, images, corruption, severity, mean, std, device, batch_size, seed
        )
        for name, classify in classifiers.items():
            predicted = classify(feats)
            predictions[name].append(predicted)
            accuracy = float((predicted == labels).float().mean())
            table[name].setdefault(corruption, {})[str(severity)] = accuracy
    summary = {}
    for name in classifiers:
        values = [a for by_severity in table[name].values() for a in by_severity.values()]
        mean_accuracy = sum(values) / len(values)
        summary[name] = {
            "clean": clean[name],
            "mean_corruption_accuracy": mean_accuracy,
            "drop": clean[name] - mean_accuracy,
        }
        if groups is not None:
            group_of, names = groups
            summary[name]["groups"] = group_accuracy(
                torch.cat(predictions[name]),
                labels.repeat(len(pairs)),
                group_of.repeat(len(pairs)),
                names,
            )
    return {"accuracy": table, "summary": summary}


def knn_classifier(
    bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int, temperature: float
) -> Classify:
    """Features -> labels by the weighted kNN vote of ``bank``."""
    return lambda x: knn_predict(x, bank, bank_labels, num_classes, k, temperature).argmax(1)


def robustness_protocol(
    args: Namespace,
    data: SSLDataModule,
    f: Features,
    trained: bool,
    probe_settings: tuple[int, float, float],
    progress: bool = True,
    groups: tuple[torch.Tensor, list[str]] | None = None,
) -> dict[str, Any]:
    """kNN (the first k, temperature) and a linear probe fitted on clean training features,
    on the test images under every corruption and severity."""
    from sslzoo.eval.corruptions import LEFT_OUT, corruption_names

    epochs, lr, wd = probe_settings
    k, t = args.k[0], args.temperature[0]
    clean_knn = knn_protocol(f, [k], [t])[f"k{k}_t{t:g}"]["top1"]
    clean_linear, probe = probe_protocol(f, "linear", 1.0, epochs, lr, wd, args.seed)
    model = load_method(args.ckpt, trained=trained).to(args.device)
    classifiers = {
        "knn": knn_classifier(f.train, f.train_labels, f.num_classes, k, t),
        "linear": probe.predict,
    }
    result = robustness(
        model.eval_backbone,
        unnormalized_test_images(data),
        f.test_labels,
        classifiers,
        args.corruptions or corruption_names(),
        args.severities,
        data.mean,
        data.std,
        {"knn": clean_knn, "linear": clean_linear["top1"]},
        args.device,
        data.batch_size,
        args.seed,
        progress,
        groups,
    )
    result["left_out"] = dict(LEFT_OUT)
    for name, summary in result["summary"].items():
        print(
            f"{name:<7} clean {summary['clean']:.4f}  mean corrupted "
            f"{summary['mean_corruption_accuracy']:.4f}  drop {summary['drop']:.4f}"
        )
    return result
