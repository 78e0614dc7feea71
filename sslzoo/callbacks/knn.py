"""Weighted kNN monitor on held-out labeled images."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Subset

from sslzoo.distributed import gather_rows, rank, real_sample_count, val_sampler, world_size
from sslzoo.eval.collapse import rankme
from sslzoo.eval.knn import knn_predict


def shard_loader(loader: DataLoader, shard: int, shards: int) -> DataLoader | None:
    """The same loader over samples ``shard, shard + shards, ...`` of its dataset; ``None``
    when it cannot be sharded (iterable dataset, custom batch sampler)."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return None
    extra = {}
    if loader.num_workers > 0:
        extra = {"prefetch_factor": loader.prefetch_factor, "worker_init_fn": loader.worker_init_fn}
    return DataLoader(
        Subset(loader.dataset, range(shard, len(loader.dataset), shards)),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        **extra,
    )


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows of rank-sharded ``parts`` (rank r holding rows r, r + W, ...) back in their order;
    plain concatenation when the sizes are not those of such a sharding (skipped images)."""
    total, world = sum(len(p) for p in parts), len(parts)
    if any(len(p) != len(range(r, total, world)) for r, p in enumerate(parts)):
        return torch.cat(parts)
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


class KNNMonitor(L.Callback):
    """Weighted kNN accuracy of the method's evaluation features at each validation epoch.

    The feature bank is the datamodule's ``knn_bank_dataloader()`` (labeled training images,
    no augmentation), built batch by batch; queries are the validation batches. Scores are
    computed in chunks so memory stays bounded by ``chunk_size x bank size``.

    Under DDP every rank extracts its share of the bank (samples r, r + W, ...) and gathers
    the others', so each rank holds the whole bank; each scores its own validation shard, the
    padding that ``DistributedSampler`` repeats to even the shards is left out, and the
    correct and total counts are summed over ranks: the accuracy is over the whole validation
    set, the same on every rank.

    The bank's features also give the collapse monitor ``monitor/rankme`` (RankMe, the
    effective rank of the features: :func:`sslzoo.eval.collapse.rankme`), at most
    ``rankme_samples`` rows of the bank, the same on every rank.

    Args:
        k: neighbours of the headline protocol, logged as ``knn/val_top1``.
        temperature: temperature of the headline protocol.
        extra_protocols: more (k, temperature) pairs, logged as ``knn/val_top1_k{k}_t{T}``;
            the DINO protocol is (20, 0.07).
        chunk_size: queries scored at once.
        rankme_samples: bank rows RankMe is computed on (the first ones; 0 turns it off).
    """

    def __init__(
        self,
        k: int = 200,
        temperature: float = 0.1,
        extra_protocols: list[tuple[int, float]] | None = None,
        chunk_size: int = 1024,
        rankme_samples: int = 4096,
    ) -> None:
        self.protocols = [(k, temperature)] + [tuple(p) for p in (extra_protocols or [])]
        self.chunk_size = chunk_size
        self.rankme_samples = rankme_samples
        self._rankme: float | None = None
        self._bank: torch.Tensor | None = None
        self._bank_labels: torch.Tensor | None = None
        self._correct: list[int] = []
        self._total = 0
        self._seen: dict[int, int] = {}

    @staticmethod
    def metric_name(index: int, k: int, temperature: float) -> str:
        return "knn/val_top1" if index == 0 else f"knn/val_top1_k{k}_t{temperature:g}"

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bank = None
        self._seen = {}
        if trainer.sanity_checking:
            return
        self._bank, self._bank_labels = self.build_bank(
            trainer.datamodule.knn_bank_dataloader(), pl_module
        )
        self._correct = [0] * len(self.protocols)
        self._total = 0
        self._rankme = rankme(self._bank[: self.rankme_samples]) if self.rankme_samples else None

    @staticmethod
    def build_bank(
        loader: DataLoader, pl_module: L.LightningModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of the whole bank, in the loader's order, on every rank."""
        world = world_size()
        shard = shard_loader(loader, rank(), world) if world > 1 else loader
        feats, labels = [], []
        images = None
        for images, y in loader if shard is None else shard:
            feats.append(pl_module.extract_features(images.to(pl_module.device)))
            labels.append(y.to(pl_module.device))
        if shard is not None and world > 1 and images is not None:
            # sharded models (FSDP) run collectives in every forward: every rank must run as
            # many as rank 0, whose share is the largest; the extra outputs are dropped
            largest = len(range(0, len(loader.dataset), world))
            for _ in range(math.ceil(largest / loader.batch_size) - len(feats)):
                pl_module.extract_features(images[:1].to(pl_module.device))
        bank, bank_labels = torch.cat(feats), torch.cat(labels)
        if world > 1 and shard is not None:
            bank, bank_labels = interleave(gather_rows(bank)), interleave(gather_rows(bank_labels))
        return bank, bank_labels

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._bank is None:
            return
        num_classes = trainer.datamodule.num_classes
        seen = self._seen.get(dataloader_idx, 0)
        self._seen[dataloader_idx] = seen + len(outputs["labels"])
        real = real_sample_count(val_sampler(trainer, dataloader_idx), seen, len(outputs["labels"]))
        labels, features = outputs["labels"][:real], outputs["features"][:real]
        for i, (k, t) in enumerate(self.protocols):
            scores = knn_predict(
                features,
                self._bank,
                self._bank_labels,
                num_classes,
                k,
                t,
                self.chunk_size,
            )
            self._correct[i] += int((scores.argmax(1) == labels).sum())
        self._total += len(labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bank is None:
            return
        self._bank = self._bank_labels = None
        if world_size() > 1:
            counts = torch.tensor([*self._correct, self._total], device=pl_module.device)
            dist.all_reduce(counts)
            summed = counts.tolist()
            self._correct, self._total = summed[:-1], summed[-1]
        if self._rankme is not None:
            pl_module.log("monitor/rankme", self._rankme)
        if not self._total:
            return
        for i, (k, t) in enumerate(self.protocols):
            pl_module.log(self.metric_name(i, k, t), self._correct[i] / self._total)
