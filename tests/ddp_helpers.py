"""A 2-process gloo harness for the DDP tests: fixed pre-computed views, tiny methods, and one
spawned job that runs every distributed check and writes each rank's results to disk.

The two processes are started once with ``torch.multiprocessing`` and run Lightning's own
``ddp`` strategy as externally launched ranks (``LOCAL_RANK`` set), one ``Trainer.fit`` per
method: the DistributedSampler, DDP gradient averaging and the methods' collectives are
Lightning's and the methods', but the interpreter start-up (several seconds per process) is
paid once instead of once per method as with ``strategy="ddp_spawn"``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sslzoo.callbacks import KNNMonitor, OnlineProbe
from sslzoo.distributed import consecutive_groups
from sslzoo.methods import (
    barlowtwins,
    byol,
    dino,
    dinov2,
    distillation,
    ibot,
    mae,
    mocov3,
    simclr,
    simsiam,
    swav,
    vicreg,
)  # fmt: skip
from sslzoo.methods.barlowtwins import BarlowTwins
from sslzoo.methods.base import SSLMethod
from sslzoo.methods.byol import BYOL
from sslzoo.methods.dino import DINO
from sslzoo.methods.dinov2 import DINOv2
from sslzoo.methods.distillation import Distillation
from sslzoo.methods.ibot import IBOT
from sslzoo.methods.mae import MAE
from sslzoo.methods.mocov3 import MoCoV3
from sslzoo.methods.simclr import SimCLR
from sslzoo.methods.simsiam import SimSiam
from sslzoo.methods.swav import SwAV
from sslzoo.methods.vicreg import VICReg
from sslzoo.nn.sync_batchnorm import SyncBatchNorm
from tests.conftest import TINY_HEADS, TINY_RESNET
from tests.helpers import quiet_trainer

WORLD = 2
GLOBAL_BATCH = 8  # images per optimizer step: 2 ranks x 4, or 1 process x 8
STEPS = 3
NUM_CLASSES = 3
BANK_SIZE = 20
VAL_SIZE = 13  # odd: DistributedSampler pads rank 1's validation shard with a repeat
METHODS = (
    "simclr", "mocov3", "byol", "simsiam", "swav", "dino", "ibot", "mae", "barlowtwins", "vicreg",
    "dinov2",
    "distillation",
)  # fmt: skip
TWO_VIEWS = ("simclr", "mocov3", "byol", "simsiam", "barlowtwins", "vicreg")
IMAGE, SMALL = 16, 8

TINY_VIT = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": IMAGE, "patch_size": 4, "depth": 2, "embed_dim": 32,
                        "num_heads": 2},
}  # fmt: skip


def build_method(name: str, devices: int = WORLD) -> SSLMethod:
    """A tiny method with the recipe's losses and collectives, seeded so every process starts
    from the same weights, with nothing random in its step (no drop-path).

    The optimiser is SGD for all four, with no warmup: it is a per-parameter function of the
    averaged gradient like LARS and AdamW, but AdamW's first step is lr x sign(g), which
    blows float32 noise on gradients that are zero in exact arithmetic (the attention's key
    bias) up to +-lr and would hide real differences.

    Barlow Twins' official loss lets each rank's gradient through its own share of the
    all-reduced cross-correlation only, so DDP's average is ``1 / WORLD`` of the single
    process's gradient: its single-process reference (``devices=1``) takes SGD steps of
    lr / WORLD with weight decay x WORLD, the same update as lr with gradient / WORLD."""
    torch.manual_seed(0)
    # the method's own settings but these (weight decay and its exclusions kept)
    common = {"optimizer": "sgd", "lr": 0.1, "lr_scaling": "none", "warmup_epochs": 0.0}
    if name == "simclr":
        return SimCLR(**TINY_RESNET, optim=simclr.OPTIM.replace(**common), proj_hidden_dim=16,
                      proj_out_dim=8, temperature=0.5, sync_batchnorm=True)  # fmt: skip
    if name == "mocov3":
        return MoCoV3(**TINY_RESNET, optim=mocov3.OPTIM.replace(**common), moco_dim=8,
                      moco_mlp_dim=16, moco_m=0.9, sync_batchnorm=True)  # fmt: skip
    if name == "swav":
        # the queue holds two global batches, so it is full and used from the third step on
        return SwAV(**TINY_RESNET, optim=swav.OPTIM.replace(**common),
                    views=swav.VIEWS.replace(nmb_crops=(2, 2), size_crops=(IMAGE, SMALL)),
                    feat_dim=8, hidden_mlp=16, nmb_prototypes=10, freeze_prototypes_niters=0,
                    queue_length=2 * GLOBAL_BATCH, epoch_queue_starts=0,
                    sync_batchnorm=True)  # fmt: skip
    if name == "dino":
        return DINO(**TINY_VIT, out_dim=16, hidden_dim=16, bottleneck_dim=8,
                    drop_path_rate=0.0,
                    views=dino.VIEWS.replace(local_crops_number=2, local_crop_size=SMALL),
                    freeze_last_layer=0, momentum_teacher=0.9, sync_batchnorm=True,
                    optim=dino.OPTIM.replace(**common))  # fmt: skip
    if name == "byol":
        return BYOL(**TINY_RESNET, **TINY_HEADS["BYOL"], optim=byol.OPTIM.replace(**common),
                    ema_momentum=0.9, sync_batchnorm=True)  # fmt: skip
    if name == "simsiam":
        return SimSiam(**TINY_RESNET, **TINY_HEADS["SimSiam"],
                       optim=simsiam.OPTIM.replace(**common), sync_batchnorm=True)  # fmt: skip
    if name == "ibot":
        return IBOT(**TINY_VIT, out_dim=16, patch_out_dim=16, hidden_dim=16, bottleneck_dim=8,
                    drop_path_rate=0.0,
                    views=ibot.VIEWS.replace(local_crops_number=2, local_crop_size=SMALL),
                    freeze_last_layer=0, momentum_teacher=0.9,
                    optim=ibot.OPTIM.replace(**common))  # fmt: skip
    if name == "dinov2":
        # Sinkhorn-Knopp targets (sums over both ranks, the masked-patch count all-reduced);
        # KoLeo, which DINOv2 computes on each rank's own images, off; no LayerScale: with
        # gamma 1e-5 every image's [CLS] feature is the same to 1e-5, and the online probe's
        # BatchNorm would blow the runs' float noise up to a different probe
        return ImageMaskedDINOv2(**TINY_VIT, out_dim=16, hidden_dim=16, bottleneck_dim=8,
                                 separate_head=True, ibot_out_dim=12, ibot_hidden_dim=16,
                                 ibot_bottleneck_dim=8, centering="sinkhorn_knopp",
                                 koleo_loss_weight=0.0, drop_path_rate=0.0,
                                 num_register_tokens=1, official_epoch_length=None,
                                 layerscale=None,
                                 views=dinov2.VIEWS.replace(local_crops_number=2,
                                                            local_crop_size=SMALL),
                                 freeze_last_layer=0, momentum_teacher=0.9,
                                 optim=dinov2.OPTIM.replace(**common))  # fmt: skip
    if name == "mae":
        return ImageMaskedMAE(**TINY_VIT, decoder_embed_dim=16, decoder_depth=1,
                              decoder_num_heads=2, optim=mae.OPTIM.replace(**common))  # fmt: skip
    if name == "barlowtwins":
        scale = WORLD if devices == 1 else 1
        optim = barlowtwins.OPTIM.replace(**common)
        optim = optim.replace(lr=optim.lr / scale, weight_decay=optim.weight_decay * scale)
        return BarlowTwins(**TINY_RESNET, **TINY_HEADS["BarlowTwins"], optim=optim,
                           bias_lr=optim.lr, sync_batchnorm=True)  # fmt: skip
    if name == "vicreg":
        # its loss (about 25) is far larger than the others: a smaller step keeps it stable
        return VICReg(**TINY_RESNET, **TINY_HEADS["VICReg"],
                      optim=vicreg.OPTIM.replace(**{**common, "lr": 0.01}),
                      sync_batchnorm=True)  # fmt: skip
    if name == "distillation":
        # a frozen tiny ViT teacher; no mixup, whose permutation is within each rank's batch;
        # the MSE's small gradients take a larger step to move the projection measurably
        return Distillation(**TINY_RESNET, teacher=TINY_VIT["backbone"],
                            teacher_kwargs=TINY_VIT["backbone_kwargs"], mixup=False,
                            optim=distillation.OPTIM.replace(**{**common, "lr": 0.5}),
                            sync_batchnorm=True)  # fmt: skip
    raise ValueError(name)


class ImageMaskedMAE(MAE):
    """MAE whose masking noise is each image's own first embedded channel instead of a draw:
    a draw is per rank, so 2 ranks and 1 process would mask the same image differently."""

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with mock.patch.object(torch, "rand", lambda *_, **__: x[..., 0].detach()):
            return super().random_masking(x, mask_ratio)


class ImageMaskedDINOv2(DINOv2):
    """DINOv2 whose masks are a function of each image (its patches of positive mean first
    channel) instead of a draw per rank's batch, so 2 ranks and 1 process mask alike."""

    def draw_masks(self, global_views: torch.Tensor) -> torch.Tensor:
        patch = self.views.patch_size
        return F.avg_pool2d(global_views[:, :1], patch).flatten(1) > 0


