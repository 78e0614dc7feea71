"""SwAV: Sinkhorn-Knopp and the swapped-prediction loss against hand-written references, lightly's
multi-crop views and LARS against the official recipe, the prototype and queue schedules, the
queue in the checkpoint, and a few steps that lower the loss without collapse."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from sslzoo.losses.swapped import SwappedPredictionLoss, distributed_sinkhorn
from sslzoo.methods.swav import OPTIM, VIEWS, SwAV
from sslzoo.nn.queue import filled_rows
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which on a
    busy machine costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# SwAV on TINY_RESNET with small heads and two crop sizes (2 x 16 px, 2 x 8 px).
SMALL = {
    **TINY_RESNET,
    "hidden_mlp": 32,
    "feat_dim": 16,
    "nmb_prototypes": 24,
    "views": VIEWS.replace(nmb_crops=(2, 2), size_crops=(16, 8)),
    "sync_batchnorm": False,
}


def set_queue(model: SwAV, queue: torch.Tensor | None) -> None:
    """Replace a model's queue as a restore does: its filled rows are counted once."""
    model._queue.tensor = queue
    model._queue.rows = 0 if queue is None else filled_rows(queue)


# ----------------------------------------------------------------- references written by hand
def sinkhorn_by_hand(scores: list[list[float]], epsilon: float, iterations: int) -> list[list]:
    """Algorithm 1 of the paper with plain loops: Q = exp(scores / eps)^T (K x B), scaled to
    total 1, then ``iterations`` times every row to 1/K and every column to 1/B; returned as
    B x K with every row summing to 1."""
    batch, k = len(scores), len(scores[0])
    q = [[math.exp(scores[b][j] / epsilon) for b in range(batch)] for j in range(k)]
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            row_sum = sum(q[j])
            q[j] = [x / row_sum / k for x in q[j]]
        for b in range(batch):
            col_sum = sum(q[j][b] for j in range(k))
            for j in range(k):
                q[j][b] = q[j][b] / col_sum / batch
    return [[q[j][b] * batch for j in range(k)] for b in range(batch)]


def swav_loss_by_hand(scores, crops_for_assign, temperature, epsilon, iterations, queue=None):
    """main_swav.py's loss with plain loops over crops, samples and prototypes."""
    batch = len(scores[0])
    loss = 0.0
    for i, a in enumerate(crops_for_assign):
        rows = (queue[i] if queue is not None else []) + scores[a]
        q = sinkhorn_by_hand(rows, epsilon, iterations)[-batch:]
        subloss = 0.0
        others = [v for v in range(len(scores)) if v != a]
        for v in others:
            ce = 0.0
            for b in range(batch):
                logits = [s / temperature for s in scores[v][b]]
                log_z = math.log(sum(math.exp(x) for x in logits))
                ce -= sum(q[b][j] * (logits[j] - log_z) for j in range(len(logits)))
            subloss += ce / batch
        loss += subloss / len(others)
    return loss / len(crops_for_assign)


def test_sinkhorn_matches_hand_written() -> None:
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(6, 16), dim=1) @ F.normalize(torch.randn(5, 16), dim=1).T
    for iterations in (1, 3, 10):
        ours = distributed_sinkhorn(scores, epsilon=0.05, iterations=iterations)
        ref = torch.tensor(sinkhorn_by_hand(scores.tolist(), 0.05, iterations))
        assert torch.allclose(ours, ref.float(), atol=1e-5)
    assert torch.allclose(ours.sum(dim=1), torch.ones(6), atol=1e-5)
    converged = distributed_sinkhorn(scores, epsilon=0.05, iterations=500)
    assert torch.allclose(converged.sum(dim=0), torch.full((5,), 6 / 5), atol=1e-3)


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_matches_hand_written(with_queue: bool) -> None:
    """Two assignment crops among four (two small crops); with a queue, its scores go before
    the batch in the Sinkhorn input and only the batch's codes are kept."""
    torch.manual_seed(1)
    batch, k, temperature, epsilon = 5, 7, 0.1, 0.05
    protos = F.normalize(torch.randn(k, 8), dim=1)
    scores = [F.normalize(torch.randn(batch, 8), dim=1) @ protos.T for _ in range(4)]
    queue = [F.normalize(torch.randn(6, 8), dim=1) @ protos.T for _ in range(2)]
    queue = queue if with_queue else None
    ours = SwappedPredictionLoss((0, 1), temperature, epsilon, 3)(scores, queue)
    ref = swav_loss_by_hand(
        [s.tolist() for s in scores],
        (0, 1),
        temperature,
        epsilon,
        3,
        [s.tolist() for s in queue] if with_queue else None,
    )
    assert float(ours) == pytest.approx(ref, rel=1e-5)


