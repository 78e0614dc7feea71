"""MoCo v3: the loss against its formula (also across two ranks), the official MLPs, the EMA
pairs, the ViT stability tricks, lightly's asymmetric views, the configs, and a short training
run that lowers the loss without collapsing."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslzoo.callbacks.ema import EMATeacher
from sslzoo.datamodules.digits import load_digits_images
from sslzoo.losses.contrastive import InfoNCELoss
from sslzoo.methods.mocov3 import OPTIM, MoCoV3
from tests.conftest import TINY_RESNET

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(**TINY_RESNET, moco_dim=16, moco_mlp_dim=32, sync_batchnorm=False)
TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs={"img_size": 16, "patch_size": 4, "depth": 1},
    moco_dim=16,
    moco_mlp_dim=32,
    sync_batchnorm=False,
)


def reference_loss(q: torch.Tensor, k: torch.Tensor, t: float, offset: int = 0) -> float:
    """-log softmax of the positive, written out per query, averaged, times 2T."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        sims = [float(qi @ (k[j] / k[j].norm())) / t for j in range(k.shape[0])]
        total += -(sims[i + offset] - math.log(sum(math.exp(s) for s in sims)))
    return total / q.shape[0] * 2 * t


@pytest.mark.parametrize("t", [1.0, 0.2])
def test_contrastive_loss_matches_formula(t: float) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(6, 5), torch.randn(6, 5)
    assert float(InfoNCELoss(t)(q, k)) == pytest.approx(reference_loss(q, k, t), rel=1e-5)


