"""FSDP2 for every method: wrap policy, mixed precision, activation checkpointing, the strategy
preset carrying these settings, and its sharded checkpoints.

:func:`shard_method` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block
(timm ``Block``) and residual block (torchvision / timm ``BasicBlock``, ``Bottleneck``), then to
every top-level module of the method (backbone, heads, teacher copies), then to the method as
the root unit. FSDP2 splits every parameter along dim 0 over the ranks, and teachers go through
the same function as their students, so each teacher parameter has the same local shard as its
student's and the EMA update pairs local shards. Gradients are reduced in fp32; buffers
(DINO/iBOT centres, SwAV queue, BatchNorm statistics) are never touched by FSDP2 and stay fp32.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (which runs on CPU with gloo as
well as on GPUs) set to shard over every process; :func:`consolidate_checkpoint` turns its
sharded checkpoint folders into one file for evaluation and export.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision.models.resnet as tv_resnet
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from timm.models import resnet as timm_resnet
from timm.models.vision_transformer import Block
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm

ParamDtype = Literal["bf16", "fp16", "fp32"] | None
SHARDED_BLOCKS: tuple[type[nn.Module], ...] = (
    Block,
    tv_resnet.BasicBlock,
    tv_resnet.Bottleneck,
    timm_resnet.BasicBlock,
    timm_resnet.Bottleneck,
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ShardingConfig:
    """How :func:`shard_method` shards.

    Args:
        activation_checkpointing: recompute each trainable block's activations in backward.
        param_dtype: dtype parameters are all-gathered and computed in (``None``: their own);
            the sharded master weights, optimizer state and buffers stay fp32.
        reshard_after_forward: free gathered parameters after forward (ZeRO-3); ``False``
            keeps them until backward (ZeRO-2-like, more memory, less communication).
    """

    activation_checkpointing: bool = False
    param_dtype: ParamDtype = None
    reshard_after_forward: bool = True


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank for DTensors (a collective); any other
    tensor unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit in ``module`` (kept after a forward
    without backward, e.g. a teacher's, when ``reshard_after_forward`` is off), so its
    parameters are its local shards again. No-op for unsharded modules."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _fsdp_kwargs(mesh: DeviceMesh, config: ShardingConfig) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = DTYPES[config.param_dtype] if config.param_dtype else None
    return {
        "mesh": mesh,
        "reshard_after_forward": config.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
    }


def shard_module(
    module: nn.Module, mesh: DeviceMesh, config: ShardingConfig, own_unit: bool = True
) -> None:
    """Shard ``module`` in place: one FSDP unit per block in ``SHARDED_BLOCKS``, one for the
    rest of ``module`` if ``own_unit`` (else the rest joins the enclosing unit). Blocks of a
    trainable module get activation checkpointing if asked.

    With a ``param_dtype``, each BatchNorm layer is its own unit kept in fp32 (as FSDP1 does):
    its weight and bias stay fp32 next to its fp32 running statistics, and it normalises the
    low-precision activations in fp32 internally."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = _fsdp_kwargs(mesh, config)
    if config.param_dtype:
        fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
        for norm in module.modules():
            if isinstance(norm, _BatchNorm) and _has_params(norm):
                fully_shard(norm, **{**kwargs, "mp_policy": fp32})
    blocks = [m for m in module.modules() if isinstance(m, SHARDED_BLOCKS) and _has_params(m)]
    for block in blocks:
        if config.activation_checkpointing and _trainable(block):
            checkpoint(block)
        fully_shard(block, **kwargs)
    if own_unit:
        fully_shard(module, **kwargs)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule was already given to ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel mesh to shard over; refuses tensor parallelism, which no method
    implements."""
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "sslzoo shards data-parallel only: give ModelParallelStrategy "
            "data_parallel_size=<world size> and tensor_parallel_size=1 "
            "(sslzoo.sharding.FSDP2Strategy does this by default)"
        )
    return mesh["data_parallel"] if mesh.mesh_dim_names else mesh


def shard_method(
    method: nn.Module,
    mesh: DeviceMesh,
    config: ShardingConfig | None = None,
    forward_methods: tuple[str, ...] = ("training_step", "extract_features"),
) -> list[str]:
    """Shard ``method``: one FSDP unit per block, one per top-level module (students,
    teachers, heads), then ``method`` itself as the root unit, which holds every other
    parameter (iBOT's mask embedding, MAE's mask token); returns the top-level unit names.

    A method whose code reaches into a module's parameters without calling its ``forward``
    (iBOT and MAE run ViT internals) lists the top-level modules that may be units in a class
    attribute ``fsdp_units``; the others' parameters (blocks aside) join the root unit. The
    method's ``forward`` is not the entry point of training, so each of ``forward_methods``
    is made an FSDP forward (``register_fsdp_forward_method``): it gathers the root unit, which
    stays gathered until backward reduces its gradients (evaluation methods free it on
    return). Modules with buffers only (losses holding centres) stay replicated. Idempotent:
    an already sharded method is left as is.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    config = config or ShardingConfig()
    if is_sharded(method):
        return []
    mesh = data_parallel_mesh(mesh)
    allowed = getattr(method, "fsdp_units", None)
    units = []
    for name, child in method.named_children():
        if _has_params(child):
            own_unit = allowed is None or name in allowed
            shard_module(child, mesh, config, own_unit=own_unit)
            units += [name] if own_unit else []
    # kept gathered through nested forwards (MAE's training_step calls its forward); freed by
    # backward, or right after an evaluation method
    fully_shard(method, **{**_fsdp_kwargs(mesh, config), "reshard_after_forward": False})
    for name in forward_methods:
        if hasattr(method, name):
            register_fsdp_forward_method(method, name)
            if name != "training_step":
                _reshard_after(method, name)
    return units


