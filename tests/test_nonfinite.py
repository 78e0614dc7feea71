"""A non-finite loss stops the run naming the method and the step, and never reaches a
checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sslzoo.methods.simclr import SimCLR
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer, sgd


class BreaksAtStep(SimCLR):
    """SimCLR whose loss turns NaN from optimizer step ``bad_step`` on."""

    def __init__(self, bad_step: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_step = bad_step

    def training_outputs(self, loss, embeddings, features, labels):
        if self.global_step >= self.bad_step:
            loss = loss * float("nan")
        return super().training_outputs(loss, embeddings, features, labels)


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BreaksAtStep(
        5, **TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False,
        optim=sgd(),
    )  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2, save_top_k=-1)
    trainer = quiet_trainer(
        max_epochs=3, limit_val_batches=0, callbacks=[ckpt], enable_checkpointing=True
    )
    with pytest.raises(FloatingPointError, match=r"BreaksAtStep: non-finite loss at step 5"):
        trainer.fit(model, datamodule=digits(batch_size=32, views=model.views))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert all(
        torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point()
    )
