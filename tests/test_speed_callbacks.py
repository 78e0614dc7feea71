"""Speed callbacks change the layout and the compilation of a run, not its numbers."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sslzoo.backbones import Backbone
from sslzoo.callbacks import ChannelsLast, CompileBackbone
from sslzoo.methods import BYOL
from sslzoo.methods.byol import VIEWS as BYOL_VIEWS
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer, sgd


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.values.append(float(outputs["loss"]))


def run(*callbacks: L.Callback) -> tuple[BYOL, list[float]]:
    """Three steps of a tiny BYOL (an EMA teacher too) on the digits, from the same seed."""
    L.seed_everything(0)
    model = BYOL(
        **TINY_RESNET, projector_hidden_dim=32, projector_out_dim=16, predictor_hidden_dim=32,
        views=BYOL_VIEWS.replace(blur_prob=(0.0, 0.0)), optim=sgd(), sync_batchnorm=False,
    )  # fmt: skip
    losses = Losses()
    trainer = quiet_trainer(max_steps=3, callbacks=[*callbacks, losses], limit_val_batches=0)
    trainer.fit(model, datamodule=digits(batch_size=16, views=model.views))
    return model, losses.values


@pytest.fixture(scope="module")
def reference() -> tuple[BYOL, list[float]]:
    return run()


def test_channels_last_converts_weights_and_keeps_the_losses(reference) -> None:  # noqa: ANN001
    model, losses = run(ChannelsLast())
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    teacher = [p for p in model.target_backbone.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in teacher)
    # the same maths in another memory order: float32 summation order differs slightly (step
    # 3's loss by 9e-4 relative on one thread, where the two memory orders take other kernels)
    assert losses == pytest.approx(reference[1], rel=2e-3)
    for a, b in zip(model.state_dict().values(), reference[0].state_dict().values(), strict=True):
        if a.is_floating_point():  # on one thread conv weights differed by up to 9.7e-4
            torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3)


def test_compiled_backbones_keep_names_and_losses(reference) -> None:  # noqa: ANN001
    model, losses = run(CompileBackbone(backend="eager"))
    backbones = [m for m in model.modules() if isinstance(m, Backbone)]
    assert len(backbones) == 2  # student and EMA teacher
    assert all(b.model._compiled_call_impl is not None for b in backbones)
    assert list(model.state_dict()) == list(reference[0].state_dict())
    # the eager backend traces the model and runs the same kernels
    assert losses == pytest.approx(reference[1], rel=1e-5)
