"""Accuracy per group of images (SEER's fairness evaluation: per group of people and places):
a CSV names the group of each evaluation image; every protocol then reports the accuracy of
each group, the worst group and the largest gap between two groups."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from sslzoo.errors import ConfigError, MissingDataError

IMAGE_COLUMNS = ("image", "path", "index")


def sample_ids(dataset: object) -> list[str]:
    """How the rows of a groups file name each image of ``dataset``: its path where the dataset
    reads files (``samples`` of ``(path, label)``), else its index."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [str(path) for path, _ in samples]
    return [str(i) for i in range(len(dataset))]


def _key(image: str, root: Path | None) -> str:
    if image.isdigit():
        return image
    path = Path(image).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    return str(path.resolve())


def read_groups(
    path: str | Path, ids: Sequence[str], root: str | Path | None = None
) -> tuple[torch.Tensor, list[str]]:
    """The group index of each image (``-1`` for an image the file does not list) and the
    group names, from a CSV with a header: an image column (``image``, ``path`` or ``index``:
    a path, absolute or relative to ``root``, or the image's index in the evaluation set) and
    a ``group`` column."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"groups file {str(path)!r} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        column = next((c for c in IMAGE_COLUMNS if c in fields), None)
        if column is None or "group" not in fields:
            raise ConfigError(
                f"{path}: needs a 'group' column and one of {', '.join(IMAGE_COLUMNS)}; "
                f"its header is {fields}"
            )
        root = Path(root) if root is not None else None
        rows = [(_key(r[column].strip(), root), r["group"].strip()) for r in reader]
    ids = [_key(i, None) if not i.isdigit() else i for i in ids]
    position = {image: i for i, image in enumerate(ids)}
    unknown = [image for image, _ in rows if image not in position]
    if unknown:
        raise ConfigError(
            f"{path}: {len(unknown)} rows name images not in the evaluation set, e.g. "
            f"{unknown[0]!r} (rows name images by path or by index 0..{len(ids) - 1})"
        )
    names = sorted({group for _, group in rows})
    group_of = torch.full((len(ids),), -1, dtype=torch.long)
    for image, group in rows:
        group_of[position[image]] = names.index(group)
    return group_of, names


def group_accuracy(
    predicted: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, names: Sequence[str]
) -> dict[str, object]:
    """Accuracy of each group (with its image count), the worst group, and the gap between the
    best and the worst group. Images in no group (``-1``) count in no group."""
    correct = (predicted.cpu() == labels.cpu()).float()
    per_group = {}
    for g, name in enumerate(names):
        members = groups == g
        if members.any():
            per_group[name] = {
                "accuracy": float(correct[members].mean()),
                "images": int(members.sum()),
            }
    if not per_group:
        return {"per_group": {}}
    worst = min(per_group, key=lambda n: per_group[n]["accuracy"])
    best = max(per_group, key=lambda n: per_group[n]["accuracy"])
    return {
        "per_group": per_group,
        "worst_group": worst,
        "worst_accuracy": per_group[worst]["accuracy"],
        "gap": per_group[best]["accuracy"] - per_group[worst]["accuracy"],
    }