def view_sizes(name: str) -> list[int]:
    """Side of every view: 2 views for the two-view methods, MAE's one, 2 global + 2 small for
    the multi-crop methods."""
    if name in ("mae", "distillation"):
        return [IMAGE]
    return [IMAGE, IMAGE] if name in TWO_VIEWS else [IMAGE, IMAGE, SMALL, SMALL]


class Views(Dataset):
    """Fixed views: item i is ([view_0[i], view_1[i], ...], label[i]); with ``masks``, iBOT's
    ({"views": [...], "masks": [mask_0, mask_1]}, label[i]), item i's masks drawn from seed i."""

    def __init__(self, views: list[torch.Tensor], labels: torch.Tensor, masks: bool) -> None:
        self.views, self.labels, self.masks = views, labels, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        views = [v[i] for v in self.views]
        if not self.masks:
            return views, self.labels[i]
        g = torch.Generator().manual_seed(i)
        grid = IMAGE // TINY_VIT["backbone_kwargs"]["patch_size"]
        masks = [torch.rand(grid, grid, generator=g) < 0.4 for _ in range(2)]
        return {"views": views, "masks": masks}, self.labels[i]


def first_views(batch: Any) -> torch.Tensor:
    """The first view of every image of a training batch."""
    crops = batch[0]
    return (crops["views"] if isinstance(crops, dict) else crops)[0]


