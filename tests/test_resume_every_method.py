"""Every method resumes exactly from a mid-epoch checkpoint: a run of 2 epochs x 4 steps writes
``last.ckpt`` every 3 steps, so its ``previous.ckpt`` is the one of step 6, in the middle of
epoch 1; a second ``fit`` from it ends with the first run's final checkpoint, bit for bit:
weights, EMA teachers, centres, queues, BatchNorm statistics, optimizer state, probe, loops.

What a checkpoint holds and how the run continues from it is each method's own business (its
teachers, buffers and schedules), tested here for all of them; that a ``kill -9`` leaves such a
checkpoint and the restarted process continues from it is the same for every method, tested
with real kills in ``tests/test_kill_resume.py`` (DINO, SwAV) and ``tests/test_promises.py``
(SimCLR through the installed command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sslzoo.cli import SSLZooCLI
from tests.conftest import TINY_HEADS, TINY_RESNET
from tests.test_kill_resume import assert_same, write_config
from tests.test_kill_resume import load as checkpoint

TINY_VIT = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32,
                        "num_heads": 2},
}  # fmt: skip
SGD = {"optimizer": "sgd", "lr": 0.1, "warmup_epochs": 1}  # the schedule crosses the resume
HEAD = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}
LOCAL = {"local_crops_number": 2, "local_crop_size": 8}
# tiny versions, plain values as in a config; random draws in the step where a method has them
TINY: dict[str, dict[str, Any]] = {
    **{name: {**TINY_RESNET, **heads, "optim": SGD} for name, heads in TINY_HEADS.items()},
    "SwAV": {**TINY_RESNET, "feat_dim": 8, "hidden_mlp": 16, "nmb_prototypes": 10,
             "freeze_prototypes_niters": 5, "queue_length": 32, "epoch_queue_starts": 0,
             "views": {"nmb_crops": [2, 2], "size_crops": [16, 8]},
             "optim": {**SGD, "start_warmup_lr": 0.0, "min_lr": 0.0}},
    "DINO": {**TINY_VIT, **HEAD, "drop_path_rate": 0.1, "freeze_last_layer": 1,
             "warmup_teacher_temp_epochs": 1, "views": LOCAL, "optim": SGD},
    "IBOT": {**TINY_VIT, **HEAD, "patch_out_dim": 32, "drop_path_rate": 0.1,
             "warmup_teacher_temp_epochs": 1, "views": LOCAL, "optim": SGD},
    "DINOv2": {**TINY_VIT, **HEAD, "drop_path_rate": 0.1, "num_register_tokens": 1,
               "official_epoch_length": None, "warmup_teacher_temp_epochs": 1,
               "freeze_last_layer": 1, "views": LOCAL, "optim": SGD},
    "MAE": {**TINY_VIT, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
            "optim": SGD},
    "Distillation": {**TINY_RESNET, "teacher": TINY_VIT["backbone"],
                     "teacher_kwargs": TINY_VIT["backbone_kwargs"], "n_teacher_blocks": 1,
                     "optim": SGD},
}  # fmt: skip
RESNETS = (*TINY_HEADS, "SwAV", "Distillation")


def released_weights(folder: Path) -> dict[str, Any]:
    """Distillation's teacher and student from weights files, the student frozen until step
    7: the resumed run (from step 6) must unfreeze it at the same step."""
    from sslzoo.backbones import build_backbone

    paths = {"teacher_weights": folder / "teacher.pth", "init_backbone": folder / "student.pth"}
    tiny = TINY["Distillation"]
    teacher = build_backbone(tiny["teacher"], **tiny["teacher_kwargs"]).model
    student = build_backbone(tiny["backbone"], cifar_stem=True, **tiny["backbone_kwargs"]).model
    for key, model in (("teacher_weights", teacher), ("init_backbone", student)):
        torch.save(model.state_dict(), paths[key])
    return {**{k: str(v) for k, v in paths.items()}, "freeze_backbone_steps": 7}


def test_every_method_is_here() -> None:
    import sslzoo.methods as methods

    assert set(TINY) == set(methods.__all__) - {"SSLMethod"}


def fit(config: Path, *extra: str) -> None:
    SSLZooCLI(args=["fit", "--config", str(config), *extra])


@pytest.mark.parametrize("name", list(TINY))
def test_mid_epoch_checkpoint_resumes_exactly(name: str, tmp_path: Path) -> None:
    init_args = {**TINY[name], "sync_batchnorm": False} if name in RESNETS else TINY[name]
    if name == "Distillation":
        init_args = {**init_args, **released_weights(tmp_path)}
    model = {"class_path": f"sslzoo.methods.{name}", "init_args": init_args}
    config = write_config(
        tmp_path / "config.yaml", tmp_path / "runs", model, num_workers=0,
        trainer={"limit_train_batches": 4},
    )  # fmt: skip
    fit(config)
    run = tmp_path / "runs" / "version_0" / "checkpoints"
    middle = checkpoint(run / "previous.ckpt")
    assert middle["global_step"] == 6 and middle["epoch"] == 1  # 2 of epoch 1's 4 steps
    (tmp_path / "middle.ckpt").write_bytes((run / "previous.ckpt").read_bytes())
    uninterrupted = checkpoint(run / "last.ckpt")
    assert uninterrupted["global_step"] == 8

    fit(config, "--ckpt_path", str(tmp_path / "middle.ckpt"))
    resumed = checkpoint(tmp_path / "runs" / "version_1" / "checkpoints" / "last.ckpt")
    for key in ("global_step", "epoch", "state_dict", "optimizer_states"):
        assert_same(resumed[key], uninterrupted[key], key)
    # every callback's state (the probe's weights and optimizer...) but the checkpoint writers',
    # which name their run folder
    states = [
        {k: v for k, v in c["callbacks"].items() if "Checkpoint" not in k}
        for c in (resumed, uninterrupted)
    ]
    assert any("OnlineProbe" in k for k in states[0])
    assert_same(*states, "callbacks")
    assert (
        resumed["loops"]["fit_loop"]["epoch_progress"]
        == uninterrupted["loops"]["fit_loop"]["epoch_progress"]
    )