def _reshard_after(module: nn.Module, name: str) -> None:
    """Make ``module.<name>`` free the module's gathered parameters when it returns."""
    method = getattr(module, name)

    @functools.wraps(method)
    def call_then_reshard(*args: Any, **kwargs: Any) -> Any:
        out = method(*args, **kwargs)
        module.reshard()
        return out

    setattr(module, name, call_then_reshard)


def local_numel(parameters: Iterable[torch.Tensor]) -> int:
    """Elements of ``parameters`` held by this rank (local shards of DTensors)."""
    return sum(local_tensor(p).numel() for p in parameters)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` set up for FSDP2 data parallelism, carrying the
    sharding settings :meth:`sslzoo.methods.base.SSLMethod.configure_model` reads.

    It also resumes from sharded checkpoints in which some parameters have no optimizer state
    yet (see :func:`init_saved_optimizer_state`), which the stock strategy refuses.

    The stock strategy defaults to ``data_parallel_size=num_nodes`` and
    ``tensor_parallel_size=devices``, a tensor-parallel layout; here data parallelism spans
    every process (``tensor_parallel_size=1``). Runs on GPUs (NCCL) and on CPU (gloo).

    Args:
        activation_checkpointing, param_dtype, reshard_after_forward: see
            :class:`ShardingConfig`.
        save_distributed_checkpoint: each rank writes its shards into a checkpoint folder
            (``True``) or rank 0 writes one full file (``False``).
        data_parallel_size: processes to shard over; ``"auto"``: all of them.
        process_group_backend: ``nccl`` / ``gloo``; ``None`` picks by device.
        timeout: collective timeout.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        param_dtype: ParamDtype = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        data_parallel_size: Literal["auto"] | int = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.sharding_config = ShardingConfig(
            activation_checkpointing, param_dtype, reshard_after_forward
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's sharded-checkpoint loading, except that parameters without saved
        optimizer state stay without state (see :func:`init_saved_optimizer_state`)."""
        path = Path(self.broadcast(checkpoint_path))
        if not (path / ".metadata").is_file():  # a full (single-file) checkpoint
            return super().load_checkpoint(path, weights_only)
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        model = self.model
        state = {"state_dict": get_model_state_dict(model)}
        load(state, checkpoint_id=path)
        model.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        options = StateDictOptions(cpu_offload=True, strict=False)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            init_saved_optimizer_state(model, optimizer, key, saved)
            optim_state = {key: get_optimizer_state_dict(model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(model, optimizer, optim_state[key], options=options)
        return torch.load(path / "meta.pt", weights_only=weights_only)


@torch.no_grad()
def _zero_lr_step(optimizer: torch.optim.Optimizer, params: set[int]) -> None:
    """One step with zero gradients on ``params`` (by id) and learning rate 0: the optimizer
    creates their state and changes no weight (torch's ``_init_optim_state``, restricted)."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p) if id(p) in params else None
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def init_saved_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, prefix: str, saved_keys: set[str]
) -> None:
    """Give ``optimizer`` state for exactly the parameters whose state a distributed checkpoint
    holds (keys ``{prefix}.state.{name}.{field}``), before it is loaded.

    torch's loader otherwise creates state for every parameter and then requires all of it in
    the checkpoint; parameters that had no state when saved (DINO's last layer, frozen during
    epoch 0, has no AdamW moments in an epoch-0 checkpoint) then fail with "Missing key in
    checkpoint state_dict". Left without state, they start their moments at their first
    update, as in the uninterrupted run.
    """
    if optimizer.state:
        return
    fields = {key.rsplit(".", 1)[0] for key in saved_keys if key.startswith(f"{prefix}.state.")}
    names = {id(p): name for name, p in module.named_parameters()}
    params = {
        id(p)
        for group in optimizer.param_groups
        for p in group["params"]
        if f"{prefix}.state.{names.get(id(p))}" in fields
    }
    if params:
        _zero_lr_step(optimizer, params)


def check_precision(precision: str) -> None:
    """Refuse true half precision, which would cast buffers (centres, queues, BatchNorm
    statistics) and master weights; FSDP2's ``param_dtype`` or autocast keep them fp32."""
    if precision in ("bf16-true", "16-true"):
        raise ValueError(
            f"precision={precision!r} casts every buffer and master weight to half precision; "
            "use precision '32-true' with the strategy's param_dtype='bf16', or 'bf16-mixed'"
        )


def consolidate_checkpoint(folder: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint folder as one ordinary Lightning checkpoint file with the full
    weights, hyperparameters and loop states, for evaluation and export (no process group
    needed). Optimizer states are left out: they are stored by parameter name, not in the
    layout a torch optimizer loads; resume training from the folder itself."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(Path(folder))
    checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("optimizer_")}
    out = Path(out)
    torch.save(checkpoint, out)
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m sslzoo.sharding SHARDED_CHECKPOINT_FOLDER OUT.ckpt")
    print(consolidate_checkpoint(sys.argv[1], sys.argv[2]))
