"""No host-device synchronisation in the training step of any method.

On a GPU, reading a tensor's value on the host (``.item()``, ``if t:``, ``int(t)``, ``.cpu()``,
an output whose size depends on the data such as ``t[mask]``) and building a device tensor
from Python data (``torch.tensor(x, device=...)``, a blocking host-to-device copy) make the
host wait for every queued kernel. On CPU these calls cost nothing, so the test refuses them:
while a method's ``training_step`` and its own hooks around it run, each such call is recorded
and raises :class:`HostSync`. A few real steps of every method through a Lightning trainer
must record nothing, in the method's hooks and in the per-batch hooks of the callbacks a real
run has: ``BatchSeed``, ``OnlineProbe``, ``Throughput`` and, for a method with a teacher,
``EMATeacher`` (``KNNMonitor`` only runs at validation). (The non-finite loss check in
``on_train_batch_end`` reads the device every ``NONFINITE_CHECK_EVERY`` batches on purpose, and
``Throughput`` synchronises every ``log_every_n_steps`` batches to read its clock; these runs
stay below both.) Optimizer steps are not guarded here: LARS's is in tests/test_optim.py.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from sslzoo.callbacks import BatchSeed, EMATeacher, OnlineProbe, Throughput
from sslzoo.methods import base
from sslzoo.methods.barlowtwins import BarlowTwins
from sslzoo.methods.base import SSLMethod
from sslzoo.methods.byol import BYOL
from sslzoo.methods.dino import DINO
from sslzoo.methods.dino import VIEWS as DINO_VIEWS
from sslzoo.methods.distillation import Distillation
from sslzoo.methods.ibot import IBOT
from sslzoo.methods.ibot import VIEWS as IBOT_VIEWS
from sslzoo.methods.mae import MAE
from sslzoo.methods.mocov3 import MoCoV3
from sslzoo.methods.simclr import SimCLR
from sslzoo.methods.simsiam import SimSiam
from sslzoo.methods.swav import VIEWS as SWAV_VIEWS
from sslzoo.methods.swav import SwAV
from sslzoo.methods.vicreg import VICReg
from tests.conftest import TINY_HEADS, TINY_RESNET
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step`")

BATCH, STEPS = 4, 3
assert STEPS < base.NONFINITE_CHECK_EVERY  # no deliberate check falls inside these runs


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only adds overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ the detector
class HostSync(RuntimeError):
    """A tensor's value crossed between host and device inside a guarded region."""


_allowed = [0]  # depth of host_syncs_allowed() blocks


# Tensor methods that hand a tensor's value to Python (on a GPU: wait for the device)
VALUE_READS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__array__",
    "__bool__",
    "__int__",
    "__float__",
    "__complex__",
    "__index__",  # range(t), seq[t], torch.zeros(t): all need the value of t on the host
    "equal",
    "allclose",
    "is_nonzero",
)
# operations whose output size depends on tensor values (on a GPU: read back to size it)
DATA_DEPENDENT = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")