def _rank_loss(rank: int, world: int, init_file: str, out: str, q, k, t: float) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    n = q.shape[0] // world
    local_q = q[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = InfoNCELoss(t)(local_q, k[rank * n : (rank + 1) * n])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": local_q.grad}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_contrastive_loss_gathers_keys_of_all_ranks(tmp_path: Path) -> None:
    """On two ranks, each rank's queries meet all 8 keys and the positive is at index
    ``local index + rank * N``, as in the official ``concat_all_gather`` code."""
    torch.manual_seed(0)
    q, k, t = torch.randn(8, 5), torch.randn(8, 5), 0.5
    mp.spawn(_rank_loss, args=(2, str(tmp_path / "init"), str(tmp_path), q, k, t), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        expected = reference_loss(q[rank * 4 : rank * 4 + 4], k, t, offset=rank * 4)
        assert float(got["loss"]) == pytest.approx(expected, rel=1e-5)
        assert got["grad"].abs().sum() > 0


def test_symmetric_loss_pairs_queries_with_the_other_views_keys() -> None:
    torch.manual_seed(0)
    model = MoCoV3(**SMALL, moco_t=0.2)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = model.training_step(([x1, x2], torch.arange(4)), 0)
    with torch.no_grad():  # train-mode BN uses batch statistics: the same terms again
        q1 = model.predictor(model.projector(model.backbone(x1)))
        q2 = model.predictor(model.projector(model.backbone(x2)))
        k1 = model.momentum_projector(model.momentum_backbone(x1))
        k2 = model.momentum_projector(model.momentum_backbone(x2))
    expected = reference_loss(q1, k2, 0.2) + reference_loss(q2, k1, 0.2)
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-4)


def layer_types(head: nn.Module) -> list[str]:
    names = []
    for m in head.children():
        if isinstance(m, nn.Linear):
            names.append(f"Linear({m.in_features},{m.out_features},bias={m.bias is not None})")
        elif isinstance(m, nn.BatchNorm1d):
            names.append(f"BN({m.num_features},affine={m.affine})")
        else:
            names.append(type(m).__name__)
    return names


def test_resnet_heads_are_the_official_mlps() -> None:
    """ResNet: 2-layer projector ending in BN(affine=False), predictor without a last BN."""
    model = MoCoV3(**SMALL)
    assert layer_types(model.projector) == [
        "Linear(128,32,bias=False)", "BN(32,affine=True)", "ReLU",
        "Linear(32,16,bias=False)", "BN(16,affine=False)",
    ]  # fmt: skip
    assert layer_types(model.predictor) == [
        "Linear(16,32,bias=False)", "BN(32,affine=True)", "ReLU", "Linear(32,16,bias=False)",
    ]  # fmt: skip


def test_vit_heads_are_the_official_mlps() -> None:
    """ViT: 3-layer projector, and the predictor ends in BN(affine=False)."""
    model = MoCoV3(**TINY_VIT)
    assert layer_types(model.projector) == [
        "Linear(192,32,bias=False)", "BN(32,affine=True)", "ReLU",
        "Linear(32,32,bias=False)", "BN(32,affine=True)", "ReLU",
        "Linear(32,16,bias=False)", "BN(16,affine=False)",
    ]  # fmt: skip
    assert layer_types(model.predictor)[-1] == "BN(16,affine=False)"


def test_momentum_encoder_is_backbone_and_projector_not_predictor() -> None:
    model = MoCoV3(**SMALL)
    pairs = model.teacher_pairs()
    students = [s for s, _ in pairs]
    assert any(s is model.backbone for s in students)
    assert any(s is model.projector for s in students)
    predictor = {id(p) for p in model.predictor.parameters()}
    assert all(not predictor & {id(p) for p in s.parameters()} for s in students)
    for student, teacher in pairs:
        assert all(not p.requires_grad for p in teacher.parameters())
        for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
            assert torch.equal(ps, pt)
    assert model.ema_base_momentum == 0.99


@pytest.mark.parametrize("cosine", [True, False])
def test_brought_ema_callback_follows_moco_m_cos(cosine: bool) -> None:
    model = MoCoV3(**SMALL, moco_m=0.9, moco_m_cos=cosine)
    callbacks = model.configure_callbacks()
    assert [type(c) for c in callbacks] == [EMATeacher]
    update = callbacks[0].declared_update(model)
    assert (update.base_momentum, update.cosine, update.before_step) == (0.9, cosine, True)
    assert update.momentum_at(5, 10) == (0.95 if cosine else 0.9)


def test_vit_patch_projection_frozen_and_position_embedding_fixed_sincos() -> None:
    model = MoCoV3(**TINY_VIT)
    vit = model.backbone.model
    assert all(not p.requires_grad for p in vit.patch_embed.proj.parameters())
    assert not vit.pos_embed.requires_grad
    dim, grid = 192, 4
    expected = torch.zeros(1 + grid * grid, dim)  # the class token's row stays zero
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            token = 1 + row * grid + col
            for d in range(quarter):
                omega = 1.0 / 10000 ** (d / quarter)
                expected[token, d] = math.sin(row * omega)
                expected[token, quarter + d] = math.cos(row * omega)
                expected[token, 2 * quarter + d] = math.sin(col * omega)
                expected[token, 3 * quarter + d] = math.cos(col * omega)
    assert torch.allclose(vit.pos_embed[0], expected, atol=1e-6)
    trainable = {id(p) for g in model.parameter_groups() for p in g["params"]}
    frozen = [vit.pos_embed, *vit.patch_embed.proj.parameters()]
    assert not trainable & {id(p) for p in frozen}


def test_vit_initialisation_treats_q_k_v_separately() -> None:
    torch.manual_seed(0)
    vit = MoCoV3(**TINY_VIT).backbone.model
    qkv = vit.blocks[0].attn.qkv
    dim = qkv.weight.shape[1]
    bound = math.sqrt(6.0 / (dim + dim))  # xavier-uniform of one (dim x dim) block
    for block in qkv.weight.chunk(3):
        assert 0.95 * bound < float(block.abs().max()) <= bound
    assert torch.all(qkv.bias == 0)
    assert float(vit.cls_token.abs().max()) < 1e-5
    fc1 = vit.blocks[0].mlp.fc1
    assert float(fc1.weight.abs().max()) <= math.sqrt(6.0 / sum(fc1.weight.shape))


def test_lightly_views_are_the_official_asymmetric_pair() -> None:
    """lightly's BYOL views give the official MoCo v3 recipe: crop (0.2, 1), colour jitter
    (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale 0.2, blur 1.0 / 0.1 with sigma (0.1, 2),
    solarize 0 / 0.2, flip 0.5."""
    views = MoCoV3(**SMALL).views.pil(32, (0.5,) * 3, (0.25,) * 3)
    assert len(views.transforms) == 2
    probs = []
    for view in views.transforms:
        ops = {type(o).__name__: o for o in view.transform.transforms}
        assert ops["RandomResizedCrop"].scale == (0.2, 1.0)
        assert ops["RandomResizedCrop"].size == (32, 32) or ops["RandomResizedCrop"].size == [32]
        jitter = ops["RandomApply"]
        cj = jitter.transforms[0]
        assert jitter.p == 0.8
        assert cj.brightness == pytest.approx((0.6, 1.4))
        assert cj.contrast == pytest.approx((0.6, 1.4))
        assert cj.saturation == pytest.approx((0.8, 1.2))
        assert cj.hue == pytest.approx((-0.1, 0.1))
        assert ops["RandomGrayscale"].p == 0.2
        assert ops["RandomHorizontalFlip"].p == 0.5
        assert ops["GaussianBlur"].sigmas == (0.1, 2.0)
        probs.append((ops["GaussianBlur"].prob, ops["RandomSolarization"].prob))
    assert probs == [(1.0, 0.0), (0.1, 0.2)]


class FixedBatch(Dataset):
    """One batch of pre-augmented digit views, repeated ``steps`` times: one epoch."""

    def __init__(self, transform, steps: int, n: int = 32) -> None:
        images, labels = load_digits_images(16)
        torch.manual_seed(0)
        np.random.seed(0)
        views = [transform(Image.fromarray(img)) for img in images[:n]]
        self.items = [(v, int(y)) for v, y in zip(views, labels[:n], strict=True)]
        self.steps = steps

    def __len__(self) -> int:
        return len(self.items) * self.steps

    def __getitem__(self, i: int):
        return self.items[i % len(self.items)]


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.stds: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.stds.append(float(trainer.callback_metrics["train/embedding_std"]))


STEPS = 20


def test_training_on_a_fixed_batch_lowers_the_loss_without_collapse() -> None:
    L.seed_everything(0)
    sgd = OPTIM.replace(optimizer="sgd", lr=0.4, warmup_epochs=0)
    model = MoCoV3(**SMALL, moco_t=0.2, moco_m=0.9, optim=sgd)
    views = model.views.pil(16, (0.5,) * 3, (0.25,) * 3)
    data = DataLoader(FixedBatch(views, steps=STEPS), batch_size=32)
    recorder = Recorder()
    teacher_before = [p.clone() for p in model.momentum_projector.parameters()]
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=data)
    first, last = np.mean(recorder.losses[:3]), np.mean(recorder.losses[-3:])
    assert last < 0.8 * first, recorder.losses
    assert min(recorder.stds) > 0.5 / math.sqrt(16), recorder.stds  # 1/sqrt(d) when spread
    after = list(model.momentum_projector.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(teacher_before, after, strict=True)]
    assert all(moved)  # the EMA callback the method brings updated the momentum encoder