class Images(Dataset):
    """Fixed labeled images for the kNN bank and the validation set."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class ViewsDataModule(L.LightningDataModule):
    """Pre-computed views, never shuffled and never augmented: under DDP rank r reads items
    r, r + 2, ..., so the two ranks' batches of step s are together the single process's
    batch s (items 8s .. 8s + 7)."""

    num_classes = NUM_CLASSES

    def __init__(self, name: str, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(1)
        n = GLOBAL_BATCH * STEPS
        views = [torch.randn(n, 3, s, s, generator=g) for s in view_sizes(name)]
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        self.train_set = Views(views, labels, masks=name == "ibot")
        self.bank_set = Images(
            torch.randn(BANK_SIZE, 3, IMAGE, IMAGE, generator=g),
            torch.randint(0, NUM_CLASSES, (BANK_SIZE,), generator=g),
        )
        self.val_set = Images(
            torch.randn(VAL_SIZE, 3, IMAGE, IMAGE, generator=g),
            torch.randint(0, NUM_CLASSES, (VAL_SIZE,), generator=g),
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning's own DistributedSampler always shuffles training data; an unshuffled one
        # given here is kept as is
        sampler = None
        if dist.is_initialized():
            sampler = DistributedSampler(self.train_set, shuffle=False, drop_last=True)
        return DataLoader(self.train_set, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=3)

    def knn_bank_dataloader(self) -> DataLoader:
        return DataLoader(self.bank_set, batch_size=3)


class Recorder(L.Callback):
    """Keeps what the tests compare: each step's loss, the kNN bank as built, the final
    weights and buffers, SwAV's queue, the probe and the validation counts."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {"losses": [], "batches": []}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: SSLMethod, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["losses"].append(float(outputs["loss"]))
        # a fingerprint of each image of the batch, to check which images each rank read
        self.record["batches"].append(first_views(batch).flatten(1).sum(1))
        if batch_idx == 0:
            self.record["first_state"] = _state(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: SSLMethod) -> None:
        knn = next(c for c in trainer.callbacks if isinstance(c, KNNMonitor))
        if knn._bank is not None:  # before the monitor's own hook clears it
            self.record["bank"] = knn._bank.clone()
            self.record["bank_labels"] = knn._bank_labels.clone()

    def on_fit_end(self, trainer: L.Trainer, pl_module: SSLMethod) -> None:
        knn = next(c for c in trainer.callbacks if isinstance(c, KNNMonitor))
        probe = next(c for c in trainer.callbacks if isinstance(c, OnlineProbe))
        queue = getattr(pl_module, "queue", None)
        self.record.update(
            state=_state(pl_module),
            queue=None if queue is None else queue.clone(),
            knn_counts=(list(knn._correct), knn._total),
            probe_counts=(probe._correct, probe._total),
            probe_head=probe.state_dict()["head"],
            metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
            world_size=trainer.world_size,
            sync_bn_layers=sum(isinstance(m, SyncBatchNorm) for m in pl_module.modules()),
            batchnorm_layers=sum(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules()
            ),
        )


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit(name: str, devices: int) -> dict[str, Any]:
    """Train ``name`` for :data:`STEPS` steps of :data:`GLOBAL_BATCH` images on ``devices``
    CPU processes (``ddp`` when 2) with the kNN monitor and the online probe; returns this
    rank's record."""
    model = build_method(name, devices)
    recorder = Recorder()
    trainer = quiet_trainer(
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        callbacks=[recorder, KNNMonitor(k=5, temperature=0.1), OnlineProbe(lr=0.05)],
    )
    trainer.fit(model, datamodule=ViewsDataModule(name, GLOBAL_BATCH // devices))
    return recorder.record


# --------------------------------------------------------------------- SyncBatchNorm checks

# per-rank sizes of the global batch in each SyncBatchNorm case: unequal, and one rank empty
SYNC_BN_CASES = {"1d": (6, 4), "2d": (3, 2), "empty_rank": (5, 0)}


def sync_bn_inputs(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global input, upstream gradient, BN weight and bias of a SyncBatchNorm case."""
    g = torch.Generator().manual_seed(2)
    n = sum(SYNC_BN_CASES[case])
    shape = (n, 5, 3, 3) if case == "2d" else (n, 6)
    x = torch.randn(shape, generator=g) * 3 + 1
    upstream = torch.randn(shape, generator=g)
    weight, bias = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    return x, upstream, weight, bias


def run_batchnorm(bn: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, Any]:
    """Two training steps of ``bn`` on ``x`` (loss ``sum(out * upstream)``), then one in
    evaluation mode; returns outputs, gradients and buffers."""
    x = x.clone().requires_grad_(True)
    out = bn(x)
    (out * upstream).sum().backward()
    out2 = bn(x.detach() * 0.5 - 1)
    bn.eval()
    out_eval = bn(x.detach())
    return {
        "out": out.detach(), "out2": out2.detach(), "out_eval": out_eval.detach(),
        "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
        "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
        "num_batches_tracked": int(bn.num_batches_tracked),
    }  # fmt: skip


def sync_bn_rank(case: str, rank: int) -> dict[str, Any]:
    """This rank's share of a case through :class:`SyncBatchNorm`; weight and bias gradients
    are summed over ranks (what DDP's average is, times the world size)."""
    x, upstream, weight, bias = sync_bn_inputs(case)
    sizes = SYNC_BN_CASES[case]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    bn = SyncBatchNorm(x.shape[1], momentum=None if case == "2d" else 0.1)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    result = run_batchnorm(bn, x[lo:hi], upstream[lo:hi])
    for key in ("weight_grad", "bias_grad"):
        dist.all_reduce(result[key])
    return result


def grouped_sync_bn_rank(rank: int) -> dict[str, Any]:
    """The "1d" case through SyncBatchNorm synchronised within SwAV's groups of
    ``syncbn_process_group_size=1`` rank: each rank's statistics are its own share's."""
    x, upstream, weight, bias = sync_bn_inputs("1d")
    sizes = SYNC_BN_CASES["1d"]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    swav = SwAV(**TINY_RESNET, hidden_mlp=8, feat_dim=4, nmb_prototypes=4,
                syncbn_process_group_size=1)  # fmt: skip
    group = swav.sync_batchnorm_group()
    bn = SyncBatchNorm(x.shape[1], process_group=group)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    result = run_batchnorm(bn, x[lo:hi], upstream[lo:hi])
    result["group_size"] = dist.get_world_size(group)
    try:
        consecutive_groups(0)
    except ValueError as error:
        result["bad_size_error"] = str(error)
    return result


def torch_sync_bn_refuses_cpu() -> str:
    """The error ``torch.nn.SyncBatchNorm`` raises on CPU in training under gloo ('' if none)."""
    try:
        nn.SyncBatchNorm(4).train()(torch.randn(4, 4))
    except ValueError as error:
        return str(error)
    return ""


# ------------------------------------------------------------------------------ the job


def worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: the SyncBatchNorm checks on a plain gloo group, then a Lightning ``ddp`` fit
    of every method; everything this rank saw goes to ``out_dir/rank{rank}.pt``."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    # a rank stuck in a collective fails after 2 minutes instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(minutes=2))
    results: dict[str, Any] = {"torch_sync_bn_error": torch_sync_bn_refuses_cpu()}
    results["sync_bn"] = {case: sync_bn_rank(case, rank) for case in SYNC_BN_CASES}
    results["grouped_sync_bn"] = grouped_sync_bn_rank(rank)
    for name in METHODS:
        results[name] = fit(name, WORLD)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ddp_job(out_dir: Path, port: int) -> list[dict[str, Any]]:
    """Spawn the two ranks, wait for them, and load each rank's results."""
    torch.multiprocessing.spawn(worker, args=(port, str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