def _bool_index(index: Any) -> bool:
    """Whether an index holds a boolean tensor (a mask: ``t[mask]`` sizes its output by it)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@contextlib.contextmanager
def host_syncs_refused(record: list[str]) -> Iterator[None]:
    """Refuse host-device syncs while active: each is appended to ``record`` (so a caller that
    swallows the exception is still caught) and raises :class:`HostSync`."""

    def refuse(name: str) -> None:
        if _allowed[0]:
            return
        record.append(name)
        raise HostSync(f"host-device sync in the training step: {name}")

    def refusing(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def method(*args: Any, **kwargs: Any) -> Any:
            refuse(name)
            return original(*args, **kwargs)

        return method

    tensor_getitem, tensor_setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__
    torch_tensor, torch_as_tensor, torch_where = torch.tensor, torch.as_tensor, torch.where

    def getitem(self: torch.Tensor, index: Any) -> Any:
        if _bool_index(index):
            refuse("Tensor.__getitem__ with a boolean mask")
        return tensor_getitem(self, index)

    def setitem(self: torch.Tensor, index: Any, value: Any) -> None:
        if _bool_index(index):
            refuse("Tensor.__setitem__ with a boolean mask")
        tensor_setitem(self, index, value)

    def creating(name: str, create: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def build(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            # a device given as an object (self.device, x.device) is the training device;
            # the literal "cpu" asks for a host tensor (torch's own optimizer steps do)
            device = kwargs.get("device")
            if device is not None and device != "cpu":
                refuse(f"{name}(..., device=...): a blocking host-to-device copy")
            return create(data, *args, **kwargs)

        return build

    def where(condition: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            refuse("torch.where(condition)")
        return torch_where(condition, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        for name in VALUE_READS + DATA_DEPENDENT:
            read = refusing(f"Tensor.{name}", getattr(torch.Tensor, name))
            stack.enter_context(mock.patch.object(torch.Tensor, name, read))
        for name in ("equal", "allclose", "is_nonzero") + DATA_DEPENDENT:
            read = refusing(f"torch.{name}", getattr(torch, name))
            stack.enter_context(mock.patch.object(torch, name, read))
        stack.enter_context(mock.patch.object(torch.Tensor, "__getitem__", getitem))
        stack.enter_context(mock.patch.object(torch.Tensor, "__setitem__", setitem))
        stack.enter_context(
            mock.patch.object(torch, "tensor", creating("torch.tensor", torch_tensor))
        )
        stack.enter_context(
            mock.patch.object(torch, "as_tensor", creating("torch.as_tensor", torch_as_tensor))
        )
        stack.enter_context(mock.patch.object(torch, "where", where))
        yield


@contextlib.contextmanager
def host_syncs_allowed() -> Iterator[None]:
    """Lift the refusal inside a guarded region, for reads of tensors that live on the host by
    design (no device to wait for on a GPU either), which a CPU run cannot tell apart."""
    _allowed[0] += 1
    try:
        yield
    finally:
        _allowed[0] -= 1


@contextlib.contextmanager
def adamw_step_counts_allowed() -> Iterator[None]:
    """torch's AdamW step (not capturable) keeps each step count in a CPU tensor and reads it
    there (``.item()``): no host-device sync on a GPU, so it is allowed (the online probe's
    optimizer steps inside its batch-end hook)."""
    adamw_step = torch.optim.AdamW.step

    @functools.wraps(adamw_step)
    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        with host_syncs_allowed():
            return adamw_step(self, *args, **kwargs)

    with mock.patch.object(torch.optim.AdamW, "step", step):
        yield


# the method's own code run once per training batch, around and inside the step
GUARDED_HOOKS = (
    "on_train_batch_start",
    "training_step",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
    "on_train_batch_end",
)


def guard(model: SSLMethod, record: list[str]) -> SSLMethod:
    """Wrap, on the instance, the method's per-batch hooks so host syncs are refused exactly
    while they run. ``on_train_batch_end`` is guarded only when no non-finite check is due."""

    def guarded(name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hook)
        def run(*args: Any, **kwargs: Any) -> Any:
            if name == "on_train_batch_end":
                batch_idx = kwargs.get("batch_idx", args[2] if len(args) > 2 else 0)
                if (batch_idx + 1) % base.NONFINITE_CHECK_EVERY == 0:
                    return hook(*args, **kwargs)
            with host_syncs_refused(record):
                return hook(*args, **kwargs)

        return run

    for name in GUARDED_HOOKS:
        setattr(model, name, guarded(name, getattr(model, name)))
    return model


# a callback's own code run once per training batch
CALLBACK_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def guard_callback(callback: Callback, record: list[str]) -> Callback:
    """Wrap, on the instance, the callback's per-batch hooks so host syncs are refused exactly
    while they run."""

    def guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hook)
        def run(*args: Any, **kwargs: Any) -> Any:
            with host_syncs_refused(record):
                return hook(*args, **kwargs)

        return run

    for name in CALLBACK_HOOKS:
        setattr(callback, name, guarded(getattr(callback, name)))
    return callback


def run_callbacks() -> list[Callback]:
    """The per-batch callbacks of a real run: the CLI's ``BatchSeed``, the configs'
    ``OnlineProbe`` and a ``Throughput`` whose logging (a deliberate sync) falls after these
    runs. A method with a teacher brings its ``EMATeacher`` from ``configure_callbacks``."""
    return [BatchSeed(), OnlineProbe(num_classes=10), Throughput(log_every_n_steps=STEPS + 1)]


# ------------------------------------------------------------------------- tiny methods
TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2),
)
HEAD = dict(out_dim=32, hidden_dim=32, bottleneck_dim=16)


def image(size: int = 16) -> torch.Tensor:
    return torch.randn(3, size, size)


def pair() -> tuple[torch.Tensor, torch.Tensor]:
    return image(), image()


def multicrop() -> list[torch.Tensor]:
    return [image(), image(), image(8), image(8)]


def crops_and_masks() -> dict[str, list[torch.Tensor]]:
    return {"views": multicrop(), "masks": [torch.rand(4, 4) < 0.4 for _ in range(2)]}


def single() -> tuple[torch.Tensor]:
    return (image(),)


# name: (builder, one sample's views); the views collate to the batches training_step reads
METHODS: dict[str, tuple[Callable[[], SSLMethod], Callable[[], Any]]] = {
    "simclr": (
        lambda: SimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False),
        pair,
    ),
    "mocov3": (
        lambda: MoCoV3(**TINY_RESNET, moco_dim=8, moco_mlp_dim=16, sync_batchnorm=False),
        pair,
    ),
    "byol": (
        lambda: BYOL(
            **TINY_RESNET,
            projector_hidden_dim=16,
            projector_out_dim=8,
            predictor_hidden_dim=16,
            sync_batchnorm=False,
        ),
        pair,
    ),
    "simsiam": (
        lambda: SimSiam(**TINY_RESNET, dim=16, pred_dim=8, sync_batchnorm=False),
        pair,
    ),
    "barlowtwins": (
        lambda: BarlowTwins(**TINY_RESNET, **TINY_HEADS["BarlowTwins"], sync_batchnorm=False),
        pair,
    ),
    "vicreg": (
        lambda: VICReg(**TINY_RESNET, **TINY_HEADS["VICReg"], sync_batchnorm=False),
        pair,
    ),
    # a queue of two batches: filled by steps 1 and 2, used from step 3
    "swav": (
        lambda: SwAV(
            **TINY_RESNET,
            hidden_mlp=16,
            feat_dim=8,
            nmb_prototypes=12,
            views=SWAV_VIEWS.replace(nmb_crops=(2, 2), size_crops=(16, 8)),
            freeze_prototypes_niters=1,
            queue_length=2 * BATCH,
            epoch_queue_starts=0,
            sync_batchnorm=False,
        ),
        multicrop,
    ),
    "dino": (
        lambda: DINO(
            **TINY_VIT,
            **HEAD,
            freeze_last_layer=1,
            views=DINO_VIEWS.replace(local_crops_number=2),
        ),
        multicrop,
    ),
    "ibot": (
        lambda: IBOT(
            **TINY_VIT, **HEAD, patch_out_dim=32, views=IBOT_VIEWS.replace(local_crops_number=2)
        ),
        crops_and_masks,
    ),
    "mae": (
        lambda: MAE(**TINY_VIT, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2),
        single,
    ),
    "distillation": (
        lambda: Distillation(
            **TINY_RESNET,
            teacher=TINY_VIT["backbone"],
            teacher_kwargs=TINY_VIT["backbone_kwargs"],
            n_teacher_blocks=1,
            sync_batchnorm=False,
        ),
        single,
    ),
}


class Samples(Dataset):
    """``STEPS`` batches of random views with labels."""

    def __init__(self, views: Callable[[], Any]) -> None:
        torch.manual_seed(0)
        self.items = [(views(), i % 10) for i in range(BATCH * STEPS)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def train_guarded(
    model: SSLMethod, views: Callable[[], Any], callbacks: list[Callback] | None = None
) -> list[str]:
    """``STEPS`` training steps with host syncs refused in the guarded hooks of the method and
    of ``callbacks`` (:func:`run_callbacks` by default) and of those the method configures;
    the syncs seen."""
    record: list[str] = []
    guard(model, record)
    callbacks = run_callbacks() if callbacks is None else callbacks
    for callback in callbacks:
        guard_callback(callback, record)
    configure_callbacks = model.configure_callbacks
    model.configure_callbacks = lambda: [guard_callback(c, record) for c in configure_callbacks()]
    trainer = quiet_trainer(max_steps=STEPS, limit_val_batches=0, callbacks=callbacks)
    with adamw_step_counts_allowed():
        trainer.fit(model, train_dataloaders=DataLoader(Samples(views), batch_size=BATCH))
    assert trainer.global_step == STEPS
    return record


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(METHODS))
def test_training_step_never_waits_for_the_device(name: str) -> None:
    torch.manual_seed(0)
    build, views = METHODS[name]
    model = build()
    callbacks = run_callbacks()
    assert train_guarded(model, views, callbacks) == []
    assert model._first_nonfinite_step.item() == -1  # the steps ran, with finite losses
    probe = next(c for c in callbacks if isinstance(c, OnlineProbe))
    assert [float(s["step"]) for s in probe.optimizer.state.values()] == [STEPS] * 2
    emas = [c for c in model.trainer.callbacks if isinstance(c, EMATeacher)]
    assert len(emas) == bool(model.teacher_pairs())  # configured by the method, and guarded
    # the step count at the last update: STEPS after the last step, or STEPS - 1 at its start
    # (MoCo v3)
    last = STEPS - 1 if emas and model.teacher_update().before_step else STEPS
    assert all(ema._last_step == last for ema in emas)


def test_swav_queue_is_used_once_full_without_reading_it_back() -> None:
    """The queue's fill level is counted on the host: it joins the Sinkhorn input at step 3,
    when its last row holds an embedding, exactly as the official check of the last row."""
    torch.manual_seed(0)
    build, views = METHODS["swav"]
    model = build()
    used: list[bool] = []
    queue_scores = model.queue_scores

    def spy(embeddings: list[torch.Tensor]) -> list[torch.Tensor] | None:
        scores = queue_scores(embeddings)
        used.append(scores is not None)
        return scores

    model.queue_scores = spy
    assert train_guarded(model, views) == []
    assert used == [False, False, True]
    assert bool(model.queue.ne(0).any(dim=2).all())


def test_swav_restored_queue_is_used_exactly_when_its_last_row_is_filled() -> None:
    """A queue set from a checkpoint has its filled rows counted once, on load: it is used at
    the next step only if its last row holds an embedding, as the official check on content."""
    build, _ = METHODS["swav"]
    z = [torch.nn.functional.normalize(torch.randn(BATCH, 8), dim=1) for _ in range(4)]
    for filled, used in [(2 * BATCH, [True, True]), (BATCH, [False, True]), (0, [False, False])]:
        model = build()
        saved = torch.zeros(1, 2, 2 * BATCH, 8)
        saved[..., :filled, :] = torch.nn.functional.normalize(torch.randn(2, filled, 8), dim=2)
        model.on_load_checkpoint({"swav_queue": saved})
        assert model._queue.rows == filled
        record: list[str] = []
        with host_syncs_refused(record):
            seen = [model.queue_scores(z) is not None for _ in range(2)]
        assert (seen, record) == (used, [])


# ------------------------------------------------------------------ the detector detects
def _syncing_steps() -> dict[str, Callable[[torch.Tensor], Any]]:
    return {
        "Tensor.item": lambda t: t.sum().item(),
        "Tensor.tolist": lambda t: t.tolist(),
        "Tensor.numpy": lambda t: t.detach().numpy(),
        "Tensor.cpu": lambda t: t.cpu(),
        "Tensor.__bool__": lambda t: 1 if t.sum() > 0 else 0,
        "Tensor.__int__": lambda t: int(t.sum()),
        "Tensor.__float__": lambda t: float(t.sum()),
        "Tensor.__index__": lambda t: list(range(t.argmax())),
        "Tensor.__array__": lambda t: __import__("numpy").asarray(t.detach()),
        "torch.equal": lambda t: torch.equal(t, t),
        "Tensor.nonzero": lambda t: t.nonzero(),
        "torch.where(condition)": lambda t: torch.where(t > 0),
        "Tensor.__getitem__ with a boolean mask": lambda t: t[t > 0],
        "Tensor.__setitem__ with a boolean mask": lambda t: (
            t.detach().clone().__setitem__(t > 0, 0.0)
        ),
        "torch.tensor(..., device=...): a blocking host-to-device copy": lambda t: torch.tensor(
            0.5, device=t.device
        ),
    }


@pytest.mark.parametrize("expected", list(_syncing_steps()))
def test_each_kind_of_sync_is_refused(expected: str) -> None:
    t = torch.randn(3, 4)
    record: list[str] = []
    with host_syncs_refused(record), pytest.raises(HostSync):
        _syncing_steps()[expected](t)
    assert record == [expected]
    _syncing_steps()[expected](t)  # allowed again once the guard is gone


def test_sync_free_operations_pass() -> None:
    t, record = torch.randn(3, 4), []
    with host_syncs_refused(record):
        torch.where(t > 0, t, torch.zeros_like(t))
        t[:, 1:], t[0], t[..., None]  # noqa: B018
        torch.full((), 0.5, device=t.device)
        torch.tensor([1.0, 2.0]), torch.tensor(0.0, device="cpu")  # host tensors
        len(t), t.shape[0] * 2
    assert record == []


class SyncingSimCLR(SimCLR):
    """SimCLR whose step reads its loss on the host, and hides the error."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        out = super().training_step(batch, batch_idx)
        with contextlib.suppress(HostSync):
            if out["loss"] > 100:  # Tensor.__bool__
                print("large loss")
        return out


