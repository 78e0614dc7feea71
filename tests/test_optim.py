"""Parameter groups, learning-rate scaling and the per-step schedule."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightly.utils.lars import LARS as LightlyLARS
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

import sslzoo.methods as methods
from sslzoo.methods.byol import BYOL
from sslzoo.methods.simclr import SimCLR
from sslzoo.optim import optimizers as optim
from sslzoo.optim.lars import LARS
from sslzoo.optim.optimizers import build_optimizer, decay_groups, split_decay, use_fused
from sslzoo.optim.schedules import warmup_cosine
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer
from tests.test_host_sync import HostSync, host_syncs_refused


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


def test_lars_adapts_by_group_flag_not_by_weight_decay() -> None:
    """The no-decay group (biases, norms: ``lars_adapt=False``) takes plain momentum-SGD
    steps, the official rule; a decayed group with weight decay 0 is still adapted (the
    official code excludes by parameter, never by the value of the decay)."""
    w, v, b = (torch.nn.Parameter(torch.ones(shape)) for shape in ((4, 4), (4, 4), (4,)))
    groups = [
        {"params": [w], "weight_decay": 1e-6},
        {"params": [v], "weight_decay": 0.0},
        *decay_groups([], [b], 1e-6)[1:],
    ]
    opt = LARS(groups, lr=1.0)
    w.grad, v.grad, b.grad = torch.full((4, 4), 0.5), torch.full((4, 4), 0.5), torch.full((4,), 0.5)
    opt.step()
    assert torch.allclose(b, torch.full((4,), 0.5))  # 1 - lr * grad
    u = 0.5 + 1e-6  # g + wd w, every entry
    trust = 1e-3 * 4.0 / (4 * u)  # eta ||w|| / ||u||, norms of 4x4 constants
    assert float(w.detach()[0, 0]) == pytest.approx(1 - trust * u, rel=1e-6)
    assert float(v.detach()[0, 0]) == pytest.approx(1 - 1e-3 * 4.0 / (4 * 0.5) * 0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("name", "trust_ratio", "lr_in_momentum"),
    [("SimCLR", "update", True), ("MoCoV3", "update", False), ("BYOL", "update", False),
     ("SwAV", "larc", False)],
)  # fmt: skip
def test_each_method_builds_its_official_lars(
    name: str, trust_ratio: str, lr_in_momentum: bool
) -> None:
    """SimCLR's LARS (``lars_optimizer.py``) puts the learning rate inside the momentum, MoCo v3
    and BYOL divide by the norm of the decayed update, SwAV runs apex LARC over every
    parameter; biases and norms are not adapted where the recipe excludes them from decay."""
    model = getattr(methods, name)(**TINY_RESNET, optimizer="lars", sync_batchnorm=False)
    model.trainer = quiet_trainer()
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, LARS)
    for group in optimizer.param_groups:
        assert group["trust_ratio"] == trust_ratio and group["lr_in_momentum"] is lr_in_momentum
        assert group["lars_adapt"] is (group["name"] == "decay"), group["name"]
    adapted = {id(p) for g in optimizer.param_groups if g["lars_adapt"] for p in g["params"]}
    biases = [p for p in model.parameters() if p.requires_grad and p.ndim == 1]
    assert all((id(p) in adapted) is (name == "SwAV") for p in biases)


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
    # SimCLR's schedule spans the official 128 images x 2 epochs // 32 + 1 = 9 steps (the
    # epochs are cut to 4 batches of 32) with 1 x 128 // 32 = 4 of warmup
    expected = warmup_cosine(last_step, 9, 4, peak, 0.001)
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


# ------------------------------------------------------------------ LARS against lightly's
# Parameters covering every branch of the update: decayed and adapted weights (one in float64,
# a bucket of its own), a decayed tensor with zero weights and one with a zero gradient (both
# left unadapted and undecayed), biases in a group without weight decay (never adapted), and
# one parameter without gradient.
LARS_SHAPES = {
    "weight": (6, 5),
    "double": (3, 2),
    "zero_weight": (5, 3),
    "zero_grad": (4, 4),
    "bias": (6,),
}
LARS_OPTIONS = {
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "dampening": dict(momentum=0.9, dampening=0.1),
    "plain": dict(momentum=0.0),
}


def lars_params() -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = {k: nn.Parameter(torch.randn(shape, generator=g)) for k, shape in LARS_SHAPES.items()}
    params["zero_weight"].data.zero_()
    params["double"].data = params["double"].data.double()
    params["no_grad"] = nn.Parameter(torch.randn(3, generator=g))
    return params


def lars_groups(params: dict[str, nn.Parameter], weight_decay: float = 0.05) -> list[dict]:
    decayed = [params[k] for k in ("weight", "double", "zero_weight", "zero_grad")]
    return decay_groups(decayed, [params["bias"], params["no_grad"]], weight_decay)


def lars_steps(
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    steps: int,
    seed: int,
    lrs: list[float] | None = None,
) -> None:
    """``steps`` steps with gradients drawn from ``seed``; ``zero_grad`` gets zeros and
    ``no_grad`` none. ``lrs``: the learning rate of every group at each step."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups if lrs else []:
            group["lr"] = lrs[step]
        for name, p in params.items():
            grad = torch.randn(p.shape, generator=g).to(p.dtype)
            p.grad = None if name == "no_grad" else grad
        params["zero_grad"].grad.zero_()
        optimizer.step()