def test_codes_get_no_gradient() -> None:
    """The gradient w.r.t. an assignment crop's scores comes only from its predictions."""
    torch.manual_seed(2)
    scores = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    SwappedPredictionLoss((0,), 0.1, 0.05, 3)(scores).backward()
    q = distributed_sinkhorn(scores[0].detach(), 0.05, 3)
    assert scores[0].grad is None
    for v in (1, 2):  # d/ds of -mean(q . log_softmax(s / T)) / 2
        p = torch.softmax(scores[v].detach() / 0.1, dim=1)
        assert torch.allclose(scores[v].grad, (p - q) / 0.1 / 4 / 2, atol=1e-5)


def _two_rank_worker(rank: int, store: str, errors) -> None:
    """One of two gloo ranks: each holds half of a batch and its own queue."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        torch.manual_seed(0)
        scores = F.normalize(torch.randn(8, 16), dim=1) @ F.normalize(torch.randn(5, 16), dim=1).T
        ours = distributed_sinkhorn(scores[4 * rank : 4 * rank + 4], 0.05, 3)
        ref = torch.tensor(sinkhorn_by_hand(scores.tolist(), 0.05, 3)[4 * rank : 4 * rank + 4])
        assert torch.allclose(ours, ref.float(), atol=1e-5), "sinkhorn over two ranks"

        model = SwAV(**SMALL, queue_length=70, epoch_queue_starts=0)
        queue = model._queue.prepare(batch_size=8, device=torch.device("cpu"))
        assert tuple(queue.shape) == (2, 32, 16), "per-rank length (70 - 70 % 16) // 2"
        set_queue(model, torch.full((2, 32, 16), float(rank)))
        checkpoint: dict = {}
        model.on_save_checkpoint(checkpoint)
        saved = checkpoint["swav_queue"]
        assert (
            tuple(saved.shape) == (2, 2, 32, 16) and saved[1].eq(1).all() and saved[0].eq(0).all()
        )
        set_queue(model, None)
        model.on_load_checkpoint(checkpoint)
        assert model.queue.eq(rank).all(), "each rank gets its own queue back"
        dist.destroy_process_group()
    except Exception as error:  # reported to the parent, which fails the test
        errors.put(f"rank {rank}: {error!r}")


def test_sinkhorn_and_queue_checkpoint_over_two_ranks(tmp_path: Path) -> None:
    """Two CPU processes (gloo): Sinkhorn over the halves of a batch equals Sinkhorn over the
    whole batch, and every rank's queue is saved and restored."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    procs = [
        ctx.Process(target=_two_rank_worker, args=(r, str(tmp_path / "store"), errors))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    assert errors.empty(), errors.get()


def test_queue_saved_by_two_ranks_loads_on_one() -> None:
    model = SwAV(**SMALL, queue_length=64)
    saved = torch.stack([torch.zeros(2, 32, 16), torch.ones(2, 32, 16)])
    model.on_load_checkpoint({"swav_queue": saved})
    assert torch.equal(model.queue, torch.cat([saved[0], saved[1]], dim=1))


