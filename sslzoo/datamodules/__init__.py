"""Datamodules: CIFAR, any image folder, litdata shards, and the offline quickstart digits."""

from sslzoo.datamodules.base import SSLDataModule
from sslzoo.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from sslzoo.datamodules.digits import DigitsDataModule
from sslzoo.datamodules.folder import ImageFolderDataModule
from sslzoo.datamodules.streaming import StreamingDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "SSLDataModule",
    "StreamingDataModule",
]
