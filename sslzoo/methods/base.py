"""The contract every method fills in: backbone, heads, loss, views, parameter groups, teachers.

A method subclasses :class:`SSLMethod`, builds its heads in ``__init__``, returns its view recipe
from :meth:`view_transform`, and writes ``training_step`` like the paper's pseudocode, ending
with ``return self.training_outputs(...)``. Optimizer, learning-rate and weight-decay schedules,
linear LR scaling and feature extraction for evaluation live here.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import nn

from sslzoo.backbones import Backbone, build_backbone
from sslzoo.optim.lars import TrustRatio
from sslzoo.optim.optimizers import OptimizerName, build_optimizer, decay_groups, split_decay
from sslzoo.optim.schedules import cosine_to_one, warmup_cosine

ViewTransform = Callable[[Image.Image], list[torch.Tensor]]
# SSLMethod's own on_after_batch_transfer (device views) is meant to run with any datamodule
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer` in `LightningM")
LRScaling = Literal["linear", "sqrt", "none"]
NONFINITE_CHECK_EVERY = 25  # training batches between checks for a non-finite loss


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings: 0 under collapse, about 1/sqrt(d)
    for embeddings spread over the sphere."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def init_arguments(parent: type, values: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The arguments of ``parent.__init__`` found among a subclass's ``__init__`` locals, with
    ``overrides``: ``super().__init__(**init_arguments(SSLMethod, locals()))`` passes every
    shared setting a method re-declares (with its own default) up to the base class."""
    names = [n for n in inspect.signature(parent.__init__).parameters if n != "self"]
    return {**{n: values[n] for n in names if n in values}, **overrides}