def test_a_syncing_step_is_caught_through_the_trainer() -> None:
    build, views = METHODS["simclr"]
    model = SyncingSimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False)
    assert type(build()) is SimCLR
    assert train_guarded(model, views) == ["Tensor.__bool__"] * STEPS


class SyncingCallback(Callback):
    """A callback that reads the loss on the host after every batch, and hides the error."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with contextlib.suppress(HostSync):
            if outputs["loss"] > 100:  # Tensor.__bool__
                print("large loss")


def test_a_syncing_callback_is_caught_through_the_trainer() -> None:
    build, views = METHODS["simclr"]
    record = train_guarded(build(), views, [*run_callbacks(), SyncingCallback()])
    assert record == ["Tensor.__bool__"] * STEPS


def test_host_syncs_allowed_lifts_the_refusal_inside_a_guarded_region() -> None:
    t, record = torch.randn(3), []
    with host_syncs_refused(record):
        with host_syncs_allowed():
            assert t.sum().item() == pytest.approx(float(t.sum()))
        with pytest.raises(HostSync):
            t.sum().item()
    assert record == ["Tensor.item"]


def test_unlabeled_training_set_trains_no_probe_and_reads_nothing() -> None:
    """A datamodule without training labels (``train_labeled=False``, labels -1): the probe
    learns nothing, known on the host, where it used to read the labels back to drop them."""
    probe, record = OnlineProbe(num_classes=10), []
    outputs = {"features": torch.randn(BATCH, 8), "labels": torch.full((BATCH,), -1)}
    trainer = mock.Mock(datamodule=mock.Mock(train_labeled=False))
    with host_syncs_refused(record):
        probe.on_train_batch_end(trainer, mock.Mock(), outputs, None, 0)
    assert (probe.head, record) == (None, [])
    with pytest.raises(IndexError):  # labels -1 in a labeled training set are not skipped
        probe.on_train_batch_end(None, mock.Mock(device=torch.device("cpu")), outputs, None, 0)


def test_a_due_non_finite_check_in_batch_end_is_not_guarded() -> None:
    """The check due every ``NONFINITE_CHECK_EVERY`` batches reads the device on purpose."""
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False)
    record: list[str] = []
    guard(model, record)
    model._first_nonfinite_step.fill_(3)
    model.on_train_batch_end(None, None, 0)  # no check due: nothing read
    with pytest.raises(FloatingPointError, match="step 3"):
        model.on_train_batch_end(None, None, base.NONFINITE_CHECK_EVERY - 1)
    assert record == []