def assert_same_params(a: dict[str, nn.Parameter], b: dict[str, nn.Parameter]) -> None:
    # rtol 1e-6 / atol 1e-7: a few float32 ulps. Both optimizers do the same operations in the
    # same order (bit for bit equal on CPU today), but _foreach_norm may sum in another order
    # than torch.norm on other devices or torch versions.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("options", list(LARS_OPTIONS))
def test_lars_steps_equal_lightly(options: str, foreach: bool) -> None:
    """Six steps from the same start with the same gradients, one tensor at a time (the CPU
    default) and in whole (device, dtype) buckets (the CUDA default)."""
    ours, theirs, start = lars_params(), lars_params(), lars_params()
    kwargs = dict(lr=0.5, trust_coefficient=0.02, **LARS_OPTIONS[options])
    optimizer = LARS(lars_groups(ours), foreach=foreach, trust_ratio="larc", **kwargs)
    lars_steps(optimizer, ours, 6, seed=1)
    lars_steps(LightlyLARS(lars_groups(theirs), **kwargs), theirs, 6, seed=1)
    assert_same_params(ours, theirs)
    assert torch.equal(ours["no_grad"], start["no_grad"])
    for name in ("weight", "double", "zero_weight", "bias"):
        assert not torch.equal(ours[name], start[name]), name
    assert ours["double"].dtype == torch.float64
    # a zero gradient is neither decayed nor adapted: a zero update, every step
    assert torch.equal(ours["zero_grad"], start["zero_grad"])


@pytest.mark.parametrize("trust_ratio", ["update", "larc"])
def test_lars_adapts_by_the_trust_ratio(trust_ratio: str) -> None:
    """One step without momentum against the formula: the decayed weight's update is
    ``lr * trust * (g + wd * w)``, with ``trust = eta ||w|| / ||g + wd w||`` (``update``) or
    ``eta ||w|| / (||g|| + wd ||w|| + eps)`` (``larc``); the zero tensor takes the plain step
    ``lr * g``."""
    params, start = lars_params(), lars_params()
    groups = lars_groups(params, weight_decay=0.1)
    optimizer = LARS(groups, lr=0.5, trust_coefficient=0.02, trust_ratio=trust_ratio)
    lars_steps(optimizer, params, 1, seed=1)
    g = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(shape, generator=g) for k, shape in LARS_SHAPES.items()}
    w, grad = start["weight"].detach(), grads["weight"]
    if trust_ratio == "update":
        trust = 0.02 * w.norm() / (grad + 0.1 * w).norm()
    else:
        trust = 0.02 * w.norm() / (grad.norm() + 0.1 * w.norm() + 1e-8)
    torch.testing.assert_close(params["weight"], w - 0.5 * trust * (grad + 0.1 * w))
    torch.testing.assert_close(params["zero_weight"], -0.5 * grads["zero_weight"])
    torch.testing.assert_close(params["bias"], start["bias"] - 0.5 * grads["bias"])


def reference_lars_steps(
    params: dict[str, nn.Parameter], steps: int, seed: int, lrs: list[float], classic: bool
) -> None:
    """The official update, one parameter at a time, written out: MoCo v3's and DINO's
    ``LARS`` (``mu = m mu + q u; p -= lr mu``) or, with ``classic``, SimCLR's
    ``classic_momentum`` (``v = m v + lr q u; p -= v``), where ``u = g + wd p`` and
    ``q = eta ||p|| / ||u||`` if both norms are positive, else 1; biases (the no-decay group)
    take ``u = g``, ``q = 1``. Gradients as :func:`lars_steps` draws them."""
    eta, wd, m = 0.02, 0.05, 0.9
    buffers: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for step in range(steps):
            for name, p in params.items():
                grad = torch.randn(p.shape, generator=g).to(p.dtype)
                if name == "no_grad":
                    continue
                if name == "zero_grad":
                    grad = torch.zeros_like(p)
                u, q = grad, 1.0
                if name != "bias":
                    u = grad + wd * p
                    if p.norm() > 0 and u.norm() > 0:
                        q = eta * p.norm() / u.norm()
                update = lrs[step] * q * u if classic else q * u
                buf = buffers.get(name, torch.zeros_like(p))
                buffers[name] = buf = m * buf + update
                p -= buf if classic else lrs[step] * buf


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("lr_in_momentum", [False, True], ids=["moco_dino", "simclr"])
def test_lars_update_trust_ratio_equals_the_official_update(
    lr_in_momentum: bool, foreach: bool
) -> None:
    """Five steps with a learning rate that moves (where the two momentum placements part)
    against the official updates written out above."""
    ours, theirs = lars_params(), lars_params()
    lrs = [0.1, 0.3, 0.5, 0.4, 0.2]
    optimizer = LARS(
        lars_groups(ours), lr=lrs[0], momentum=0.9, trust_coefficient=0.02,
        lr_in_momentum=lr_in_momentum, foreach=foreach,
    )  # fmt: skip
    lars_steps(optimizer, ours, len(lrs), seed=1, lrs=lrs)
    reference_lars_steps(theirs, len(lrs), seed=1, lrs=lrs, classic=lr_in_momentum)
    assert_same_params(ours, theirs)
    other = lars_params()
    reference_lars_steps(other, len(lrs), seed=1, lrs=lrs, classic=not lr_in_momentum)
    assert not torch.allclose(ours["weight"], other["weight"])  # the placement matters