def official_moco_m(epoch: int, i: int, iters_per_epoch: int, epochs: int, m0: float) -> float:
    """main_moco.py ``adjust_moco_momentum(epoch + i / iters_per_epoch, args)``."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * (epoch + i / iters_per_epoch) / epochs)) * (
        1.0 - m0
    )


def flat(*modules: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for m in modules for p in m.parameters()]).clone()


class KeyRecorder(MoCoV3):
    """MoCo v3 that records, as each training step begins, the encoder's weights and the
    momentum encoder's weights its keys are computed with."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        student = flat(self.backbone, self.projector)
        self.seen.append((student, flat(self.momentum_backbone, self.momentum_projector)))
        return super().training_step(batch, batch_idx)


class MomentumLog(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/ema_momentum"]))


EPOCHS, ITERS = 2, 3
M0 = 0.9


def moco_run(model: MoCoV3, callbacks: list[L.Callback], ckpt_path: str | None = None) -> None:
    """EPOCHS epochs of ITERS identical batches of fixed views, with SGD."""
    views = model.views.pil(16, (0.5,) * 3, (0.25,) * 3)
    data = DataLoader(FixedBatch(views, steps=ITERS, n=16), batch_size=16)
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=data, ckpt_path=ckpt_path)


def small_moco(cls: type[MoCoV3] = MoCoV3) -> MoCoV3:
    torch.manual_seed(0)
    sgd = OPTIM.replace(optimizer="sgd", lr=0.4, warmup_epochs=0)
    return cls(**SMALL, moco_t=0.2, moco_m=M0, optim=sgd)