# ----------------------------------------------------------------- lightly pieces
def test_views_are_the_official_multicrop() -> None:
    """lightly's SwaVTransform is MultiCropDataset's pipeline: RandomResizedCrop(size, scale)
    per crop group, flip 0.5, colour jitter (0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale 0.2,
    PIL Gaussian blur p=0.5 with radius in (0.1, 2), normalise; its extra ops (an empty
    ColorJitter, vertical flip and rotation with p=0) do nothing."""
    model = SwAV(sync_batchnorm=False, **TINY_RESNET)
    mean, std = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]
    views = model.views.pil(224, mean, std)
    assert len(views.transforms) == 8
    crops = [v.transforms[0] for v in views.transforms]
    assert [tuple(c.size) for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 6
    assert [tuple(c.scale) for c in crops] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    ops = {type(o).__name__: o for o in views.transforms[0].transforms[1].transform.transforms}
    assert ops["RandomHorizontalFlip"].p == 0.5 and ops["RandomVerticalFlip"].p == 0.0
    assert ops["RandomRotate"].prob == 0.0
    cj = ops["RandomApply"]
    assert cj.p == 0.8
    jitter = cj.transforms[0]
    assert jitter.brightness == pytest.approx((0.2, 1.8))
    assert jitter.contrast == pytest.approx((0.2, 1.8))
    assert jitter.saturation == pytest.approx((0.2, 1.8))
    assert jitter.hue == pytest.approx((-0.2, 0.2))
    assert ops["ColorJitter"].brightness is None and ops["ColorJitter"].hue is None
    assert ops["RandomGrayscale"].p == 0.2
    assert ops["GaussianBlur"].prob == 0.5 and tuple(ops["GaussianBlur"].sigmas) == (0.1, 2.0)
    assert list(ops["Normalize"].mean) == mean and list(ops["Normalize"].std) == std


def test_crop_sizes_follow_image_size() -> None:
    from PIL import Image

    model = SwAV(sync_batchnorm=False, **TINY_RESNET)
    assert model.views.crop_sizes(224) == [224, 96]
    assert model.views.crop_sizes(32) == [32, 14]
    larger = SMALL["views"].replace(size_crops=(32, 16))
    assert SwAV(**{**SMALL, "views": larger}).views.crop_sizes(32) == [32, 16]
    image = Image.new("RGB", (40, 40), (120, 30, 200))
    views = SwAV(**SMALL).views.pil(16, [0.5] * 3, [0.25] * 3)(image)
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2


def test_lars_is_official_larc() -> None:
    """The official optimizer is SGD(momentum 0.9, wd 1e-6) wrapped in apex LARC(trust 0.001,
    clip=False) over every parameter. Our LARS with one decayed group is the same step."""
    torch.manual_seed(3)
    model = SwAV(**SMALL)
    groups = model.parameter_groups()
    decayed = [g for g in groups if g["weight_decay"] > 0]
    assert len(decayed) == 1 and len(decayed[0]["params"]) == len(list(model.parameters()))
    optimizer = model.configure_optimizers()
    params = list(model.parameters())
    ref = [p.detach().clone() for p in params]
    bufs: list[torch.Tensor | None] = [None] * len(params)
    lr, wd, trust, eps, momentum = 0.7, 1e-6, 1e-3, 1e-8, 0.9
    for g in optimizer.param_groups:
        g["lr"] = lr
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        optimizer.step()
        for i, grad in enumerate(grads):  # apex LARC.step, then torch SGD with momentum
            p_norm, g_norm = ref[i].norm(), grad.norm()
            if p_norm != 0 and g_norm != 0:
                adaptive = trust * p_norm / (g_norm + p_norm * wd + eps)
                grad = (grad + wd * ref[i]) * adaptive
            bufs[i] = grad.clone() if bufs[i] is None else bufs[i] * momentum + grad
            ref[i] = ref[i] - lr * bufs[i]
    for p, r in zip(params, ref, strict=True):
        assert torch.allclose(p.detach(), r, atol=1e-6)


# ----------------------------------------------------------------- schedules and the queue
class Recorder(Callback):
    """After every step: whether the prototypes had a gradient, and their weights."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor | None] = []
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grad = pl_module.prototypes.weight.grad
        self.grads.append(None if grad is None else grad.clone())
        self.weights.append(pl_module.prototypes.weight.detach().clone())


def test_freeze_queue_normalisation_and_checkpoint(tmp_path: Path) -> None:
    """Three epochs of three steps at batch 32, prototypes frozen for two steps, a queue of two
    batches from epoch 1: it is created at step 3, full after step 4 and used from step 5."""
    torch.manual_seed(0)
    model = SwAV(
        **SMALL,
        freeze_prototypes_niters=2,
        queue_length=64,
        epoch_queue_starts=1,
        optim=OPTIM.replace(
            optimizer="sgd", lr=0.1, warmup_epochs=0, start_warmup_lr=0.0, min_lr=0.0
        ),
    )
    used: list[tuple[int, bool]] = []

    def spy(module: torch.nn.Module, args: tuple) -> None:
        scores, queue_scores = args
        used.append((model.global_step, queue_scores is not None))
        if queue_scores is not None:
            assert [tuple(s.shape) for s in queue_scores] == [(64, 24)] * 2

    model.criterion.register_forward_pre_hook(spy)
    norms: list[torch.Tensor] = []
    model.prototypes.register_forward_pre_hook(
        lambda m, args: norms.append(m.weight.detach().norm(dim=1))
    )
    recorder = Recorder()
    trainer = quiet_trainer(
        max_epochs=3, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder]
    )
    trainer.fit(model, datamodule=digits(batch_size=32, views=model.views))

    # prototypes are on the unit sphere whenever they score embeddings
    assert len(norms) == 9 and all(torch.allclose(n, torch.ones_like(n), atol=1e-5) for n in norms)
    # frozen: no gradient and no update for steps 0 and 1; trained from step 2
    assert recorder.grads[0] is None and recorder.grads[1] is None
    assert torch.allclose(recorder.weights[0], recorder.weights[1])
    assert all(g is not None and g.abs().sum() > 0 for g in recorder.grads[2:])
    assert not torch.allclose(recorder.weights[1], recorder.weights[2])
    # the queue: absent in epoch 0, filling at steps 3 and 4, in the Sinkhorn input from step 5
    assert used == [(s, s >= 5) for s in range(9)]
    assert model.queue is not None and tuple(model.queue.shape) == (2, 64, 16)

    path = tmp_path / "swav.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["swav_queue"].shape == (1, 2, 64, 16)
    restored = SwAV.load_from_checkpoint(path)
    assert restored.queue is not None and torch.equal(restored.queue, model.queue.cpu())
    fresh = SwAV(**SMALL, queue_length=64)
    assert fresh.queue is None
    fresh.on_load_checkpoint(torch.load(path, weights_only=False))
    assert torch.equal(fresh.queue, model.queue.cpu())


def test_recipe_absolute_lrs_warn_at_another_batch() -> None:
    """start_warmup_lr 0.3 and min_lr 0.0048 are main_swav's values for batch 4096, not scaled
    with the batch: a run at batch 32 that keeps them is told; one that sets them is not."""
    for kwargs, warned in (({}, True), ({"start_warmup_lr": 0.0, "min_lr": 0.0}, False)):
        model = SwAV(**SMALL, optim=OPTIM.replace(optimizer="sgd", **kwargs))
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, datamodule=digits(batch_size=32, views=model.views))
        hits = [str(w.message) for w in caught if "batch-4096" in str(w.message)]
        assert bool(hits) is warned, hits
        if warned:
            assert "start_warmup_lr and min_lr" in hits[0] and "global batch is 32" in hits[0]


def test_no_queue_before_its_epoch_or_when_disabled() -> None:
    model = SwAV(**SMALL, queue_length=64, epoch_queue_starts=1)
    z = [F.normalize(torch.randn(32, 16), dim=1) for _ in range(4)]
    assert model.queue_scores(z) is None and model.queue is None  # epoch 0 < 1
    assert SwAV(**SMALL, queue_length=0, epoch_queue_starts=0).queue_scores(z) is None
    model = SwAV(**SMALL, queue_length=100, epoch_queue_starts=0)  # cut to 96 = 3 batches
    for _ in range(3):
        assert model.queue_scores(z) is None
    assert tuple(model.queue.shape) == (2, 96, 16)
    assert torch.equal(model.queue[0, :32], z[0]) and torch.equal(model.queue[1, :32], z[1])
    assert model.queue_scores(z) is not None


def test_few_steps_lower_the_loss_without_collapse() -> None:
    """SGD steps on one fixed batch of digits: the loss falls and the logged embedding std stays
    well above 0. (With fewer prototypes than images the loss first settles near ln K, the
    value at uniform predictions, the plateau the official README warns about.)"""
    L.seed_everything(0, verbose=False)  # lightly's PIL views draw from random and numpy too
    data = digits(batch_size=32)
    model = SwAV(**{**SMALL, "nmb_prototypes": 64}, freeze_prototypes_niters=0)
    data.build_datasets(model.views.pil(16, data.mean, data.std), data.eval_transform())
    views, labels = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=32)))
    logged: dict[str, list[float]] = {"train/loss": [], "train/embedding_std": []}
    model.log = lambda name, value, **kw: logged[name].append(float(value.detach()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        loss = model.training_step((views, labels), 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses, stds = logged["train/loss"], logged["train/embedding_std"]
    assert max(losses[-3:]) < losses[0] - 1.0, losses
    assert min(stds) > 0.1, stds  # 1/sqrt(16) = 0.25 spread over the sphere, 0 collapsed


# ----------------------------------------------------------------- configs
def test_configs_instantiate(tmp_path: Path) -> None:
    from PIL import Image

    from sslzoo.cli import SSLZooCLI

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.jpg")
    cases = {
        "configs/cifar10/swav.yaml": ["--data.root", str(tmp_path)],
        "configs/imagenet/swav.yaml": [
            "--data.train_dir", str(tmp_path / "train"),
            "--data.val_dir", str(tmp_path / "val"),
        ],
    }  # fmt: skip
    clis = {}
    for config, extra in cases.items():
        args = ["--config", str(REPO / config), *extra]
        args += ["--trainer.default_root_dir", str(tmp_path / "runs")]
        clis[config] = SSLZooCLI(args=args, run=False)
        assert isinstance(clis[config].model, SwAV), config
    cifar = clis["configs/cifar10/swav.yaml"].model
    assert cifar.views.crop_sizes(32) == [32] and cifar.hparams.nmb_prototypes == 512
    imagenet = clis["configs/imagenet/swav.yaml"]
    hp, st, views = imagenet.model.hparams, imagenet.model.optim, imagenet.model.views
    assert views.crop_sizes(224) == [224, 96] and list(views.nmb_crops) == [2, 6]
    assert (hp.queue_length, hp.freeze_prototypes_niters) == (3840, 5005)
    # batch-256 recipe: lr 0.6 x 256 / 256 with linear scaling, final lr 0.6 / 1000
    assert imagenet.datamodule.batch_size == 256 and st.lr_scaling == "linear"
    assert st.lr == 0.6 and st.min_lr == pytest.approx(0.6 / 1000)
