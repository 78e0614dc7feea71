"""The offline quickstart set: scikit-learn's 1,797 handwritten digits (UCI ML hand-written
digits, 8x8 grey levels 0-16), upscaled to RGB images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sslzoo.datamodules.base import SSLDataModule
from sslzoo.datamodules.images import ImageArray, Transform, channel_stats


def load_digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 RGB arrays of shape (1797, image_size, image_size, 3), and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy(), digits.target.astype(np.int64)


class DigitsDataModule(SSLDataModule):
    """Handwritten digits shipped with scikit-learn: nothing to download.

    Args:
        val_fraction: share of each class held out for validation (the kNN queries and the
            probe's validation set); the rest is the unlabeled training set and the kNN bank.
        split_seed: seed of the train/validation split.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 2,
        image_size: int = 16,
        val_fraction: float = 0.25,
        split_seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, image_size, 1.0, pin_memory)
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        images, labels = load_digits_images(image_size)
        rng = np.random.default_rng(split_seed)
        val = np.zeros(len(labels), dtype=bool)
        for c in range(self.num_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            val[idx[: round(len(idx) * val_fraction)]] = True
        self._train = (images[~val], labels[~val])
        self._val = (images[val], labels[val])
        self.mean, self.std = channel_stats(self._train[0])

    def build_datasets(self, views: Transform | None, eval_transform: Transform) -> None:
        self.train_set = ImageArray(*self._train, transform=views)
        self.bank_set = ImageArray(*self._train, transform=eval_transform)
        self.val_set = ImageArray(*self._val, transform=eval_transform)
