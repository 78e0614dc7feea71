"""SimSiam: the loss against its formula, the official projector with its frozen fc bias and
predictor, lightly's views, the fixed-lr predictor groups and schedule, the configs, and a
short training run that lowers the loss without collapsing."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslzoo.datamodules.digits import load_digits_images
from sslzoo.losses.regression import NegativeCosineLoss
from sslzoo.methods.simsiam import OPTIM, SimSiam
from tests.conftest import TINY_RESNET

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(**TINY_RESNET, dim=16, pred_dim=8, sync_batchnorm=False)


def negative_cosine_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """The symmetrised loss as SimSiam's ``training_step`` forms it from its criterion."""
    criterion = NegativeCosineLoss()
    return (criterion(p1, z2) + criterion(p2, z1)) / 2


def test_loss_matches_formula() -> None:
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7) for _ in range(4))

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        dot = sum(float(a[d] * b[d]) for d in range(a.shape[0]))
        return dot / math.sqrt(float((a * a).sum()) * float((b * b).sum()))

    expected = -0.5 * (
        sum(cos(p1[i], z2[i]) for i in range(5)) / 5 + sum(cos(p2[i], z1[i]) for i in range(5)) / 5
    )
    assert float(negative_cosine_loss(p1, p2, z1, z2)) == pytest.approx(expected, abs=1e-6)


def test_loss_stops_the_gradient_of_z() -> None:
    p1, p2, z1, z2 = (torch.randn(3, 4, requires_grad=True) for _ in range(4))
    negative_cosine_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None


def test_symmetric_loss_pairs_each_prediction_with_the_other_view() -> None:
    torch.manual_seed(0)
    model = SimSiam(**SMALL)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = model.training_step(([x1, x2], torch.arange(4)), 0)
    with torch.no_grad():  # train-mode BN uses batch statistics: the same terms again
        z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
        p1, p2 = model.predictor(z1), model.predictor(z2)
    expected = -0.5 * (
        torch.cosine_similarity(p1, z2).mean() + torch.cosine_similarity(p2, z1).mean()
    )
    assert float(out["loss"]) == pytest.approx(float(expected), abs=1e-5)


def layer_types(head: nn.Module) -> list[str]:
    names = []
    for m in head.modules():
        if isinstance(m, nn.Linear):
            names.append(f"Linear({m.in_features},{m.out_features},bias={m.bias is not None})")
        elif isinstance(m, nn.BatchNorm1d):
            names.append(f"BN({m.num_features},affine={m.affine})")
        elif isinstance(m, nn.ReLU):
            names.append("ReLU")
    return names


def test_projector_is_the_official_one_with_a_frozen_fc_bias() -> None:
    """Hidden width = backbone width (128 here), 3 layers, the output fc keeps its bias but
    does not train it, and the output BN has no affine parameters."""
    model = SimSiam(**SMALL)
    assert layer_types(model.projector) == [
        "Linear(128,128,bias=False)", "BN(128,affine=True)", "ReLU",
        "Linear(128,128,bias=False)", "BN(128,affine=True)", "ReLU",
        "Linear(128,16,bias=True)", "BN(16,affine=False)",
    ]  # fmt: skip
    fc = model.projector[6]
    assert not fc.bias.requires_grad and fc.weight.requires_grad
    optimised = {id(p) for g in model.parameter_groups() for p in g["params"]}
    assert id(fc.bias) not in optimised


def test_predictor_is_the_official_bottleneck() -> None:
    """simsiam/builder.py's predictor: Linear(dim, pred_dim, no bias) -> BN -> ReLU ->
    Linear(pred_dim, dim) with a bias."""
    model = SimSiam(**SMALL)
    assert layer_types(model.predictor) == [
        "Linear(16,8,bias=False)", "BN(8,affine=True)", "ReLU", "Linear(8,16,bias=True)",
    ]  # fmt: skip


def test_lightly_views_are_the_moco_v2_recipe() -> None:
    """The recipe's lightly views (SimCLRTransform, whose steps are SimSiamTransform's) are
    two views of the official recipe: crop (0.2, 1), colour jitter (0.4, 0.4, 0.4, 0.1) with
    p=0.8, grayscale 0.2, blur 0.5 with sigma (0.1, 2), flip 0.5."""
    views = SimSiam(**SMALL).views.pil(32, (0.5,) * 3, (0.25,) * 3)
    assert len(views.transforms) == 2
    for view in views.transforms:
        ops = {type(o).__name__: o for o in view.transform.transforms}
        assert ops["RandomResizedCrop"].scale == (0.2, 1.0)
        jitter = ops["RandomApply"]
        cj = jitter.transforms[0]
        assert jitter.p == 0.8
        assert cj.brightness == pytest.approx((0.6, 1.4))
        assert cj.contrast == pytest.approx((0.6, 1.4))
        assert cj.saturation == pytest.approx((0.6, 1.4))
        assert cj.hue == pytest.approx((-0.1, 0.1))
        assert ops["RandomGrayscale"].p == 0.2
        assert ops["GaussianBlur"].prob == 0.5 and ops["GaussianBlur"].sigmas == (0.1, 2.0)
        assert ops["RandomHorizontalFlip"].p == 0.5
        assert "RandomSolarization" not in ops


