"""FSDP2 sharding on CPU (2 processes, gloo) through Lightning's ``ModelParallelStrategy``
(``sslzoo.sharding.FSDP2Strategy``).

DINO with a tiny ViT: each rank holds half of the parameters, one FSDP unit per block and per
top-level module with teachers laid out like their students, the loss, student, EMA teacher and
centre equal a single-process unsharded run, the sharded EMA update is the formula, activation
checkpointing changes nothing, bf16 compute keeps masters, centre, optimizer state and
BatchNorm in fp32, and a sharded checkpoint saves, loads, resumes to the uninterrupted run and
consolidates into one file. SwAV (tiny ResNet: LARS, prototype normalisation, queue,
BatchNorm), iBOT (a parameter outside any submodule, ViT internals), DINOv2 (the same, with
per-module clipping and layer-wise decay groups), MAE (a nested forward), Distillation (a
frozen teacher in inference mode) and the two-view methods (SimCLR, MoCo v3, BYOL, SimSiam,
Barlow Twins, VICReg: EMA teachers, LARS, frozen biases): half of the parameters per rank, and
equal to a 2-process DDP run, evaluation features too. SimCLR from litdata shards
(``StreamingDataModule``): each rank streams its own half of each epoch, alike under FSDP2 and
DDP, which train to the same weights.

One 2-process job (this file run as a script) writes its results to a folder; the
single-process reference runs in the test process on the same data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script by the launcher below
    sys.path.insert(0, str(REPO))

import sslzoo.methods as methods  # noqa: E402
from sslzoo.callbacks.ema import ema_update  # noqa: E402
from sslzoo.methods import dino, dinov2, distillation, ibot, mae, swav  # noqa: E402
from sslzoo.methods.dino import DINO  # noqa: E402
from sslzoo.methods.distillation import Distillation  # noqa: E402
from sslzoo.methods.ibot import IBOT  # noqa: E402
from sslzoo.methods.mae import MAE  # noqa: E402
from sslzoo.methods.swav import SwAV  # noqa: E402
from tests.conftest import TINY_HEADS, TINY_RESNET  # noqa: E402
from tests.ddp_helpers import ImageMaskedDINOv2  # noqa: E402
from tests.helpers import free_port  # noqa: E402

WORLD = 2
SAMPLES, GLOBAL_BATCH = 16, 8  # 2 optimizer steps per epoch
EPOCHS, STEPS = 2, 4  # resumed from the checkpoint written after epoch 0
TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2),
)
TIMEOUT_S = 240
STREAM_IMAGES, STREAM_BATCH = 48, 4  # 6 batches per rank and epoch, nothing dropped


class FixedViews(Dataset):
    """Pre-computed views (2 global 16 px, 2 local 8 px): no augmentation randomness."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.globals = torch.randn(SAMPLES, 2, 3, 16, 16, generator=g)
        self.locals = torch.randn(SAMPLES, 2, 3, 8, 8, generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        return [*self.globals[i], *self.locals[i]], i


def tiny_dino(seed: int = 0) -> DINO:
    """DINO with a tiny ViT. ``clip_grad`` is small so per-parameter clipping, which needs the
    norm of the whole (not the local) gradient, acts on most tensors; ``freeze_last_layer``
    covers epoch 0; no stochastic depth so every run is deterministic."""
    torch.manual_seed(seed)
    return DINO(
        **TINY_VIT,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        drop_path_rate=0.0,
        clip_grad=0.05,
        freeze_last_layer=1,
        views=dino.VIEWS.replace(local_crops_number=2),
        optim=dino.OPTIM.replace(lr=0.01, warmup_epochs=1, weight_decay_end=0.4),
    )


def tiny_swav() -> SwAV:
    """SwAV with a tiny ResNet, LARS, and a queue full from step 2 on (per-rank length 8)."""
    torch.manual_seed(0)
    return SwAV(
        **TINY_RESNET,
        hidden_mlp=32,
        feat_dim=16,
        nmb_prototypes=24,
        sync_batchnorm=False,
        queue_length=16,
        epoch_queue_starts=0,
        freeze_prototypes_niters=1,
        views=swav.VIEWS.replace(nmb_crops=(2, 2), size_crops=(16, 8)),
        optim=swav.OPTIM.replace(warmup_epochs=1),
    )


def tiny_ibot() -> IBOT:
    """iBOT: parameters outside any submodule (the mask embedding) and ViT internals called
    directly, so its backbones and heads join the root unit."""
    torch.manual_seed(0)
    return IBOT(
        **TINY_VIT,
        out_dim=64,
        patch_out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        drop_path_rate=0.0,
        views=ibot.VIEWS.replace(local_crops_number=2),
        optim=ibot.OPTIM.replace(lr=0.01, warmup_epochs=1),
    )


def tiny_dinov2() -> ImageMaskedDINOv2:
    """DINOv2: a mask token outside any submodule, ViT internals, a separate patch head,
    registers, LayerScale, layer-wise decay groups and clipping per module (of DTensor
    gradients); masks from the images, so both runs mask alike."""
    torch.manual_seed(0)
    return ImageMaskedDINOv2(
        **TINY_VIT, out_dim=64, hidden_dim=32, bottleneck_dim=16, separate_head=True,
        ibot_out_dim=48, ibot_hidden_dim=32, ibot_bottleneck_dim=16, drop_path_rate=0.0,
        num_register_tokens=1, official_epoch_length=None, clip_grad=0.05,
        views=dinov2.VIEWS.replace(local_crops_number=2),
        optim=dinov2.OPTIM.replace(lr=0.01, lr_scaling="none", warmup_epochs=1),
    )  # fmt: skip


def tiny_mae() -> MAE:
    """MAE: its training_step calls its own forward (a nested root forward)."""
    torch.manual_seed(0)
    return MAE(
        **TINY_VIT,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        optim=mae.OPTIM.replace(lr=0.01, warmup_epochs=1),
    )


def tiny_distillation() -> Distillation:
    """Distillation: a frozen ViT teacher (run in inference mode, its internals called) into
    a ResNet student; no mixup, whose permutation is within each rank's batch."""
    torch.manual_seed(0)
    return Distillation(
        **TINY_RESNET, teacher=TINY_VIT["backbone"], teacher_kwargs=TINY_VIT["backbone_kwargs"],
        mixup=False, sync_batchnorm=False, optim=distillation.OPTIM.replace(warmup_epochs=1),
    )  # fmt: skip


class MaskedViews(FixedViews):
    """iBOT's batch: the views and a fixed random block of masked patches per global view."""

    def __getitem__(self, i: int) -> tuple[dict[str, Any], int]:
        views, label = super().__getitem__(i)
        g = torch.Generator().manual_seed(i)
        masks = [torch.rand(4, 4, generator=g) < 0.4 for _ in range(2)]
        return {"views": views, "masks": masks}, label


class OneView(FixedViews):
    """MAE's batch: one 16 px view."""

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        views, label = super().__getitem__(i)
        return views[:1], label


class TwoViews(FixedViews):
    """The two-view methods' batch: the two 16 px views."""

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        views, label = super().__getitem__(i)
        return views[:2], label


def tiny_two_view(name: str) -> Any:
    """The two-view method ``name``, tiny, with its own optimisation recipe (LARS for most)
    warming up."""

    def build() -> Any:
        torch.manual_seed(0)
        cls = getattr(methods, name)
        module = sys.modules[cls.__module__]
        optim = module.OPTIM.replace(warmup_epochs=1)
        return cls(**TINY_RESNET, **TINY_HEADS[name], sync_batchnorm=False, optim=optim)

    return build


# method name -> (builder, dataset) of the runs compared with DDP
AGAINST_DDP = {"swav": (tiny_swav, FixedViews), "ibot": (tiny_ibot, MaskedViews)}
AGAINST_DDP["mae"] = (tiny_mae, OneView)
AGAINST_DDP["dinov2"] = (tiny_dinov2, FixedViews)
AGAINST_DDP["distillation"] = (tiny_distillation, OneView)
AGAINST_DDP.update({name.lower(): (tiny_two_view(name), TwoViews) for name in TINY_HEADS})


class RecordLoss(L.Callback):
    """Keeps the loss of every step, averaged over ranks: with equal per-rank batches this is
    the loss of the union batch (the loss is a mean over the batch of each view pair)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        self.losses.append(float(loss))


def trainer(**kwargs: Any) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        # epoch-based: with max_steps Lightning resumes any checkpoint as mid-epoch and
        # replays the restarted loader from its first batch
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered from the shards (a collective under FSDP2)."""
    from sslzoo.sharding import full_tensor

    return {k: full_tensor(v).detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------ the 2-process job


def distributed_fit(
    model: L.LightningModule,
    strategy: Any = None,
    ckpt_dir: Path | None = None,
    resume: Path | None = None,
    data: Dataset | None = None,
) -> tuple[L.Trainer, list[float]]:
    """Fit on the 2 processes (FSDP2 unless ``strategy`` is given); with ``ckpt_dir``, a
    sharded checkpoint is written after each epoch (``epoch=0.ckpt`` is what a run stopped
    after epoch 0 leaves)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sslzoo.sharding import FSDP2Strategy

    record = RecordLoss()
    callbacks: list[L.Callback] = [record]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(ckpt_dir, "{epoch}", save_top_k=-1, every_n_epochs=1))
    t = trainer(
        devices=WORLD,
        strategy=strategy or FSDP2Strategy(),
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
        use_distributed_sampler=False,
    )
    # Lightning's own sampler always shuffles training data; this one deals sample i to rank
    # i % 2, so each step's two rank batches are the single-process batch
    data = data or FixedViews()
    sampler = DistributedSampler(data, WORLD, int(os.environ["LOCAL_RANK"]), shuffle=False)
    t.fit(model, DataLoader(data, GLOBAL_BATCH // WORLD, sampler=sampler), ckpt_path=resume)
    return t, record.losses


def streaming_fit(pack: Path, strategy: Any) -> dict[str, Any]:
    """SimCLR (tiny ResNet) for 2 epochs from the pack through ``StreamingDataModule``
    (views in the main process); the ids of the samples this rank decoded, per epoch."""
    from unittest import mock

    from sslzoo.datamodules import StreamingDataModule, shards

    decode, epochs = shards.decode_sample, [[], []]

    def record(sample: dict[str, Any], *args: Any) -> Any:
        epochs[t.current_epoch].append(int(sample["id"]))
        return decode(sample, *args)

    torch.manual_seed(0)
    model = tiny_two_view("SimCLR")()
    data = StreamingDataModule(str(pack), str(pack), batch_size=STREAM_BATCH, num_workers=0,
                               image_size=16, pin_memory=False)  # fmt: skip
    data.views = model.views  # as ``sslzoo fit`` hands them over
    t = trainer(devices=WORLD, strategy=strategy, limit_val_batches=0)
    with mock.patch.object(shards, "decode_sample", record):
        t.fit(model, datamodule=data)
    return {"epochs": epochs, "state": full_state(model)}


def layout(model: torch.nn.Module) -> dict[str, Any]:
    """FSDP units (module names) and this rank's shard shapes per parameter."""
    from torch.distributed.fsdp import FSDPModule

    from sslzoo.sharding import local_tensor

    return {
        "units": [name for name, m in model.named_modules() if isinstance(m, FSDPModule)],
        "shapes": {k: tuple(local_tensor(p).shape) for k, p in model.named_parameters()},
    }


def worker(out: Path) -> None:
    """Run on each of the 2 processes; each rank writes its counts, rank 0 the gathered
    results."""
    from lightning.pytorch.strategies import DDPStrategy

    from sslzoo.sharding import FSDP2Strategy, local_numel

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    model = tiny_dino()
    t, results["losses"] = distributed_fit(model, ckpt_dir=out / "ckpts")
    rank = t.global_rank
    total = sum(p.numel() for p in model.parameters())  # a DTensor's numel is its global one
    counts = {"dino": (local_numel(model.parameters()), total)}
    results["state"] = full_state(model)
    results["layout"] = layout(model)

    # one more EMA update on the sharded pair, against the formula on gathered tensors
    student, teacher = full_state(model.head), full_state(model.teacher_head)
    ema_update(model.head, model.teacher_head, 0.9)
    results["ema"] = (student, teacher, full_state(model.teacher_head))

    # resumed from the epoch-0 shards into a model initialised with another seed
    resumed = tiny_dino(seed=1)
    _, results["resumed_losses"] = distributed_fit(resumed, resume=out / "ckpts" / "epoch=0.ckpt")
    results["resumed"] = full_state(resumed)

    # activation checkpointing recomputes the same blocks: same run
    checkpointed = tiny_dino()
    distributed_fit(checkpointed, FSDP2Strategy(activation_checkpointing=True))
    results["checkpointed"] = full_state(checkpointed)

    # bf16 compute with parameters kept gathered after forward (the teacher's are freed by
    # the EMA update): masters, centre and optimizer state stay fp32
    low = tiny_dino()
    t_low, results["bf16_losses"] = distributed_fit(
        low, FSDP2Strategy(param_dtype="bf16", reshard_after_forward=False)
    )
    states = t_low.optimizers[0].state.values()
    optimizer_dtypes = {v.dtype for s in states for k, v in s.items() if k != "step"}
    results["bf16_dtypes"] = {
        "params": {p.dtype for p in low.parameters()},
        "centre": low.criterion.center.dtype,
        "optimizer": optimizer_dtypes,
    }

    # under bf16 the BatchNorm layers compute with fp32 weights: record the dtypes seen
    low_swav, seen = tiny_swav(), {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            tensors = {"weight": module.weight, "running_mean": getattr(module, "running_mean", 0)}
            seen.setdefault(name, {k: v.dtype for k, v in tensors.items() if torch.is_tensor(v)})

        return hook

    low_swav.backbone.model.bn1.register_forward_pre_hook(record("bn"))
    low_swav.backbone.model.conv1.register_forward_pre_hook(record("conv"))
    distributed_fit(low_swav, FSDP2Strategy(param_dtype="bf16"))
    results["bf16_swav_dtypes"] = seen

    # SwAV (ResNet, sharded per residual block), iBOT and MAE against DDP on the same ranks
    # (per-rank BatchNorm and masks in both); then evaluation features from the sharded model
    images = FixedViews().globals[:4, 0]
    for name, (build, dataset) in AGAINST_DDP.items():
        runs = {}
        for kind, strategy in (("fsdp", FSDP2Strategy()), ("ddp", DDPStrategy())):
            model = build()
            _, losses = distributed_fit(model, strategy, data=dataset())
            runs[kind] = {"losses": losses, "state": full_state(model), "layout": layout(model)}
            runs[kind]["features"] = model.extract_features(images)
            if kind == "fsdp":  # a DTensor's numel() is its global numel
                total = sum(p.numel() for p in model.parameters())
                counts[name] = (local_numel(model.parameters()), total)
                runs[kind]["after_eval"] = layout(model)["shapes"]
        results[name] = runs

    # StreamingDataModule: each rank streams its own half of the pack, the same under both
    for kind, strategy in (("fsdp", FSDP2Strategy()), ("ddp", DDPStrategy())):
        counts[f"streaming_{kind}"] = streaming_fit(out / "pack", strategy)

    torch.save(counts, out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(results, out / "results.pt")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from sslzoo.datamodules.pack import pack_folder
    from tests.augment_helpers import cifar_folder

    out = tmp_path_factory.mktemp("fsdp")
    pack_folder(cifar_folder(out / "images", STREAM_IMAGES // 2) / "train", out / "pack")
    port = str(free_port())
    procs, logs = [], [out / f"log{rank}.txt" for rank in range(WORLD)]
    for rank in range(WORLD):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(WORLD),
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        with logs[rank].open("w") as log:
            cmd = [sys.executable, __file__, str(out)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for rank, p in enumerate(procs):
            code = p.wait(timeout=TIMEOUT_S)
            assert code == 0, f"rank {rank} failed:\n{logs[rank].read_text()[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = torch.load(out / "results.pt")
    results["ranks"] = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    results["ckpt"] = out / "ckpts" / "epoch=0.ckpt"
    return results


@pytest.fixture(scope="module")
def unsharded() -> dict[str, Any]:
    """The same DINO training on one process, batch = union of the ranks' batches."""
    model = tiny_dino()
    record = RecordLoss()
    trainer(devices=1, callbacks=[record]).fit(
        model, DataLoader(FixedViews(), batch_size=GLOBAL_BATCH)
    )
    return {"losses": record.losses, "state": full_state(model)}


# ------------------------------------------------------------------------------------ tests

# The sharded and unsharded runs differ only in float summation order (gradients summed by
# reduce-scatter across ranks instead of inside one batch, norms of clipped gradients from
# per-shard partial sums): measured <= 1.2e-7 on losses and weights after 4 steps. 2e-6 keeps
# a 15x margin and is far below a real change: clipping with the local instead of the full
# gradient norm moves weights by ~1e-4 and the loss by ~7e-3; a skipped update moves weights by
# ~lr = 3e-4.
ATOL, RTOL = 2e-6, 1e-5


def close(
    a: torch.Tensor, b: torch.Tensor, key: str, atol: float = ATOL, rtol: float = RTOL
) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("method", ["dino", *AGAINST_DDP])
def test_each_rank_holds_half_of_the_parameters(sharded: dict[str, Any], method: str) -> None:
    counts = [r[method] for r in sharded["ranks"]]
    total = counts[0][1]
    assert sum(local for local, _ in counts) == total  # every element on exactly one rank
    for local, _ in counts:
        # dim-0 chunks of odd-sized tensors are uneven: within 5 % of an even split
        assert abs(local / total - 1 / WORLD) < 0.05


def test_one_unit_per_block_and_teachers_laid_out_like_students(sharded: dict[str, Any]) -> None:
    units, shapes = sharded["layout"]["units"], sharded["layout"]["shapes"]
    blocks = [f"backbone.model.blocks.{i}" for i in range(2)]
    students = {"backbone", "head", *blocks}
    assert set(units) == {""} | students | {f"teacher_{u}" for u in students}  # "": the root
    params = [k for k in shapes if k.startswith(("backbone.", "head."))]
    assert all(shapes[f"teacher_{k}"] == shapes[k] for k in params)
    swav_blocks = {f"backbone.model.layer{i}.0" for i in range(1, 5)}
    swav_top = {"", "backbone", "projection_head", "prototypes"}
    assert set(sharded["swav"]["fsdp"]["layout"]["units"]) == swav_top | swav_blocks
    # iBOT: only blocks are units besides the root, which holds the rest
    ibot_blocks = {
        f"{m}.model.blocks.{i}" for m in ("backbone", "teacher_backbone") for i in (0, 1)
    }
    assert set(sharded["ibot"]["fsdp"]["layout"]["units"]) == {""} | ibot_blocks


def test_loss_and_weights_match_unsharded_run(
    sharded: dict[str, Any], unsharded: dict[str, Any]
) -> None:
    assert len(sharded["losses"]) == len(unsharded["losses"]) == STEPS
    close(torch.tensor(sharded["losses"]), torch.tensor(unsharded["losses"]), "loss")
    reference = unsharded["state"]
    students = [k for k in reference if k.startswith(("backbone.", "head."))]
    assert students and set(sharded["state"]) == set(reference)
    initial = tiny_dino().state_dict()
    moved = [k for k in students if not torch.equal(reference[k], initial[k])]
    assert len(moved) > len(students) // 2  # the comparison is not between untrained weights
    for k in students:
        close(sharded["state"][k], reference[k], k)


def test_ema_teacher_and_centre_match_unsharded_run(
    sharded: dict[str, Any], unsharded: dict[str, Any]
) -> None:
    reference = unsharded["state"]
    teachers = [k for k in reference if k.startswith(("teacher_", "criterion."))]
    assert "criterion.center" in teachers
    assert sharded["state"]["criterion.center"].dtype == torch.float32
    for k in teachers:
        close(sharded["state"][k], reference[k], k)


def test_sharded_ema_update_is_the_formula(sharded: dict[str, Any]) -> None:
    student, teacher, after = sharded["ema"]
    assert len(after) == 8  # 3 MLP Linears x (weight, bias), last layer g and v: parameters
    for k in after:
        # the same float ops per element as the formula: only the fused op's rounding differs
        torch.testing.assert_close(after[k], 0.9 * teacher[k] + 0.1 * student[k])


def test_activation_checkpointing_gives_the_same_run(sharded: dict[str, Any]) -> None:
    for k, v in sharded["state"].items():
        close(sharded["checkpointed"][k], v, k)


def test_bf16_compute_keeps_masters_centre_and_batchnorm_fp32(sharded: dict[str, Any]) -> None:
    dtypes = sharded["bf16_dtypes"]
    assert dtypes["params"] == {torch.float32} and dtypes["centre"] == torch.float32
    assert dtypes["optimizer"] == {torch.float32}
    assert sharded["bf16_swav_dtypes"] == {
        "bn": {"weight": torch.float32, "running_mean": torch.float32},
        "conv": {"weight": torch.bfloat16},
    }
    # bf16 keeps 8 significant bits (relative rounding 2**-9 ~ 2e-3 per op): over 4 steps the
    # bf16 run's loss stays within 3 % of the fp32 run's (measured 0.6-1.1 %), which checks
    # that it trains the same model; the dtypes above are what keeps the sensitive state fp32
    close(
        torch.tensor(sharded["bf16_losses"]),
        torch.tensor(sharded["losses"]),
        "loss",
        atol=0.0,
        rtol=0.03,
    )


def test_sharded_checkpoint_saves_loads_and_resumes(sharded: dict[str, Any]) -> None:
    ckpt = sharded["ckpt"]
    assert ckpt.is_dir()  # Lightning's distributed checkpoint: one shard file per rank
    assert len(list(ckpt.glob("*.distcp"))) == WORLD and (ckpt / "meta.pt").is_file()
    # resumed at step 2 into a model initialised with another seed, from a checkpoint where
    # DINO's frozen last layer has no AdamW state yet: equal to the run that never stopped,
    # so weights, teacher, centre, optimizer state and step were all restored. Same ops on
    # the same ranks: bitwise equal.
    assert sharded["resumed_losses"] == sharded["losses"][STEPS // EPOCHS :]
    assert set(sharded["resumed"]) == set(sharded["state"])
    for k, v in sharded["state"].items():
        assert torch.equal(sharded["resumed"][k], v), k


def test_sharded_checkpoint_consolidates_for_evaluation(
    sharded: dict[str, Any], tmp_path: Path
) -> None:
    from sslzoo.checkpoints import read_checkpoint
    from sslzoo.sharding import consolidate_checkpoint

    # the checkpoint of the last epoch holds the final weights of the run
    full = consolidate_checkpoint(sharded["ckpt"].with_name("epoch=1.ckpt"), tmp_path / "x.ckpt")
    checkpoint = read_checkpoint(full)  # plain tensors only (weights_only)
    assert checkpoint["global_step"] == STEPS and "hyper_parameters" in checkpoint
    model = tiny_dino(seed=1)
    model.load_state_dict(checkpoint["state_dict"])  # strict: every key, right shapes
    state = model.state_dict()
    assert set(state) == set(sharded["state"])
    for k, v in sharded["state"].items():
        assert torch.equal(state[k], v), k


# The same per-rank computations as DDP, reduced by reduce-scatter instead of all-reduce:
# measured <= 6e-8 on SwAV's weights, 0 on MAE's. A few tensors have a gradient that is
# round-off only, which LARS (SwAV) or Adam (iBOT) scale up to a full-size step, so there the
# runs differ by their round-off (measured <= 1.5e-5): the bias of the Linear before SwAV's head
# BatchNorm (BatchNorm subtracts the batch mean) and the running mean it feeds, and the key
# biases of iBOT's attention (softmax ignores a shift shared by all keys).
# The two-view methods need no such allowance.
NOISE = {
    "swav": ("projection_head.0.bias", "projection_head.1.running_mean"),
    "ibot": (".attn.qkv.bias",),
    # DINOv2 also clips by the norm of a whole module, summed in another order when sharded:
    # measured <= 2.4e-6 on a first block's MLP weight after 4 Adam steps
    "dinov2": (".attn.qkv.bias", "blocks.0.mlp.fc1.weight"),
}


@pytest.mark.parametrize("method", AGAINST_DDP)
def test_sharded_methods_match_ddp(sharded: dict[str, Any], method: str) -> None:
    fsdp, ddp = sharded[method]["fsdp"], sharded[method]["ddp"]
    close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), "loss")
    initial = AGAINST_DDP[method][0]().state_dict()
    moved = [k for k, v in ddp["state"].items() if not torch.equal(v, initial[k])]
    assert len(moved) > len(initial) // 2  # the comparison is not between untrained weights
    for k, v in ddp["state"].items():
        noisy = any(k.endswith(n) for n in NOISE.get(method, ()))
        close(fsdp["state"][k], v, k, atol=1e-4 if noisy else ATOL)
    # evaluation features come from the gathered eval backbone, after which every parameter
    # is this rank's shard again
    close(fsdp["features"], ddp["features"], "features", atol=1e-5)
    assert fsdp["after_eval"] == fsdp["layout"]["shapes"]


# ---------------------------------------------------------------------------- trainer presets


def preset_strategy(name: str) -> Any:
    """The strategy a trainer preset builds (parsed as LightningCLI parses it)."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    preset = yaml.safe_load((REPO / "configs" / "trainer" / f"{name}.yaml").read_text())
    config = parser.parse_object({"strategy": preset["trainer"]["strategy"]})
    return parser.instantiate(config).strategy


def test_streaming_ranks_read_disjoint_halves_alike_under_fsdp2_and_ddp(
    sharded: dict[str, Any],
) -> None:
    # each epoch the two ranks decode disjoint halves of the pack covering it once, reshuffled
    # per epoch; FSDP2 and DDP read the same samples and train to the same weights
    runs = {k: [r[f"streaming_{k}"] for r in sharded["ranks"]] for k in ("fsdp", "ddp")}
    for kind, (first, second) in runs.items():
        for epoch in range(EPOCHS):
            a, b = first["epochs"][epoch], second["epochs"][epoch]
            assert len(a) == len(b) == STREAM_IMAGES // 2, kind
            assert sorted(a + b) == list(range(STREAM_IMAGES)), kind
        assert first["epochs"][0] != first["epochs"][1], "each epoch is shuffled anew"
    fsdp, ddp = runs["fsdp"][0], runs["ddp"][0]
    assert [r["epochs"] for r in runs["fsdp"]] == [r["epochs"] for r in runs["ddp"]]
    # 12 LARS steps here against DINO's 4: summation-order noise grew to 2.4e-6 (one BatchNorm
    # weight); 2e-5 still sits far below what other samples or views would change
    for key, value in ddp["state"].items():
        close(fsdp["state"][key], value, key, atol=2e-5, rtol=1e-4)


def test_fsdp2_preset_composes_and_builds_its_strategy(capsys: pytest.CaptureFixture) -> None:
    from sslzoo.cli import main
    from sslzoo.sharding import FSDP2Strategy

    method = REPO / "configs" / "cifar10" / "dino.yaml"
    preset = REPO / "configs" / "trainer" / "fsdp2.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(method), "--config", str(preset),
              "--data.root", "/data/cifar10", "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "sslzoo.sharding.FSDP2Strategy" in printed and "sslzoo.methods.dino.DINO" in printed
    strategy = preset_strategy("fsdp2")
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.sharding_config.param_dtype == "bf16"
    assert strategy._tensor_parallel_size == 1


def test_fsdp_preset_reduces_and_keeps_buffers_in_fp32() -> None:
    from timm.models.vision_transformer import Block

    from sslzoo.backbones import Backbone
    from sslzoo.nn.heads import PrototypeHead

    strategy = preset_strategy("fsdp")
    mp = strategy.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,
    )
    wrapped = strategy.kwargs["auto_wrap_policy"]._module_classes
    assert {Block, Backbone, PrototypeHead} <= set(wrapped)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
