"""Every method trains for 2 steps under bf16 autocast, and for 2 steps with its backbones
compiled (:class:`~sslzoo.callbacks.CompileBackbone`), in fp32 and under bf16 autocast, on the
CPU: each step's loss is finite, the backbone's weights move and every weight stays fp32. Dtype
and graph errors then show up before a first GPU run. Every method of ``sslzoo.methods`` is a
case; a new one fails here until it has a tiny configuration below.

The backbones compile with ``aot_eager``: TorchDynamo's capture and AOTAutograd's joint forward
and backward graph, the device-independent part of ``torch.compile``. Inductor's code for the
CPU is not what a GPU runs (Triton), and on 2 cores it took minutes with an empty cache: the
bf16 cases took 180 s with inductor (60 s for the first, then 35-40 s for each new backbone
and input size), against 10 s with ``aot_eager``. Cases with the same backbone and shapes
share their graphs (Dynamo guards on shapes and grad mode, not on the module).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import sslzoo.methods as methods
from sslzoo.backbones import Backbone
from sslzoo.callbacks import CompileBackbone
from sslzoo.datamodules import DigitsDataModule
from sslzoo.methods.base import declared_default
from sslzoo.methods.dino import VIEWS as DINO_VIEWS
from sslzoo.methods.dinov2 import VIEWS as DINOV2_VIEWS
from sslzoo.methods.ibot import VIEWS as IBOT_VIEWS
from tests.conftest import SMALL_SWAV, TINY_HEADS, TINY_RESNET
from tests.helpers import digits, quiet_trainer

STEPS = 2
NAMES = [name for name in methods.__all__ if name != "SSLMethod"]
TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2),
)
HEAD = dict(out_dim=32, hidden_dim=32, bottleneck_dim=16)
# small heads on the tiny backbones; no warmup, so the first step already moves the weights
TINY: dict[str, dict[str, Any]] = {
    **{name: dict(**TINY_RESNET, **heads) for name, heads in TINY_HEADS.items()},
    "SwAV": SMALL_SWAV,
    "DINO": dict(**TINY_VIT, **HEAD, views=DINO_VIEWS.replace(local_crops_number=2)),
    "IBOT": dict(
        **TINY_VIT, **HEAD, patch_out_dim=32, views=IBOT_VIEWS.replace(local_crops_number=2)
    ),
    "DINOv2": dict(
        **TINY_VIT,
        **HEAD,
        official_epoch_length=None,
        views=DINOV2_VIEWS.replace(local_crops_number=2),
    ),  # fmt: skip
    "MAE": dict(**TINY_VIT, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2),
    "Distillation": dict(
        **TINY_RESNET,
        teacher=TINY_VIT["backbone"],
        teacher_kwargs=TINY_VIT["backbone_kwargs"],
        n_teacher_blocks=1,
    ),
}


@pytest.fixture(scope="module")
def data() -> DigitsDataModule:
    """One datamodule for every case: each fit builds its datasets with its method's views."""
    return digits(batch_size=4, image_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread_fresh_compiler() -> Iterator[None]:
    """One intra-op thread (a second only adds overhead to tiny tensors on a busy machine);
    graphs compiled here are reused by the cases here only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


class Losses(L.Callback):
    """Each training step's loss."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.losses.append(outputs["loss"].detach().float())


class ComputeDtypes(L.Callback):
    """The output dtypes of the backbone's convolutions and linear layers."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in pl_module.backbone.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.register_forward_hook(lambda m, args, out: self.dtypes.add(out.dtype))


def train(
    name: str, data: DigitsDataModule, precision: str, callbacks: Sequence[L.Callback]
) -> L.LightningModule:
    """``STEPS`` steps of the tiny ``name``: finite losses, the backbone moved, and weights
    (teachers' too) kept in fp32."""
    if name not in TINY:
        pytest.fail(f"{name} has no tiny configuration in tests/test_gpu_readiness.py")
    torch.manual_seed(0)
    method = getattr(methods, name)
    optim = declared_default(method, "optim").replace(warmup_epochs=0)
    model = method(**TINY[name], optim=optim)
    data.views = model.views
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    losses = Losses()
    trainer = quiet_trainer(
        max_steps=STEPS,
        limit_val_batches=0,
        precision=precision,
        callbacks=[losses, *callbacks],
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == STEPS
    assert len(losses.losses) == STEPS and all(torch.isfinite(x) for x in losses.losses)
    after = dict(model.named_parameters())
    moved = [k for k, p in before.items() if not torch.equal(p, after[k].detach())]
    assert any(k.startswith("backbone.") for k in moved), "the backbone did not move"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


@pytest.mark.parametrize("name", NAMES)
def test_trains_under_bf16_autocast(name: str, data: DigitsDataModule) -> None:
    dtypes = ComputeDtypes()
    train(name, data, "bf16-mixed", [dtypes])
    assert torch.bfloat16 in dtypes.dtypes  # autocast did compute in bf16


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", NAMES)
def test_trains_with_compiled_backbones(name: str, precision: str, data: DigitsDataModule) -> None:
    model = train(name, data, precision, [CompileBackbone(backend="aot_eager")])
    backbones = [m for m in model.modules() if isinstance(m, Backbone)]
    assert backbones and all(b.model._compiled_call_impl is not None for b in backbones)
