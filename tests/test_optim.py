"""Parameter groups, learning-rate scaling and the per-step schedule."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from lightly.utils.lars import LARS
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from sslzoo.methods import optim
from sslzoo.methods.byol import BYOL
from sslzoo.methods.optim import build_optimizer, split_decay, use_fused
from sslzoo.methods.schedules import warmup_cosine
from sslzoo.methods.simclr import SimCLR
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer


def test_biases_and_norms_get_no_weight_decay() -> None:
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, sync_batchnorm=False)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert groups["decay"]["weight_decay"] == 1e-6 and groups["no_decay"]["weight_decay"] == 0
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"])
    frozen = model.projection_head[-1].bias  # the beta-free last BN
    assert all(p is not frozen for g in groups.values() for p in g["params"])


def test_teacher_parameters_are_not_optimized() -> None:
    model = BYOL(**TINY_RESNET, projector_hidden_dim=16, predictor_hidden_dim=16)
    decay, no_decay = split_decay(model.named_parameters())
    ids = {id(p) for p in decay + no_decay}
    assert not any(id(p) in ids for p in model.target_backbone.parameters())


def test_lars_skips_adaptation_for_no_decay_groups() -> None:
    """lightly's LARS applies the trust ratio only where weight decay is non-zero, so the
    no-decay group (biases, norms) takes plain momentum-SGD steps: the official rule."""
    w, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4))
    opt = LARS(
        [{"params": [w], "weight_decay": 1e-6}, {"params": [b], "weight_decay": 0.0}], lr=1.0
    )
    w.grad, b.grad = torch.full((4, 4), 0.5), torch.full((4,), 0.5)
    opt.step()
    assert torch.allclose(b, torch.full((4,), 0.5))  # 1 - lr * grad
    trust = 1e-3 * w.detach().new_tensor(4.0) / (torch.full((4, 4), 0.5).norm() + 1e-6 * 4)
    assert not torch.allclose(w, torch.full((4, 4), 0.5))
    assert float(w[0, 0]) == pytest.approx(1 - float(trust) * (0.5 + 1e-6), rel=1e-3)


@pytest.mark.parametrize("scaling", ["linear", "sqrt"])
def test_scheduled_lr_in_every_group(scaling: str) -> None:
    torch.manual_seed(0)
    model = SimCLR(
        **TINY_RESNET, proj_hidden_dim=16, sync_batchnorm=False, optimizer="sgd",
        lr=0.4, lr_scaling=scaling, warmup_epochs=1, min_lr=0.001,
    )  # fmt: skip
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(model, datamodule=digits(batch_size=32))
    peak = 0.4 * 32 / 256 if scaling == "linear" else 0.4 * math.sqrt(32)
    assert model.scaled_lr == pytest.approx(peak)
    last_step = trainer.global_step - 1
    expected = warmup_cosine(last_step, 8, 4, peak, 0.001)
    for group in trainer.optimizers[0].param_groups:
        assert group["lr"] == pytest.approx(expected)
    assert float(trainer.callback_metrics["train/lr"]) == pytest.approx(expected)


# ------------------------------------------------------------------------- fused kernels
FUSED_KERNEL = {"sgd": "_fused_sgd_", "adamw": "_fused_adamw_"}


def tiny_groups(model: nn.Module) -> list[dict]:
    decay, no_decay = split_decay(model.named_parameters())
    return [
        {"params": decay, "weight_decay": 0.05, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build(name: str, model: nn.Module, fused: bool | None) -> torch.optim.Optimizer:
    return build_optimizer(name, tiny_groups(model), 0.1, 0.9, (0.9, 0.95), 1e-3, fused=fused)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_steps_match_the_default_kernels_on_cpu(name: str) -> None:
    """torch runs fused SGD/AdamW on CPU too: the same five steps from the same start, with
    the same gradients, through the fused kernel and through torch's default agree."""
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    models = {fused: copy.deepcopy(start) for fused in (True, False)}
    kernel = getattr(torch, FUSED_KERNEL[name])
    for fused, model in models.items():
        opt = build(name, model, fused)
        assert bool(opt.defaults["fused"]) is fused
        grads = torch.Generator().manual_seed(1)
        with mock.patch.object(torch, FUSED_KERNEL[name], wraps=kernel) as spy:
            for _ in range(5):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=grads)
                opt.step()
        assert spy.called is fused  # the fused path really ran, and only when asked
    fused, default = (list(models[f].parameters()) for f in (True, False))
    for a, b, s in zip(fused, default, start.parameters(), strict=True):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_use_fused_wants_plain_floating_tensors_on_cuda() -> None:
    weight, bias = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.zeros(4))
    assert not use_fused([weight, bias])  # CPU
    assert use_fused([weight, bias], device_types=("cpu",))
    assert not use_fused([], device_types=("cpu",))
    assert not use_fused([weight, torch.zeros(4, dtype=torch.long)], device_types=("cpu",))


def test_use_fused_refuses_dtensors(tmp_path: Path) -> None:
    """A DTensor parameter (FSDP2's sharded parameters) is never fused, even on a device
    where plain tensors would be: a one-rank gloo mesh on CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        assert isinstance(sharded, DTensor)
        plain = nn.Parameter(torch.randn(4))
        assert use_fused([plain], device_types=("cpu",))
        assert not use_fused([plain, sharded], device_types=("cpu",))
        assert not use_fused([sharded], device_types=("cpu",))
    finally:
        dist.destroy_process_group()


def test_build_optimizer_fuses_only_where_use_fused_says(monkeypatch) -> None:
    model = nn.Linear(4, 2)
    for name in ("sgd", "adamw"):  # CPU: torch's default kernels, foreach left to torch
        opt = build(name, model, None)
        assert opt.defaults["fused"] is None and opt.defaults["foreach"] is None
        assert build(name, model, False).defaults["fused"] is None
    monkeypatch.setattr(optim, "use_fused", lambda params: True)  # as for CUDA parameters
    assert build("sgd", model, None).defaults["fused"] is True
    assert build("adamw", model, None).defaults["fused"] is True
    assert isinstance(build("lars", model, None), LARS)
    with pytest.raises(ValueError, match="LARS has no fused kernel"):
        build("lars", model, True)


@pytest.mark.parametrize("fp16", [False, True])
def test_no_fused_optimizer_under_a_grad_scaler(fp16: bool, monkeypatch) -> None:
    """A fused step unscales fp16 gradients inside itself, after the hooks and clipping that
    need them unscaled (DINO clips each gradient): under a GradScaler it is never fused.
    (Lightning turns ``16-mixed`` into ``bf16-mixed`` on CPU, so the plugin is given.)"""
    monkeypatch.setattr(optim, "use_fused", lambda params: True)  # as for CUDA parameters
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, sync_batchnorm=False, optimizer="adamw")
    scaler = torch.amp.GradScaler("cpu")
    plugins = [MixedPrecision("16-mixed", "cpu", scaler)] if fp16 else []
    model.trainer = quiet_trainer(plugins=plugins)
    assert (getattr(model.trainer.precision_plugin, "scaler", None) is scaler) is fp16
    assert bool(model.configure_optimizers().defaults["fused"]) is not fp16
