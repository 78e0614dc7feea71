"""Few-shot classification on frozen features: logistic regression on k labeled images per
class, several draws of the shots (the few-shot protocol of DINOv2 / DINOv3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sslzoo.eval.groups import group_accuracy
from sslzoo.eval.labels import balanced_subset


def logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, c: float = 1.0, max_iter: int = 1000
):
    """scikit-learn's multinomial logistic regression (L-BFGS, L2 penalty of strength 1 / c)
    on L2-normalised features: a maintained solver that converges to the optimum, so the
    result does not depend on a learning rate or an epoch count."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter)
    return model.fit(F.normalize(features.float(), dim=1).numpy(), labels.numpy())


def fewshot_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    shots: Sequence[int] = (1, 5, 10),
    draws: int = 5,
    c: float = 1.0,
    seed: int = 0,
    groups: tuple[torch.Tensor, list[str]] | None = None,
) -> dict[str, dict[str, object]]:
    """For each number of shots: ``draws`` class-balanced draws of that many labeled training
    images per class (draw ``d`` uses seed ``seed + d``), a logistic regression fitted on each,
    tested on the whole test set. Returns ``{"5": {"mean", "std", "accuracies"}}`` per shot
    count; the std is the sample standard deviation over draws (0 for one draw). With
    ``groups`` (group of each test image, group names), also each group's accuracy over all
    draws."""
    test = F.normalize(test_features.float(), dim=1).numpy()
    result = {}
    for k in shots:
        accuracies, predictions = [], []
        for d in range(draws):
            idx = balanced_subset(train_labels, per_class=k, seed=seed + d)
            model = logistic_regression(train_features[idx], train_labels[idx], c)
            predicted = torch.as_tensor(model.predict(test))
            accuracies.append(float((predicted == test_labels).float().mean()))
            predictions.append(predicted)
        mean = sum(accuracies) / draws
        std = (
            math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (draws - 1)) if draws > 1 else 0.0
        )
        result[str(k)] = {"mean": mean, "std": std, "accuracies": accuracies}
        if groups is not None:
            group_of, names = groups
            result[str(k)]["groups"] = group_accuracy(
                torch.cat(predictions), test_labels.repeat(draws), group_of.repeat(draws), names
            )
    return result