@pytest.mark.parametrize("exclude", [False, True])
def test_predictor_has_its_own_fixed_lr_groups(exclude: bool) -> None:
    model = SimSiam(**SMALL, optim=OPTIM.replace(exclude_bias_and_norm=exclude))
    groups = model.parameter_groups()
    predictor = {id(p) for p in model.predictor.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert g["fixed_lr"] == bool(ids & predictor)
        assert not g["fixed_lr"] or ids <= predictor
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    if exclude:  # biases and norms in zero-decay groups
        assert decayed == {id(p) for p in trainable if p.ndim > 1}
    else:  # the official SGD decays every parameter
        assert decayed == {id(p) for p in trainable}


def test_without_fix_pred_lr_every_group_follows_the_schedule() -> None:
    groups = SimSiam(**SMALL, fix_pred_lr=False).parameter_groups()
    assert not any(g["fixed_lr"] for g in groups)


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
    """Loss, embedding std and every group's learning rate at each step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.stds: list[float] = []
        self.lrs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.stds.append(float(trainer.callback_metrics["train/embedding_std"]))
        opt = trainer.optimizers[0]
        self.lrs.append({g["name"]: g["lr"] for g in opt.param_groups})


EPOCHS, ITERS = 4, 5  # 20 steps


def fit_fixed_batch(model: SimSiam, epochs: int, iters: int) -> Recorder:
    views = model.views.pil(16, (0.5,) * 3, (0.25,) * 3)
    data = DataLoader(FixedBatch(views, steps=iters), batch_size=32)
    recorder = Recorder()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=data)
    return recorder


@pytest.fixture(scope="module")
def short_run() -> tuple[SimSiam, Recorder]:
    L.seed_everything(0)
    model = SimSiam(**SMALL, optim=OPTIM.replace(lr=0.2, weight_decay=5e-4))
    return model, fit_fixed_batch(model, EPOCHS, ITERS)


def official_lr(init_lr: float, epoch: int, epochs: int) -> float:
    """main_simsiam.py ``adjust_learning_rate``, called at the start of every epoch."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def test_lr_steps_once_per_epoch_and_the_predictor_keeps_the_initial_lr(short_run) -> None:
    """Officially the encoder's learning rate is set once at each epoch's start, and the
    predictor's groups (``fix_lr``) keep ``init_lr = lr * batch / 256`` throughout."""
    _, recorder = short_run
    init_lr = 0.2 * 32 / 256
    assert len(recorder.lrs) == EPOCHS * ITERS
    for step, lrs in enumerate(recorder.lrs):
        assert lrs["decay"] == pytest.approx(official_lr(init_lr, step // ITERS, EPOCHS))
        assert lrs["predictor_decay"] == pytest.approx(init_lr)


def test_lr_update_step_follows_the_cosine_at_every_step() -> None:
    L.seed_everything(0)
    model = SimSiam(**SMALL, optim=OPTIM.replace(lr=0.2), lr_update="step")
    recorder = fit_fixed_batch(model, epochs=2, iters=2)
    peak = 0.2 * 32 / 256
    for step, lrs in enumerate(recorder.lrs):
        assert lrs["decay"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * step / 4)))
        assert lrs["predictor_decay"] == pytest.approx(peak)
    with pytest.raises(ValueError, match="lr_update"):
        SimSiam(**SMALL, lr_update="iteration")


def test_training_on_a_fixed_batch_lowers_the_loss_without_collapse(short_run) -> None:
    _, recorder = short_run
    first, last = np.mean(recorder.losses[:3]), np.mean(recorder.losses[-3:])
    assert last < first - 0.2, recorder.losses  # the loss lies in [-1, 1]
    assert min(recorder.stds) > 0.5 / math.sqrt(16), recorder.stds  # 1/sqrt(d) when spread


def image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / cls / "0.png")
    return root


@pytest.mark.parametrize("name", ["cifar10/simsiam", "imagenet/simsiam"])
def test_configs_instantiate(name: str, tmp_path: Path) -> None:
    from sslzoo.cli import SSLZooCLI

    if name.startswith("imagenet"):
        root = image_folder(tmp_path)
        data = ["--data.train_dir", str(root / "train"), "--data.val_dir", str(root / "val")]
    else:
        data = ["--data.root", str(tmp_path)]
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
           "--trainer.strategy", "auto"]  # fmt: skip
    config = REPO / "configs" / f"{name}.yaml"
    model = SSLZooCLI(args=["--config", str(config), *data, *cpu], run=False).model
    assert isinstance(model, SimSiam)
    assert model.hparams.fix_pred_lr
    assert model.projector[-1].num_features == model.hparams.dim
    # lightly's CIFAR-10 benchmark, which the CIFAR config follows: "a 2-layer projection head
    # for cifar10 as described in the paper", 512-2048-2048; the ImageNet recipe's has 3
    linears = [(m.in_features, m.out_features) for m in model.projector if isinstance(m, nn.Linear)]
    expected = {"cifar10/simsiam": [(512, 2048), (2048, 2048)],
                "imagenet/simsiam": [(2048, 2048), (2048, 2048), (2048, 2048)]}  # fmt: skip
    assert linears == expected[name]
