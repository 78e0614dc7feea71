"""Online linear probe: a classifier trained on detached features while the backbone pretrains."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslzoo.distributed import gather_rows, real_sample_count, val_sampler, world_size


def train_labeled(trainer: L.Trainer | None) -> bool:
    """Whether the trainer's training set has labels: its datamodule's ``train_labeled``, True
    when it has none (image folders read without classes set it False)."""
    return bool(getattr(getattr(trainer, "datamodule", None), "train_labeled", True))


class OnlineProbe(L.Callback):
    """Train a linear classifier on the detached features that ``training_step`` returns.

    The probe is ``BatchNorm1d(affine=False) -> Linear`` with its own AdamW optimizer, so no
    gradient reaches the backbone and the method's optimizer never sees it. Logs
    ``probe/train_loss``, ``probe/train_top1`` and, on the validation set, ``probe/val_top1``.
    Its weights and optimizer state are saved in the checkpoint, so a resumed run continues
    exactly.

    The probe trains on whole batches: a training set without labels (a datamodule whose
    ``train_labeled`` is False, labels -1) trains no probe, and in any other every training
    label must be a class index. So the training batch's labels are never read back to drop
    unlabeled rows: no host-device sync, as in the training step (the only per-batch reads
    left are the row counts :func:`~sslzoo.distributed.gather_rows` exchanges under DDP).

    Under DDP every rank gathers the features and labels of all ranks and trains its
    copy of the probe on that global batch, starting from rank 0's initial weights: the
    probes stay identical on every rank, and equal to a single-process probe on the same
    global batch. The validation counts, without ``DistributedSampler`` padding, are summed
    over ranks, so ``probe/val_top1`` covers the whole validation set on every rank.

    Args:
        num_classes: number of classes; ``None`` takes the datamodule's ``num_classes``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: seed of the classifier's initial weights, drawn from a generator of its own so
            they depend neither on the global random state nor on what ran before.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.seed = seed
        self.lr = lr
        self.weight_decay = weight_decay
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._correct = 0
        self._total = 0
        self._seen: dict[int, int] = {}
        self._validating = False

    def _ensure(self, pl_module: L.LightningModule, dim: int) -> nn.Module:
        if self.head is None:
            num_classes = self.num_classes or pl_module.trainer.datamodule.num_classes
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.head = nn.Sequential(
                    nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes)
                )
            self.head.to(pl_module.device)
            if world_size() > 1:  # every rank starts from rank 0's random init
                for tensor in self.head.state_dict().values():
                    dist.broadcast(tensor, src=0)
            self.optimizer = torch.optim.AdamW(
                self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay
            )
            if self._pending_state is not None:
                self.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.head

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if not isinstance(outputs, dict) or "features" not in outputs:
            return
        if not train_labeled(trainer):
            return  # nothing to learn from, known on the host
        features = torch.cat(gather_rows(outputs["features"].detach().float()))
        labels = torch.cat(gather_rows(outputs["labels"]))
        if not len(labels):
            return
        head = self._ensure(pl_module, features.shape[1])
        head.train()
        with torch.enable_grad():
            logits = head(features)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        pl_module.log("probe/train_loss", loss.detach())
        pl_module.log("probe/train_top1", (logits.argmax(1) == labels).float().mean())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._correct, self._total, self._seen = 0, 0, {}
        self._validating = self.head is not None and not trainer.sanity_checking

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._validating:
            return
        seen = self._seen.get(dataloader_idx, 0)
        self._seen[dataloader_idx] = seen + len(outputs["labels"])
        real = real_sample_count(val_sampler(trainer, dataloader_idx), seen, len(outputs["labels"]))
        if not real:
            return
        self.head.eval()
        with torch.no_grad():
            pred = self.head(outputs["features"][:real].float()).argmax(1)
        self._correct += int((pred == outputs["labels"][:real]).sum())
        self._total += real

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._validating:
            return
        if world_size() > 1:
            counts = torch.tensor([self._correct, self._total], device=pl_module.device)
            dist.all_reduce(counts)
            self._correct, self._total = counts.tolist()
        if self._total:
            pl_module.log("probe/val_top1", self._correct / self._total)

    def state_dict(self) -> dict[str, Any]:
        if self.head is None:
            return self._pending_state or {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.head is None:
            self._pending_state = state_dict
            return
        self.head.load_state_dict(state_dict["head"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
