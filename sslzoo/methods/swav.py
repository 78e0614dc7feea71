"""SwAV (Caron et al., 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments"), following facebookresearch/swav ``main_swav.py``.

    C = normalize(C)                                 # prototypes, D x K, every iteration
    z = normalize(g(f(crops)))                       # multi-crop: 2 global + N small crops
    scores = z @ C                                   # prototype scores of every crop
    for i in crops_for_assign:                       # global crops only
        with no_grad:
            q_i = sinkhorn([queue_i @ C; scores_i])  # equipartitioned codes, batch rows only
        loss += mean over v != i of CE(q_i, softmax(scores_v / temperature))
    loss /= len(crops_for_assign)

    def sinkhorn(scores, eps=0.05, niters=3):       # Algorithm 1 of the paper
        Q = exp(scores / eps).T;  Q /= sum(Q);  K, B = Q.shape
        for _ in range(niters):
            Q /= sum(Q, dim=1) * K                   # each prototype gets 1/K of the mass
            Q /= sum(Q, dim=0) * B                   # each sample gets 1/B of the mass
        return (Q * B).T                             # every row a distribution over prototypes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from sslzoo.augment.recipes import MultiCropViews
from sslzoo.distributed import consecutive_groups
from sslzoo.losses.swapped import SwappedPredictionLoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.heads import mlp
from sslzoo.nn.multicrop import forward_multicrop
from sslzoo.nn.queue import EmbeddingQueue
from sslzoo.optim.settings import Optimization
from sslzoo.sharding import full_tensor

VIEWS = MultiCropViews()  # main_swav.py's multi-crop with its default arguments
# scripts/swav_800ep_pretrain.sh (batch 4096): LARC 4.8 = 0.3 per 256, wd 1e-6 on every
# parameter, 10 warmup epochs from 0.3, cosine to 0.0048
OPTIM = Optimization(
    optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10.0, start_warmup_lr=0.3,
    min_lr=0.0048, lars_trust_ratio="larc", exclude_bias_and_norm=False,
)  # fmt: skip


class SwAV(SSLMethod):
    """SwAV with the official (facebookresearch/swav) defaults of the batch-4096 recipe
    (``scripts/swav_800ep_pretrain.sh``; the batch-256 recipe is configs/imagenet/swav.yaml).

    The queue (``queue_length`` > 0, an :class:`~sslzoo.nn.queue.EmbeddingQueue`) is created at
    epoch ``epoch_queue_starts`` and holds, per assignment crop, the last ``queue_length //
    world_size`` L2-normalised embeddings of this rank. Its prototype scores join the Sinkhorn
    input once it is full. Every rank's queue is saved in the checkpoint (``swav_queue``) and
    restored on resume.

    Optimiser: the official code wraps SGD in LARC (trust 0.001, no clipping) over all
    parameters with weight decay 1e-6, biases and BN included; :class:`sslzoo.optim.lars.LARS`
    with ``trust_ratio="larc"`` and one decayed group is the same update
    (``exclude_bias_and_norm=False``). ``min_lr`` and ``start_warmup_lr`` are absolute, like
    ``final_lr`` and ``start_warmup`` in main_swav.py: the defaults are the batch-4096 recipe's,
    and a run at another batch with them gets a warning at the start of training.

    Args:
        views: the official multi-crop (2 x 224 px at area (0.14, 1), 6 x 96 px at (0.05,
            0.14), SimCLR's colour steps, PIL blur p 0.5).
        optim: LARC (``lars`` with ``lars_trust_ratio: larc``) 0.3 per 256 images over every
            parameter (``exclude_bias_and_norm: false``), wd 1e-6, warmup 10 epochs from
            ``start_warmup_lr`` 0.3 to the peak, cosine to ``min_lr`` 0.0048 (both absolute).
        crops_for_assign: indices of the crops whose codes are computed (the global crops).
        temperature: softmax temperature of the predictions.
        epsilon: Sinkhorn entropy regularisation (the README suggests 0.03 if training
            collapses).
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        feat_dim: projection (embedding) dimension.
        hidden_mlp: hidden width of the projection MLP.
        nmb_prototypes: number of prototypes K.
        freeze_prototypes_niters: optimizer steps at the start during which the prototypes get
            no update (313 = 1 epoch at batch 4096; 5005 for the batch-256 recipe).
        queue_length: total queue length over all ranks; 0 disables the queue (3840 for the
            batch-256 recipe).
        epoch_queue_starts: epoch from which the queue is filled and, once full, used.
        sync_batchnorm: synchronise BatchNorm across devices.
        syncbn_process_group_size: synchronise it within groups of this many consecutive
            ranks (apex's ``create_syncbn_process_group``: 8 officially, so at batch 4096 on
            64 GPUs each group of 8 has its own statistics); ``None``: over all ranks.
        backbone: backbone name (see :class:`SSLMethod`).
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    linspace_warmup = True  # main_swav.py warms up with np.linspace

    def __init__(
        self,
        crops_for_assign: tuple[int, ...] = (0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        feat_dim: int = 128,
        hidden_mlp: int = 2048,
        nmb_prototypes: int = 3000,
        freeze_prototypes_niters: int = 313,
        queue_length: int = 0,
        epoch_queue_starts: int = 15,
        syncbn_process_group_size: int | None = 8,
        views: MultiCropViews = VIEWS,
        optim: Optimization = OPTIM,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool | None = None,
        sync_batchnorm: bool = True,
        init_backbone: str | None = None,
        freeze_backbone_steps: int = 0,
    ) -> None:
        super().__init__(
            backbone, backbone_kwargs, cifar_stem, zero_init_residual, sync_batchnorm, views, optim,
            init_backbone, freeze_backbone_steps,
        )  # fmt: skip
        crops = self.views.num_views
        if not crops_for_assign or not all(0 <= c < crops for c in crops_for_assign):
            raise ValueError(f"crops_for_assign {crops_for_assign} must index the {crops} crops")
        # src/resnet50.py's projection_head: Linear -> BN -> ReLU -> Linear, all with bias
        dim = self.backbone.num_features
        self.projection_head = mlp([dim, hidden_mlp, feat_dim], hidden_bias=True, last_bias=True)
        self.prototypes = nn.Linear(feat_dim, nmb_prototypes, bias=False)
        self.criterion = SwappedPredictionLoss(
            crops_for_assign, temperature, epsilon, sinkhorn_iterations
        )
        self._queue = EmbeddingQueue(len(crops_for_assign), queue_length, feat_dim)

    def sync_batchnorm_group(self) -> Any:
        """Groups of ``syncbn_process_group_size`` consecutive ranks, as apex's grouped SyncBN."""
        return consecutive_groups(self.hparams.syncbn_process_group_size)

    # ----------------------------------------------------------------- prototypes and queue
    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Put every prototype back on the unit sphere (start of every iteration)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1, p=2))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """No prototype update during the first ``freeze_prototypes_niters`` steps."""
        super().on_before_optimizer_step(optimizer)
        if self.global_step < self.hparams.freeze_prototypes_niters:
            for p in self.prototypes.parameters():
                p.grad = None

    @property
    def queue(self) -> torch.Tensor | None:
        """This rank's queue (crops x length x feat_dim), newest embeddings first."""
        return self._queue.tensor

    @torch.no_grad()
    def queue_scores(self, embeddings: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """Prototype scores of the queued embeddings per assignment crop (``None`` while the
        queue is off or not yet full); then push this batch's assignment-crop embeddings."""
        hp = self.hparams
        if hp.queue_length <= 0:
            return None
        if self._queue.tensor is None and self.current_epoch < hp.epoch_queue_starts:
            return None
        queue = self._queue.prepare(embeddings[0].shape[0], embeddings[0].device)
        scores = None
        if self._queue.full:
            weight = full_tensor(self.prototypes.weight).to(queue.dtype)  # gathered if sharded
            scores = [queue[i] @ weight.t() for i in range(len(queue))]
        self._queue.push([embeddings[c] for c in hp.crops_for_assign])
        return scores

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save every rank's queue as ``swav_queue`` (world x crops x length x dim)."""
        if self.queue is not None:
            checkpoint["swav_queue"] = self._queue.gather(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's queue (split evenly over another world size)."""
        self._queue.restore(checkpoint.get("swav_queue"))

    # ----------------------------------------------------------------- training
    def on_train_start(self) -> None:
        """Warn when the absolute warmup-start and final learning rates of the batch-4096
        recipe meet another batch, whose peak learning rate they no longer fit."""
        defaults = {"start_warmup_lr": 0.3, "min_lr": 0.0048}
        kept = [k for k, v in defaults.items() if getattr(self.optim, k) == v]
        if kept and self.global_batch_size != 4096:
            rank_zero_warn(
                f"SwAV: {' and '.join(kept)} keep the batch-4096 recipe's absolute values "
                f"({', '.join(str(defaults[k]) for k in kept)}), but the global batch is "
                f"{self.global_batch_size} and the peak learning rate {self.scaled_lr:g}; the "
                "official scripts set them with the batch (e.g. min_lr = peak / 1000)"
            )

    @property
    def projection_mlp(self) -> nn.Sequential:
        return self.projection_head

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        views, labels = batch
        self.normalize_prototypes()
        features = forward_multicrop(self.backbone, views)
        z = F.normalize(self.projection_head(torch.cat(features)), dim=1)
        scores = self.prototypes(z)
        size = views[0].shape[0]
        z, scores = z.split(size), scores.split(size)
        loss = self.criterion(scores, self.queue_scores([e.detach() for e in z]))
        return self.training_outputs(loss, z[0], features[0], labels)