class SaveAt(L.Callback):
    """Save a checkpoint once ``step`` optimizer steps are done (mid-epoch here)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.fixture(scope="module")
def moco_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run, which saves a checkpoint after step 4 (epoch 1, iteration 1),
    and a run resumed from that checkpoint."""
    ckpt = tmp_path_factory.mktemp("moco") / "step4.ckpt"
    L.seed_everything(0)
    full = small_moco(KeyRecorder)
    initial = flat(full.momentum_backbone, full.momentum_projector)
    full_log = MomentumLog()
    moco_run(full, [full_log, SaveAt(4, ckpt)])
    resumed, resumed_log = small_moco(), MomentumLog()
    with warnings.catch_warnings():
        # every batch is the same, so where a plain DataLoader restarts does not matter
        warnings.filterwarnings("ignore", message=".*dataloader is not resumable")
        moco_run(resumed, [resumed_log], ckpt_path=str(ckpt))
    return {"initial": initial, "full": full, "full_log": full_log.values,
            "resumed": resumed, "resumed_log": resumed_log.values}  # fmt: skip


def test_momentum_encoder_is_updated_as_the_official_loop_does(moco_runs: dict[str, Any]) -> None:
    """main_moco.py ``train``: at iteration i of epoch e (step k), m_k comes from the
    fractional epoch e + i / iters_per_epoch, and ``MoCo.forward`` updates the momentum
    encoder with m_k and the current encoder (step 0 included) before computing the keys. No
    update follows the last step."""
    model = moco_runs["full"]
    official = [
        official_moco_m(e, i, ITERS, EPOCHS, M0) for e in range(EPOCHS) for i in range(ITERS)
    ]
    assert moco_runs["full_log"] == pytest.approx(official, rel=1e-7)  # logged in float32
    previous = moco_runs["initial"]
    for (student, teacher), m in zip(model.seen, official, strict=True):
        expected = previous * m + student * (1.0 - m)
        torch.testing.assert_close(teacher, expected, rtol=1e-6, atol=1e-7)
        previous = teacher
    assert torch.equal(flat(model.momentum_backbone, model.momentum_projector), previous)


def test_run_resumed_mid_epoch_updates_the_momentum_encoder_as_an_uninterrupted_one(
    moco_runs: dict[str, Any],
) -> None:
    """The momentum is a function of the step: resumed at step 4, the first batch updates
    with m_4 and the run ends where the uninterrupted one does."""
    full, resumed = moco_runs["full"], moco_runs["resumed"]
    assert resumed.trainer.global_step == full.trainer.global_step == EPOCHS * ITERS
    expected = [official_moco_m(1, i, ITERS, EPOCHS, M0) for i in (1, 2)]
    assert moco_runs["resumed_log"] == pytest.approx(expected, rel=1e-7)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _cli(config: Path, *extra: str):
    from sslzoo.cli import SSLZooCLI

    return SSLZooCLI(args=["--config", str(config), *extra], run=False)


def image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / cls / "0.png")
    return root


CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
       "--trainer.strategy", "auto", "--trainer.precision", "32-true"]  # fmt: skip


@pytest.mark.parametrize(
    "name, backbone_type, moco_t",
    [("cifar10/mocov3", "ResNet", 0.2), ("cifar10/mocov3_vit", "VisionTransformer", 0.2),
     ("imagenet/mocov3", "ResNet", 1.0), ("imagenet/mocov3_vit", "VisionTransformer", 0.2)],
)  # fmt: skip
def test_configs_instantiate(name: str, backbone_type: str, moco_t: float, tmp_path: Path) -> None:
    config = REPO / "configs" / f"{name}.yaml"
    if name.startswith("imagenet"):
        root = image_folder(tmp_path)
        data = ["--data.train_dir", str(root / "train"), "--data.val_dir", str(root / "val")]
    else:
        data = ["--data.root", str(tmp_path)]
    model = _cli(config, *data, *CPU).model
    assert isinstance(model, MoCoV3)
    assert type(model.backbone.model).__name__ == backbone_type
    assert model.hparams.moco_t == moco_t
