"""The contract every method fills in: backbone, heads, loss, views recipe, teachers.

A method subclasses :class:`SSLMethod`, declares its official view recipe (``views``) and
optimisation settings (``optim``) as typed arguments with the official defaults, builds its
heads in ``__init__``, sets its loss as ``self.criterion``, and writes ``training_step`` like
the paper's pseudocode, ending with ``return self.training_outputs(...)``. The datamodule
builds the views from the recipe; the optimizer, learning-rate and weight-decay schedules,
linear LR scaling and feature extraction for evaluation live here.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from sslzoo.augment.recipes import Views
from sslzoo.backbones import Backbone, build_backbone
from sslzoo.nn.teachers import TeacherUpdate
from sslzoo.optim.optimizers import build_optimizer, decay_groups, split_decay
from sslzoo.optim.schedules import warmup_cosine
from sslzoo.optim.settings import Optimization, as_settings
from sslzoo.pretrained import load_backbone_weights

NONFINITE_CHECK_EVERY = 25  # training batches between checks for a non-finite loss


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings: 0 under collapse, about 1/sqrt(d)
    for embeddings spread over the sphere."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def declared_default(cls: type, name: str) -> Any:
    """The default of ``name`` in the nearest ``__init__`` of ``cls``'s MRO that declares it
    (a subclass passing ``**kwargs`` up keeps its parent's default)."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            parameter = inspect.signature(klass.__init__).parameters.get(name)
            if parameter is not None and parameter.default is not inspect.Parameter.empty:
                return parameter.default
    return None


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
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm when training on several
            devices.
        views: the view recipe (:mod:`sslzoo.augment.recipes`); each method's default is its
            official one. The datamodule builds the views from it.
        optim: the optimisation settings (:class:`~sslzoo.optim.settings.Optimization`); each
            method's default is its official recipe.
        init_backbone: a weights file the backbone starts from, in DINOv2's or DINOv3's
            released naming, timm's, ``sslzoo export``'s, or an sslzoo checkpoint
            (:mod:`sslzoo.pretrained`); loaded when training starts, into the backbone and
            every teacher copy of it, position embeddings resampled to the image size. Heads
            start new. A resumed run reads the file too, then takes the checkpoint's weights.
        freeze_backbone_steps: optimizer steps, from the first, during which only the heads
            train: the backbone's gradients are dropped, so it gets no update and no weight
            decay (its BatchNorm statistics, if any, still follow the data).
    """

    # the warmup's ramp reaches the peak at its last step (np.linspace) rather than the next
    linspace_warmup: bool = False

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool | None = None,
        sync_batchnorm: bool = False,
        views: Views = Views(),
        optim: Optimization = Optimization(),
        init_backbone: str | None = None,
        freeze_backbone_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cls = type(self)
        self.views = as_settings(views, declared_default(cls, "views"))
        self.optim: Optimization = as_settings(optim, declared_default(cls, "optim"))
        # checkpoints hold plain values (weights_only loading): the settings as mappings
        for name in ("views", "optim"):
            self.hparams[name] = dataclasses.asdict(getattr(self, name))
        self.sync_batchnorm = sync_batchnorm
        if freeze_backbone_steps < 0:
            raise ValueError(f"freeze_backbone_steps must be >= 0, not {freeze_backbone_steps}")
        self.init_backbone = init_backbone
        self.freeze_backbone_steps = freeze_backbone_steps
        self._backbone_arguments = (backbone, backbone_kwargs, cifar_stem, zero_init_residual)
        self.backbone: Backbone = self.new_backbone()
        self.criterion: nn.Module | None = None  # the loss; each method sets its own
        self._steps_per_epoch: int | None = None
        # first optimizer step with a non-finite loss, -1 if none: kept on the device so the
        # training step never waits for the host
        self.register_buffer("_first_nonfinite_step", torch.tensor(-1), persistent=False)

    def new_backbone(self) -> Backbone:
        """A freshly initialised backbone as the arguments describe (the student's, or a
        teacher drawn on its own)."""
        name, kwargs, cifar_stem, chosen = self._backbone_arguments
        kwargs = dict(kwargs or {})
        given = kwargs.pop("zero_init_residual", None)
        if None not in (given, chosen) and given != chosen:
            raise ValueError(
                f"backbone_kwargs.zero_init_residual={given} contradicts "
                f"zero_init_residual={chosen}: set zero_init_residual only"
            )
        zero_init = given if chosen is None else chosen
        return build_backbone(name, cifar_stem=cifar_stem, zero_init_residual=zero_init, **kwargs)

    @torch.no_grad()
    def load_init_backbone(self) -> None:
        """Load :attr:`init_backbone` into the backbone, then copy it into every teacher of
        the backbone (:meth:`teacher_pairs`), so teachers start as the student."""
        if self.init_backbone is None:
            return
        load_backbone_weights(self.backbone.model, self.init_backbone)
        for student, teacher in self.teacher_pairs():
            if student is self.backbone:
                teacher.load_state_dict(student.state_dict())

    def backbone_frozen(self) -> bool:
        """Whether this optimizer step leaves the backbone as it is (the first
        ``freeze_backbone_steps``): a function of the step, so a resumed run agrees."""
        return self.global_step < self.freeze_backbone_steps

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the backbone's gradients while it is frozen: optimizers skip parameters
        without a gradient (no update, no weight decay, no moment update)."""
        if self.backbone_frozen():
            for p in self.backbone.parameters():
                p.grad = None

    def clip_method_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """The method's own gradient clipping (after AMP unscaling); none by default."""

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """:meth:`clip_method_gradients`, then the trainer's ``gradient_clip_val`` if set."""
        self.clip_method_gradients(optimizer)
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------- method contract
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

    @property
    def projection_mlp(self) -> nn.Sequential | None:
        """The MLP projection head on :attr:`eval_backbone`'s features, whose first layers
        fine-tuning may keep (SimCLR v2's ``ft_proj_selector``); None where the method has
        none."""
        return None

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups. A group with ``fixed_lr=True`` keeps the scaled base
        learning rate instead of following the schedule; one with ``lr_scale`` takes that
        multiple of the learning rate."""
        decay, no_decay = split_decay(self.named_parameters(), self.optim.exclude_bias_and_norm)
        return decay_groups(decay, no_decay, self.optim.weight_decay)

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
        """Refuse to write weights trained through a non-finite loss; record which module is
        the evaluation backbone (what ``init_backbone`` reads from the file)."""
        self.check_finite()
        names = (name for name, m in self.named_modules() if m is self.eval_backbone)
        checkpoint["eval_backbone"] = next(names, None)

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
        """Load :attr:`init_backbone` before training (a resumed run's checkpoint then replaces
        it), and synchronise BatchNorm over all ranks when asked to and training on several: torch's
        SyncBatchNorm on CUDA, :class:`sslzoo.nn.sync_batchnorm.SyncBatchNorm` elsewhere."""
        from sslzoo.nn.sync_batchnorm import convert_sync_batchnorm

        if stage == "fit":
            self.load_init_backbone()
        if self.sync_batchnorm and self.trainer.world_size > 1:
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
        lr, scaling = self.optim.lr, self.optim.lr_scaling
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
        return round(self.optim.warmup_epochs * self.steps_per_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = self.parameter_groups()
        for g in groups:
            g["base_weight_decay"] = g["weight_decay"]
        st = self.optim
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
        st = self.optim
        return warmup_cosine(
            step,
            self.total_steps,
            self.warmup_steps,
            self.scaled_lr,
            st.min_lr if st.min_lr_ratio is None else st.min_lr_ratio * self.scaled_lr,
            st.start_warmup_lr,
            linspace_warmup=self.linspace_warmup,
        )

    def weight_decay_at(self, step: int, base: float) -> float:
        """Scheduled weight decay of a group whose base decay is ``base``."""
        end = self.optim.weight_decay_end
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
                g["lr"] = (self.scaled_lr if g.get("fixed_lr") else lr) * g.get("lr_scale", 1.0)
                g["weight_decay"] = self.weight_decay_at(step, g["base_weight_decay"])
        self.log_scalar("train/lr", lr)
