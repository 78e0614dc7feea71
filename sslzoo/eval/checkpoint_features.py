"""Features of a checkpoint's backbone (trained or freshly initialised) on an evaluation
datamodule, cached beside the checkpoint; the test images as corruptions need them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torchvision.transforms as T
from torch.utils.data import Dataset

from sslzoo.checkpoints import load_method
from sslzoo.datamodules import SSLDataModule
from sslzoo.eval.features import extract_features
from sslzoo.eval.protocols import Features


def frozen_features(
    ckpt: str, data: SSLDataModule, device: str, cache: bool = False, trained: bool = True
) -> Features:
    """Features of the labeled training split and the test split, by the checkpoint's eval
    backbone (or, ``trained=False``, the same architecture freshly initialised).

    With ``cache``, features are stored beside the checkpoint, keyed by checkpoint and data.
    """
    key = hashlib.sha1(
        f"{Path(ckpt).resolve()}:{Path(ckpt).stat().st_mtime}:{data.hparams}:{trained}".encode()
    ).hexdigest()[:12]
    cache_file = Path(ckpt).with_name(f"{Path(ckpt).stem}.features-{key}.pt")
    data.build_datasets(None, data.eval_transform())
    if cache and cache_file.is_file():
        saved = torch.load(cache_file, weights_only=True)
        train, val = saved["train"], saved["val"]
    else:
        model = load_method(ckpt, trained=trained).to(device)
        name = "trained" if trained else "untrained"
        train = extract_features(
            model.eval_backbone, data.knn_bank_dataloader(), device, f"{name}: train features"
        )
        val = extract_features(
            model.eval_backbone, data.val_dataloader(), device, f"{name}: test features"
        )
        if cache:
            torch.save({"train": list(train), "val": list(val)}, cache_file)
    num_classes = data.num_classes or int(max(train[1].max(), val[1].max())) + 1
    return Features(*train, *val, num_classes)


def unnormalized_test_images(data: SSLDataModule) -> Dataset:
    """The test images at the evaluation size, in [0, 1], not normalised: what corruptions
    apply to."""
    size = data.image_size
    to_size = T.Compose(
        [
            T.Resize(round(size * data.eval_resize_ratio), T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
        ]
    )
    return data.labeled_splits(to_size, to_size)[1]