def test_lars_state_dict_resumes_identically() -> None:
    """Three steps, a state_dict, three more in a fresh optimizer on copied parameters: the
    same as six uninterrupted steps. lightly's state_dict (same keys, no ``trust_ratio``)
    resumes ours too, with lightly's rule (``larc``)."""
    kwargs = dict(lr=0.5, momentum=0.9, trust_coefficient=0.02)
    straight = lars_params()
    optimizer = LARS(lars_groups(straight), trust_ratio="larc", **kwargs)
    lars_steps(optimizer, straight, 3, seed=1)
    for first in (functools.partial(LARS, trust_ratio="larc"), LightlyLARS):
        params = lars_params()
        before = first(lars_groups(params), **kwargs)
        lars_steps(before, params, 3, seed=1)
        saved = copy.deepcopy(before.state_dict())
        assert {k for s in saved["state"].values() for k in s} == {"momentum_buffer"}
        resumed = {k: nn.Parameter(p.detach().clone()) for k, p in params.items()}
        after = LARS(lars_groups(resumed), **kwargs)  # trust_ratio from the state_dict
        after.load_state_dict(saved)
        lars_steps(after, resumed, 3, seed=2)
        assert {g["trust_ratio"] for g in after.param_groups} == {"larc"}
        if first is not LightlyLARS:
            reference = straight
            lars_steps(optimizer, reference, 3, seed=2)
        assert_same_params(resumed, reference)


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_lars_step_reads_nothing_on_the_host(foreach: bool) -> None:
    """lightly's step tests each norm on the host (``if p_norm != 0``); ours never does."""
    update = functools.partial(LARS, foreach=foreach, trust_ratio="update")
    larc = functools.partial(LARS, foreach=foreach, trust_ratio="larc")
    for optimizer_class, expected in ((update, []), (larc, []), (LightlyLARS, ["Tensor.__bool__"])):
        params = lars_params()
        optimizer = optimizer_class(lars_groups(params), lr=0.5, momentum=0.9, nesterov=True)
        lars_steps(optimizer, params, 1, seed=1)  # the second step updates momentum buffers
        record: list[str] = []
        with host_syncs_refused(record), contextlib.suppress(HostSync):
            lars_steps(optimizer, params, 1, seed=2)
        assert record == expected, optimizer_class


def test_lars_checkpoint_loads_weights_only_and_resumes(tmp_path: Path) -> None:
    """A Lightning checkpoint of a LARS run holds plain tensors and numbers (it loads with
    ``weights_only=True``) and resumes into LARS with its momentum buffers."""
    torch.manual_seed(0)

    def simclr() -> SimCLR:
        return SimCLR(
            **TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False,
            optimizer="lars", lr=0.3,
        )  # fmt: skip

    trainer = quiet_trainer(
        max_steps=2, limit_val_batches=0, enable_checkpointing=True, default_root_dir=tmp_path
    )
    model = simclr()
    trainer.fit(model, datamodule=digits(batch_size=16))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, LARS)
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    saved = torch.load(path, weights_only=True)
    buffers = [s["momentum_buffer"] for s in saved["optimizer_states"][0]["state"].values()]
    assert len(buffers) == sum(len(g["params"]) for g in optimizer.param_groups)
    assert any(b.any() for b in buffers)

    resumed = simclr()
    restored: list[torch.Tensor] = []

    class Capture(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            state = trainer.optimizers[0].state_dict()["state"]
            restored.extend(s["momentum_buffer"].clone() for s in state.values())

    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[Capture()])
    trainer.fit(resumed, datamodule=digits(batch_size=16), ckpt_path=path)
    assert trainer.global_step == 3 and isinstance(trainer.optimizers[0], LARS)
    for a, b in zip(restored, buffers, strict=True):
        assert torch.equal(a, b)