def compile_views(views: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` the device views as one graph: the whole module, or its ``views``
    submodule when it also does host work (iBOT's masks)."""
    from sslzoo.augment import DeviceViews

    if isinstance(views, DeviceViews):
        return torch.compile(views, fullgraph=True, backend=backend)
    views.views = torch.compile(views.views, fullgraph=True, backend=backend)
    return views


def frozen(module: nn.Module) -> nn.Module:
    """``module`` with gradients off, used as an EMA teacher."""
    for p in module.parameters():
        p.requires_grad = False
    return module


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off, used as an EMA teacher."""
    return frozen(copy.deepcopy(module))


def forward_multicrop(module: nn.Module, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``module`` once per run of consecutive same-resolution views (DINO's
    ``MultiCropWrapper``, SwAV's grouping by crop size) and split the output back per view."""
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outputs += list(module(torch.cat(list(views[start:end]))).chunk(end - start))
        start = end
    return outputs


@dataclass(frozen=True)
class TeacherUpdate:
    """When and with which momentum the EMA callback updates a method's teachers
    (:meth:`SSLMethod.teacher_update`): ``t <- m t + (1 - m) s`` once per optimizer step k.

    Args:
        base_momentum: m0.
        cosine: ``m_k = 1 - (1 - m0)(1 + cos(pi k / K)) / 2`` over the K optimizer steps of the
            run; False keeps m0.
        before_step: update at the start of step k, before its forward, so the step's targets
            come from the teacher updated with m_k (MoCo v3); False: after step k's optimizer
            step (BYOL, DINO, iBOT).
    """

    base_momentum: float
    cosine: bool = True
    before_step: bool = False

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The momentum m_k of optimizer step ``step`` of ``total_steps``."""
        if not self.cosine:
            return self.base_momentum
        return cosine_to_one(step, total_steps, self.base_momentum)


class SSLMethod(L.LightningModule):
    """Base class of every self-supervised method.

    Args:
        backbone: backbone name for :func:`sslzoo.backbones.build_backbone` (``resnet18``, any
            torchvision classification model, any timm model).
        backbone_kwargs: extra constructor arguments for the backbone (``img_size``,
            ``patch_size``, ``drop_path_rate``...).
        cifar_stem: use the 3x3 stride-1 ResNet stem without max-pool (32x32 images).
        zero_init_residual: start the last BatchNorm of every residual block of a ResNet
            backbone, torchvision's or timm's, at zero scale; ``None`` keeps the library's
            default (off in torchvision, on in timm); other backbones ignore it.
        optimizer: ``sgd``, ``lars`` or ``adamw``.
        lr: base learning rate; scaled by the global batch according to ``lr_scaling``.
        lr_scaling: ``linear`` (lr x batch / 256), ``sqrt`` (lr x sqrt(batch)) or ``none``.
        weight_decay: weight decay of weights; biases and norms get none.
        weight_decay_end: if set, weight decay follows a cosine from ``weight_decay`` to this.
        momentum: SGD/LARS momentum.
        betas: AdamW betas.
        warmup_epochs: linear learning-rate warmup length, in epochs (fractions allowed).
        start_warmup_lr: learning rate at step 0 of the warmup.
        min_lr: learning rate at the end of the cosine decay (not scaled).
        lars_trust_coefficient: LARS trust coefficient (eta).
        lars_trust_ratio: ``update`` (eta ||w|| / ||g + wd w||: SimCLR, MoCo v3, BYOL, DINO)
            or ``larc`` (eta ||w|| / (||g|| + wd ||w||): apex LARC, as SwAV runs it).
        lars_lr_in_momentum: LARS scales the update by the learning rate before the momentum
            buffer (SimCLR's ``classic_momentum``) rather than after (torch's SGD).
        exclude_bias_and_norm: exclude biases and norm parameters from weight decay and LARS
            adaptation.
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm when training on several
            devices.
    """

    # the warmup's ramp reaches the peak at its last step (np.linspace) rather than the next
    linspace_warmup: bool = False

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool | None = None,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 1e-4,
        weight_decay_end: float | None = None,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 0.0,
        start_warmup_lr: float = 0.0,
        min_lr: float = 0.0,
        lars_trust_coefficient: float = 1e-3,
        lars_trust_ratio: TrustRatio = "update",
        lars_lr_in_momentum: bool = False,
        exclude_bias_and_norm: bool = True,
        sync_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.settings = SimpleNamespace(
            optimizer=optimizer,
            lr=lr,
            lr_scaling=lr_scaling,
            weight_decay=weight_decay,
            weight_decay_end=weight_decay_end,
            momentum=momentum,
            betas=tuple(betas),
            warmup_epochs=warmup_epochs,
            start_warmup_lr=start_warmup_lr,
            min_lr=min_lr,
            lars_trust_coefficient=lars_trust_coefficient,
            lars_trust_ratio=lars_trust_ratio,
            lars_lr_in_momentum=lars_lr_in_momentum,
            exclude_bias_and_norm=exclude_bias_and_norm,
            sync_batchnorm=sync_batchnorm,
        )
        kwargs = dict(backbone_kwargs or {})
        given = kwargs.pop("zero_init_residual", None)
        if None not in (given, zero_init_residual) and given != zero_init_residual:
            raise ValueError(
                f"backbone_kwargs.zero_init_residual={given} contradicts "
                f"zero_init_residual={zero_init_residual}: set zero_init_residual only"
            )
        self.backbone: Backbone = build_backbone(
            backbone,
            cifar_stem=cifar_stem,
            zero_init_residual=given if zero_init_residual is None else zero_init_residual,
            **kwargs,
        )
        self._steps_per_epoch: int | None = None
        # first optimizer step with a non-finite loss, -1 if none: kept on the device so the
        # training step never waits for the host
        self.register_buffer("_first_nonfinite_step", torch.tensor(-1), persistent=False)

    # ----------------------------------------------------------------- method contract
    def view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> ViewTransform:
        """The multi-view recipe: maps one PIL image to the list of augmented views."""
        raise NotImplementedError

    def device_view_transform(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> nn.Module | None:
        """The same recipe on whole batches on the device (:mod:`sslzoo.augment`): maps a uint8
        batch (N, 3, H, W) to the list of views, each image with its own parameters. None if
        the method has none (then it trains only from per-image views)."""
        return None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A batch of uint8 images, or of uint8 views already cropped in the workers (from a
        datamodule with ``device_augment``), becomes ``(views, labels)`` here, on its device,
        so ``training_step`` is unchanged."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return batch
        images, labels = batch
        first = images[0] if isinstance(images, (tuple, list)) and images else images
        if not (isinstance(first, torch.Tensor) and first.dtype == torch.uint8):
            return batch
        cache = getattr(self, "_device_views", None)  # a dict: not registered as a submodule
        if cache is None or cache["device"] != first.device:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is None:
                raise RuntimeError("uint8 batches need a datamodule giving image_size/mean/std")
            views = self.device_view_transform(dm.image_size, dm.mean, dm.std)
            if views is None:
                raise ValueError(f"{type(self).__name__} has no device views for uint8 batches")
            views = views.to(first.device)
            if getattr(dm, "compile_augment", False):
                views = compile_views(views)
            self._device_views = cache = {"device": first.device, "views": views}
        if self._trainer is not None and self.trainer.training:
            self._seed_device_augmentation(first.device)
        return cache["views"](images), labels

    def _seed_device_augmentation(self, device: torch.device) -> None:
        """Seed ``device``'s generator from (global seed, epoch, batch index, rank), so the
        views of a batch do not depend on what ran before it (a mid-epoch resume draws the
        same views). Seeding is host-side state: no sync with the device."""
        from sslzoo.seeding import derive_seed, global_seed

        trainer = self.trainer
        batch_idx = trainer.fit_loop.epoch_loop.batch_idx + 1  # the batch being transferred
        key = [global_seed(), trainer.current_epoch, batch_idx, trainer.global_rank]
        # the trailing 7 keeps these seeds apart from BatchSeed's seed of the same batch
        seed = derive_seed(*key, 7)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        # host-side draws of the views too (iBOT's masks); BatchSeed reseeds the host
        # generators for the training step itself
        torch.default_generator.manual_seed(seed)

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs updated by the EMA callback; none by default."""
        return []

    @property
    def ema_base_momentum(self) -> float:
        """Base EMA momentum m0 of the cosine-to-one teacher schedule."""
        raise NotImplementedError(f"{type(self).__name__} has no EMA teacher")

    def teacher_update(self) -> TeacherUpdate:
        """How the EMA callback updates :meth:`teacher_pairs`: by default after every optimizer
        step, with the momentum rising from :attr:`ema_base_momentum` to 1 on a cosine."""
        return TeacherUpdate(self.ema_base_momentum)

    @property
    def eval_backbone(self) -> nn.Module:
        """The backbone whose features are evaluated (kNN, probes, export)."""
        return self.backbone

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups. A group with ``fixed_lr=True`` keeps the scaled base
        learning rate instead of following the schedule."""
        decay, no_decay = split_decay(self.named_parameters(), self.settings.exclude_bias_and_norm)
        return decay_groups(decay, no_decay, self.settings.weight_decay)

    # ----------------------------------------------------------------- shared helpers
    def training_outputs(
        self,
        loss: torch.Tensor,
        embeddings: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Log the dashboard metrics and hand detached features to the probe callback."""
        first = self._first_nonfinite_step
        bad = ~torch.isfinite(loss.detach()) & (first < 0)
        first.copy_(torch.where(bad, torch.full_like(first, self.global_step), first))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/embedding_std", embedding_std(embeddings))
        return {"loss": loss, "features": features.detach(), "labels": labels}

    def log_scalar(self, name: str, value: float, **kwargs: Any) -> None:
        """``self.log`` of a Python number without a host-device sync: the value is written
        into a device tensor by a fill kernel, where Lightning's own conversion
        (``torch.tensor(value, device=...)``) is a blocking host-to-device copy."""
        tensor = torch.full((), value, dtype=torch.get_default_dtype(), device=self.device)
        self.log(name, tensor, **kwargs)

    def check_finite(self) -> None:
        """Stop the run if any loss so far was NaN or infinite (one host sync)."""
        step = int(self._first_nonfinite_step)
        if step >= 0:
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite loss at step {step}; training stopped. "
                "Checkpoints written before that step are kept; no checkpoint is written now."
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % NONFINITE_CHECK_EVERY == 0:
            self.check_finite()

    def on_validation_epoch_start(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write weights trained through a non-finite loss."""
        self.check_finite()

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation features of a batch of normalised images."""
        return self.eval_backbone(images)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images, labels = batch
        return {"features": self.extract_features(images), "labels": labels}

    def configure_callbacks(self) -> list[Callback]:
        """Bring the EMA teacher callback when the method has a teacher and the config has
        none, so a config that forgets it still trains correctly."""
        from sslzoo.callbacks.ema import EMATeacher

        if not self.teacher_pairs():
            return []
        if self._trainer is not None and any(
            isinstance(c, EMATeacher) for c in self.trainer.callbacks
        ):
            return []
        return [EMATeacher()]

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard with FSDP2: one unit per block,
        then one per top-level module, teachers exactly like their students
        (:func:`sslzoo.sharding.shard_method`). Other strategies need nothing here."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from sslzoo.sharding import ShardingConfig, check_precision, shard_method

        strategy = self.trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, ModelParallelStrategy):
            return
        check_precision(str(self.trainer.precision))
        shard_method(self, self.device_mesh, getattr(strategy, "sharding_config", ShardingConfig()))

    def setup(self, stage: str) -> None:
        """Synchronise BatchNorm over all ranks when asked to and training on several: torch's
        SyncBatchNorm on CUDA, :class:`sslzoo.nn.sync_batchnorm.SyncBatchNorm` elsewhere."""
        from sslzoo.nn.sync_batchnorm import convert_sync_batchnorm

        if self.settings.sync_batchnorm and self.trainer.world_size > 1:
            group = self.sync_batchnorm_group()
            convert_sync_batchnorm(self, group, device=self.trainer.strategy.root_device)

    def sync_batchnorm_group(self) -> Any:
        """The ranks BatchNorm statistics are synchronised over: ``None``, all of them."""
        return None

    # ----------------------------------------------------------------- optimisation
    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step across all devices."""
        dm = getattr(self.trainer, "datamodule", None)
        local = getattr(dm, "batch_size", None)
        if local is None:
            local = self.trainer.train_dataloader.batch_size
        return int(local) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    @property
    def scaled_lr(self) -> float:
        """The peak learning rate after batch-size scaling."""
        lr, scaling = self.settings.lr, self.settings.lr_scaling
        if scaling == "linear":
            return lr * self.global_batch_size / 256
        if scaling == "sqrt":
            return lr * math.sqrt(self.global_batch_size)
        return lr

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        if self._steps_per_epoch is None:
            batches = self.trainer.num_training_batches
            self._steps_per_epoch = max(
                1, math.ceil(batches / self.trainer.accumulate_grad_batches)
            )
        return self._steps_per_epoch

    @property
    def total_steps(self) -> int:
        """Optimizer steps the schedules span: the whole run."""
        return int(self.trainer.estimated_stepping_batches)

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps of the learning-rate warmup."""
        return round(self.settings.warmup_epochs * self.steps_per_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = self.parameter_groups()
        for g in groups:
            g["base_weight_decay"] = g["weight_decay"]
        st = self.settings
        # A fused step unscales fp16 gradients itself, after the gradient hooks and clipping
        # (DINO's per-parameter clip) that need them unscaled: not fused under a GradScaler.
        plugin = self.trainer.precision_plugin if self._trainer is not None else None
        scaled = getattr(plugin, "scaler", None) is not None
        return build_optimizer(
            st.optimizer,
            groups,
            st.lr,
            st.momentum,
            st.betas,
            st.lars_trust_coefficient,
            trust_ratio=st.lars_trust_ratio,
            lr_in_momentum=st.lars_lr_in_momentum,
            fused=False if scaled else None,
        )

    def learning_rate_at(self, step: int) -> float:
        """Scheduled learning rate at optimizer step ``step``."""
        st = self.settings
        return warmup_cosine(
            step,
            self.total_steps,
            self.warmup_steps,
            self.scaled_lr,
            st.min_lr,
            st.start_warmup_lr,
            linspace_warmup=self.linspace_warmup,
        )

    def weight_decay_at(self, step: int, base: float) -> float:
        """Scheduled weight decay of a group whose base decay is ``base``."""
        end = self.settings.weight_decay_end
        if end is None or base == 0.0:
            return base
        return warmup_cosine(step, self.total_steps, 0, base, end)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Set this step's learning rate and weight decay in every group."""
        step = self.global_step
        lr = self.learning_rate_at(step)
        optimizers = self.optimizers(use_pl_optimizer=False)
        for opt in optimizers if isinstance(optimizers, list) else [optimizers]:
            for g in opt.param_groups:
                g["lr"] = self.scaled_lr if g.get("fixed_lr") else lr
                g["weight_decay"] = self.weight_decay_at(step, g["base_weight_decay"])
        self.log_scalar("train/lr", lr)
