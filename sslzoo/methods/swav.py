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
import torch.distributed as dist
import torch.nn.functional as F
from lightly.transforms import SwaVTransform
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from sslzoo.augment.views import swav_views
from sslzoo.distributed import consecutive_groups
from sslzoo.methods.base import (
    LRScaling,
    SSLMethod,
    ViewTransform,
    forward_multicrop,
    init_arguments,
)
from sslzoo.optim.lars import TrustRatio
from sslzoo.optim.optimizers import OptimizerName
from sslzoo.sharding import full_tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def filled_rows(queue: torch.Tensor) -> int:
    """Rows of a queue (crops x length x dim) up to its last row holding a non-zero value
    (one host read). The queue fills from the front with L2-normalised, so non-zero,
    embeddings: these are the rows pushed so far."""
    used = queue.ne(0).any(dim=2).any(dim=0)
    rows = torch.arange(1, used.numel() + 1, device=queue.device)
    return int((rows * used).max()) if used.numel() else 0


class SwAVProjectionHead(nn.Sequential):
    """``src/resnet50.py`` ``projection_head``: Linear -> BN -> ReLU -> Linear, all with bias.

    The output is L2-normalised by the caller. (lightly's ``SwaVProjectionHead`` drops the
    first Linear's bias; that bias is cancelled by the BN, but this keeps the official layers.)
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__(
            nn.Linear(input_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, output_dim),
        )


@torch.no_grad()
def distributed_sinkhorn(out: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Codes Q (B x K) of prototype scores ``out`` (B x K) by Sinkhorn-Knopp, as in
    ``main_swav.py``: rows of Q^T are scaled to 1/K, columns to 1/B, ``iterations`` times.

    Under torch.distributed the total and the row sums are all-reduced, so the
    equipartition constraint covers the global batch (B = local rows x world size).
    """
    q = torch.exp(out.float() / epsilon).t()
    world = _world_size()
    num_prototypes, batch = q.shape[0], q.shape[1] * world

    total = q.sum()
    if world > 1:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(rows)
        q /= rows
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


def swav_loss(
    scores: Sequence[torch.Tensor],
    crops_for_assign: Sequence[int],
    temperature: float,
    epsilon: float,
    sinkhorn_iterations: int,
    queue_scores: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The swapped-prediction loss of ``main_swav.py``.

    Args:
        scores: prototype scores of every crop, each B x K, in crop order.
        crops_for_assign: indices of the crops whose codes are predicted.
        temperature: softmax temperature of the predictions.
        epsilon: Sinkhorn entropy regularisation.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        queue_scores: per assignment crop, prototype scores of the queued embeddings; they are
            placed before the batch in the Sinkhorn input and their codes dropped.

    For each assignment crop the codes are the last B rows of Sinkhorn's output; the loss is
    the cross-entropy of every other crop's prediction against them, averaged over the other
    crops, then over the assignment crops.
    """
    batch = scores[0].shape[0]
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = scores[crop_id].detach().float()
            if queue_scores is not None:
                out = torch.cat([queue_scores[i].float(), out])
            q = distributed_sinkhorn(out, epsilon, sinkhorn_iterations)[-batch:]
        subloss = scores[0].new_zeros((), dtype=torch.float32)
        for v, s in enumerate(scores):
            if v != crop_id:
                log_p = F.log_softmax(s.float() / temperature, dim=1)
                subloss = subloss - (q * log_p).sum(dim=1).mean()
        loss = loss + subloss / (len(scores) - 1)
    return loss / len(crops_for_assign)


class SwAV(SSLMethod):
    """SwAV with the official (facebookresearch/swav) defaults of the batch-4096 recipe
    (``scripts/swav_800ep_pretrain.sh``; the batch-256 recipe is configs/imagenet/swav.yaml).

    Crop sizes: ``size_crops`` are pixels for the datamodule's ``image_size`` equal to
    ``size_crops[0]`` (224 for the recipe). For another ``image_size`` every size is rescaled
    by ``image_size / size_crops[0]`` (rounded), so the global crops are always ``image_size``
    and the small crops keep their ratio: (224, 96) gives (32, 14) at 32 px.

    The queue (``queue_length`` > 0) is created at epoch ``epoch_queue_starts`` and holds, per
    assignment crop, the last ``queue_length // world_size`` L2-normalised embeddings of this
    rank (``queue_length`` is first cut to a multiple of the global batch). Its prototype scores
    join the Sinkhorn input once it is full. It is a plain tensor attribute, not a buffer, so
    DDP's buffer broadcast does not overwrite each rank's queue with rank 0's; every rank's
    queue is saved in the checkpoint (``swav_queue``) and restored on resume. Its filled rows are
    counted on the host, so the training step never reads the queue back to see whether it is
    full (the official test of its last row).

    Optimiser: the official code wraps SGD in LARC (trust 0.001, no clipping) over all
    parameters with weight decay 1e-6, biases and BN included; :class:`sslzoo.optim.lars.LARS`
    with ``trust_ratio="larc"`` and one decayed group is the same update
    (``exclude_bias_and_norm=False``). ``min_lr`` and ``start_warmup_lr`` are absolute, like
    ``final_lr`` and ``start_warmup`` in main_swav.py: the defaults are the batch-4096 recipe's,
    and a run at another batch with them gets a warning at the start of training.

    Args:
        nmb_crops: number of crops of each size (2 global, 6 small).
        size_crops: crop side in pixels per group, for ``image_size == size_crops[0]``.
        min_scale_crops: RandomResizedCrop smallest area fraction per group.
        max_scale_crops: RandomResizedCrop largest area fraction per group.
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
        color_jitter_strength: colour distortion strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s).
        color_jitter_prob: probability of colour jitter.
        grayscale_prob: probability of grayscale.
        blur_prob: probability of the PIL Gaussian blur, on every crop.
        blur_sigma: range of the blur radius.
        hflip_prob: probability of a horizontal flip.
        sync_batchnorm: synchronise BatchNorm across devices.
        syncbn_process_group_size: synchronise it within groups of this many consecutive
            ranks (apex's ``create_syncbn_process_group``: 8 officially, so at batch 4096 on
            64 GPUs each group of 8 has its own statistics); ``None``: over all ranks.
        backbone: backbone name (see :class:`SSLMethod`).
        backbone_kwargs: backbone constructor arguments.
        cifar_stem: 3x3 stride-1 ResNet stem for 32x32 images.
        optimizer: ``lars`` (LARC) officially.
        lr: base learning rate per 256 images with linear scaling (0.3 -> 4.8 at batch 4096).
        lr_scaling: learning-rate scaling rule.
        weight_decay: weight decay of every parameter.
        momentum: SGD momentum.
        warmup_epochs: linear warmup from ``start_warmup_lr``, then cosine decay per step.
        start_warmup_lr: learning rate at step 0 (absolute, not scaled).
        min_lr: final learning rate (absolute; the recipe's base/1000 = 4.8/1000).
        lars_trust_coefficient: LARC trust coefficient.
        lars_trust_ratio: ``larc``: eta ||w|| / (||g|| + wd ||w|| + eps), apex ``LARC``
            with ``clip=False`` over every parameter.
        lars_lr_in_momentum: False: LARC scales the gradient, then torch's SGD steps.
        exclude_bias_and_norm: keep biases and norms out of weight decay and LARC adaptation
            (False: the official code adapts and decays every parameter).
    """

    linspace_warmup = True  # main_swav.py warms up with np.linspace

    def __init__(
        self,
        nmb_crops: tuple[int, ...] = (2, 6),
        size_crops: tuple[int, ...] = (224, 96),
        min_scale_crops: tuple[float, ...] = (0.14, 0.05),
        max_scale_crops: tuple[float, ...] = (1.0, 0.14),
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
        color_jitter_strength: float = 1.0,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        hflip_prob: float = 0.5,
        sync_batchnorm: bool = True,
        syncbn_process_group_size: int | None = 8,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        optimizer: OptimizerName = "lars",
        lr: float = 0.3,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 10.0,
        start_warmup_lr: float = 0.3,
        min_lr: float = 0.0048,
        lars_trust_coefficient: float = 1e-3,
        lars_trust_ratio: TrustRatio = "larc",
        lars_lr_in_momentum: bool = False,
        exclude_bias_and_norm: bool = False,
    ) -> None:
        if not len(nmb_crops) == len(size_crops) == len(min_scale_crops) == len(max_scale_crops):
            raise ValueError(
                "nmb_crops, size_crops, min_scale_crops and max_scale_crops need one entry per "
                "crop size"
            )
        if not crops_for_assign or not all(0 <= c < sum(nmb_crops) for c in crops_for_assign):
            raise ValueError(f"crops_for_assign {crops_for_assign} must index the crops")
        super().__init__(**init_arguments(SSLMethod, locals()))
        self.projection_head = SwAVProjectionHead(self.backbone.num_features, hidden_mlp, feat_dim)
        self.prototypes = nn.Linear(feat_dim, nmb_prototypes, bias=False)
        self._queue: torch.Tensor | None = None
        self._queue_rows = 0  # rows filled so far, counted on the host

    # ----------------------------------------------------------------- views
    def crop_sizes(self, image_size: int) -> list[int]:
        """``size_crops`` rescaled so that the global crops are ``image_size``."""
        sizes = self.hparams.size_crops
        return [max(1, round(s * image_size / sizes[0])) for s in sizes]

    def crop_settings(self, image_size: int) -> dict[str, Any]:
        """lightly's ``SwaVTransform`` arguments (but normalisation) of the recipe, shared by
        the PIL and the device views."""
        hp = self.hparams
        return dict(
            crop_sizes=tuple(self.crop_sizes(image_size)),
            crop_counts=tuple(hp.nmb_crops),
            crop_min_scales=tuple(hp.min_scale_crops),
            crop_max_scales=tuple(hp.max_scale_crops),
            hf_prob=hp.hflip_prob,
            cj_prob=hp.color_jitter_prob,
            cj_strength=hp.color_jitter_strength,
            random_gray_scale=hp.grayscale_prob,
            gaussian_blur=hp.blur_prob,
            sigmas=tuple(hp.blur_sigma),
        )

    def sync_batchnorm_group(self) -> Any:
        """Groups of ``syncbn_process_group_size`` consecutive ranks, as apex's grouped SyncBN."""
        return consecutive_groups(self.hparams.syncbn_process_group_size)

    def view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> ViewTransform:
        normalize = {"mean": list(mean), "std": list(std)}
        return SwaVTransform(**self.crop_settings(image_size), normalize=normalize)

    def device_view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> nn.Module | None:
        return swav_views(**self.crop_settings(image_size), mean=mean, std=std)

    # ----------------------------------------------------------------- prototypes and queue
    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Put every prototype back on the unit sphere (start of every iteration)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1, p=2))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """No prototype update during the first ``freeze_prototypes_niters`` steps."""
        if self.global_step < self.hparams.freeze_prototypes_niters:
            for p in self.prototypes.parameters():
                p.grad = None

    @property
    def queue(self) -> torch.Tensor | None:
        """This rank's queue (crops x length x feat_dim), newest embeddings first."""
        return self._queue

    @queue.setter
    def queue(self, queue: torch.Tensor | None) -> None:
        """Replace the queue (checkpoint restore); its filled rows are counted here, once."""
        self._queue = queue
        self._queue_rows = 0 if queue is None else filled_rows(queue)

    def _queue_for(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """This rank's queue, created at ``epoch_queue_starts`` (or resized after a restore
        under another batch or world size, keeping the newest entries)."""
        hp = self.hparams
        if hp.queue_length <= 0:
            return None
        if self.queue is None and self.current_epoch < hp.epoch_queue_starts:
            return None
        world = _world_size()
        global_batch = batch_size * world
        length = (hp.queue_length - hp.queue_length % global_batch) // world
        if length == 0:
            raise ValueError(
                f"queue_length {hp.queue_length} is shorter than the global batch {global_batch}"
            )
        if self._queue is None or self._queue.shape[1] != length:
            queue = torch.zeros(len(hp.crops_for_assign), length, hp.feat_dim, device=device)
            rows = 0
            if self._queue is not None:
                n = min(length, self._queue.shape[1])
                queue[:, :n] = self._queue[:, :n]
                rows = min(self._queue_rows, n)
            self._queue, self._queue_rows = queue, rows
        self._queue = self._queue.to(device)
        return self._queue

    @torch.no_grad()
    def queue_scores(self, embeddings: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """Prototype scores of the queued embeddings per assignment crop (``None`` while the
        queue is off or not yet full); then push this batch's assignment-crop embeddings."""
        batch = embeddings[0].shape[0]
        queue = self._queue_for(batch, embeddings[0].device)
        if queue is None:
            return None
        scores = None
        length = queue.shape[1]
        if self._queue_rows >= length:  # its last row is filled (official: last row != 0)
            weight = full_tensor(self.prototypes.weight).to(queue.dtype)  # gathered if sharded
            scores = [queue[i] @ weight.t() for i in range(len(queue))]
        for i, crop_id in enumerate(self.hparams.crops_for_assign):
            queue[i, batch:] = queue[i, :-batch].clone()
            queue[i, :batch] = embeddings[crop_id]
        self._queue_rows = min(self._queue_rows + batch, length)
        return scores

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save every rank's queue as ``swav_queue`` (world x crops x length x dim)."""
        if self.queue is None:
            return
        queues = [self.queue]
        if _world_size() > 1:
            local = self.queue.to(self.device).contiguous()
            queues = [torch.empty_like(local) for _ in range(_world_size())]
            dist.all_gather(queues, local)
        checkpoint["swav_queue"] = torch.stack(queues).cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's queue; under another world size the saved queues are
        concatenated and split evenly over the ranks."""
        queues = checkpoint.get("swav_queue")
        if queues is None:
            self.queue = None
            return
        world = _world_size()
        rank = dist.get_rank() if _distributed() else 0
        if queues.shape[0] == world:
            self.queue = queues[rank].clone()
        else:
            merged = torch.cat(list(queues), dim=1)
            self.queue = merged.tensor_split(world, dim=1)[rank].clone()

    # ----------------------------------------------------------------- training
    def on_train_start(self) -> None:
        """Warn when the absolute warmup-start and final learning rates of the batch-4096
        recipe meet another batch, whose peak learning rate they no longer fit."""
        defaults = {"start_warmup_lr": 0.3, "min_lr": 0.0048}
        kept = [k for k, v in defaults.items() if self.hparams[k] == v]
        if kept and self.global_batch_size != 4096:
            rank_zero_warn(
                f"SwAV: {' and '.join(kept)} keep the batch-4096 recipe's absolute values "
                f"({', '.join(str(defaults[k]) for k in kept)}), but the global batch is "
                f"{self.global_batch_size} and the peak learning rate {self.scaled_lr:g}; the "
                "official scripts set them with the batch (e.g. min_lr = peak / 1000)"
            )

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        views, labels = batch
        hp = self.hparams
        self.normalize_prototypes()
        features = forward_multicrop(self.backbone, views)
        z = F.normalize(self.projection_head(torch.cat(features)), dim=1)
        scores = self.prototypes(z)
        size = views[0].shape[0]
        z, scores = z.split(size), scores.split(size)
        loss = swav_loss(
            scores,
            hp.crops_for_assign,
            hp.temperature,
            hp.epsilon,
            hp.sinkhorn_iterations,
            self.queue_scores([e.detach() for e in z]),
        )
        return self.training_outputs(loss, z[0], features[0], labels)
