"""DINO: the loss and centre against their definitions, the head against the official layout
(and lightly's), per-epoch schedules, last-layer freezing, per-parameter clipping, the teacher's
inputs, and a few optimisation steps on a fixed batch."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.models.modules.heads import DINOProjectionHead
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from sslzoo.augment.recipes import default_local_crop_size
from sslzoo.losses.distillation import SelfDistillationLoss
from sslzoo.methods.base import embedding_std
from sslzoo.methods.dino import DINO, OPTIM, VIEWS
from sslzoo.nn.heads import PrototypeHead
from sslzoo.nn.vit import vit_backbone_kwargs
from sslzoo.optim.clipping import clip_gradients_per_parameter
from tests.helpers import digits, quiet_trainer

TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2),
)
SMALL_HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def tiny_dino(
    views: dict[str, Any] | None = None, optim: dict[str, Any] | None = None, **kwargs: Any
) -> DINO:
    """A tiny ViT DINO with two local crops; ``views`` and ``optim`` change the recipes."""
    return DINO(
        **{**TINY_VIT, **SMALL_HEAD, **kwargs},
        views=VIEWS.replace(**{"local_crops_number": 2, **(views or {})}),
        optim=OPTIM.replace(**(optim or {})),
    )


def fake_views(batch: int = 4, size: int = 16, local: int = 8, n_local: int = 2):
    torch.manual_seed(0)
    views = [torch.randn(batch, 3, size, size) for _ in range(2)]
    views += [torch.randn(batch, 3, local, local) for _ in range(n_local)]
    return views, torch.arange(batch)


# ------------------------------------------------------------------------------------- loss


def reference_dino_loss(student, teacher, center, tps, tpt) -> float:
    """main_dino.py DINOLoss written out per pair and per sample with explicit softmaxes."""
    total, terms = 0.0, 0
    for iq in range(len(teacher)):
        for v in range(len(student)):
            if v == iq:
                continue
            pair = 0.0
            for i in range(len(student[v])):
                t = [math.exp((float(teacher[iq][i, k]) - float(center[0, k])) / tpt)
                     for k in range(teacher[iq].shape[1])]  # fmt: skip
                q = [x / sum(t) for x in t]
                s = [math.exp(float(student[v][i, k]) / tps) for k in range(student[v].shape[1])]
                log_p = [math.log(x / sum(s)) for x in s]
                pair += -sum(qk * lk for qk, lk in zip(q, log_p, strict=True))
            total += pair / len(student[v])
            terms += 1
    return total / terms


def test_loss_matches_reference_over_view_pairs() -> None:
    torch.manual_seed(0)
    student = [torch.randn(3, 5) for _ in range(4)]  # 2 global + 2 local views
    teacher = [torch.randn(3, 5) for _ in range(2)]
    loss_fn = SelfDistillationLoss(5, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, 5) * 0.1)
    center = loss_fn.center.clone()
    for tpt in (0.04, 0.07):
        loss_fn.center.copy_(center)
        expected = reference_dino_loss(student, teacher, center, 0.1, tpt)
        assert float(loss_fn(student, teacher, tpt)) == pytest.approx(expected, rel=1e-5)


def test_loss_sends_no_gradient_to_the_teacher() -> None:
    student = [torch.randn(3, 5, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    SelfDistillationLoss(5)(student, teacher, 0.04).backward()
    assert all(s.grad is not None for s in student)
    assert all(t.grad is None for t in teacher)


def test_center_update_follows_its_definition() -> None:
    torch.manual_seed(1)
    loss_fn = SelfDistillationLoss(6, center_momentum=0.9)
    c0 = torch.randn(1, 6)
    loss_fn.center.copy_(c0)
    teacher = [torch.randn(4, 6), torch.randn(4, 6)]
    loss_fn([torch.randn(4, 6) for _ in range(3)], teacher, 0.04)
    batch_center = torch.cat(teacher).sum(0, keepdim=True) / 8
    assert torch.allclose(loss_fn.center, 0.9 * c0 + 0.1 * batch_center, atol=1e-6)


def test_center_is_a_checkpointed_buffer() -> None:
    model = tiny_dino()
    assert "criterion.center" in model.state_dict()
    assert "criterion.center" not in dict(model.named_parameters())


def test_teacher_temperature_follows_the_official_per_epoch_schedule() -> None:
    model = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    for epoch in (0, 1, 10, 29, 30, 99):
        assert model.teacher_temperature(epoch) == pytest.approx(official[epoch])
    constant = tiny_dino(teacher_temp=0.04, warmup_teacher_temp_epochs=0)
    assert constant.teacher_temperature(0) == constant.teacher_temperature(50) == 0.04


# ------------------------------------------------------------------------------------- head


def test_head_layout_init_and_frozen_weight_norm() -> None:
    torch.manual_seed(0)
    head = PrototypeHead(384, 4096, use_bn=False, norm_last_layer=True)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (384, 2048),
        (2048, 2048),
        (2048, 256),
    ]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert all(m.bias is not None and float(m.bias.detach().abs().max()) == 0 for m in linears)
    assert float(linears[1].weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    g = head.last_layer.parametrizations.weight.original0
    assert torch.all(g == 1) and not g.requires_grad
    assert head.last_layer.bias is None and head.last_layer.weight.shape == (4096, 256)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(4096), atol=1e-5)
    x = torch.randn(5, 384)
    assert head(x).shape == (5, 4096)
    assert PrototypeHead(
        8, 16, norm_last_layer=False
    ).last_layer.parametrizations.weight.original0.requires_grad  # noqa: E501
    bn_head = PrototypeHead(8, 16, use_bn=True, hidden_dim=12, bottleneck_dim=4)
    bn_linears = [m for m in bn_head.mlp if isinstance(m, nn.Linear)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn_head.mlp) == 2
    assert all(m.bias is not None for m in bn_linears)  # official keeps biases before BN


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_lightly_head_computes_the_same_function_but_is_not_used() -> None:
    """lightly's DINOProjectionHead (without BN) computes the same function as ours given the
    same weights. It is not used because (1) with BN it drops the hidden Linear biases, which
    the official head keeps, and (2) it uses the deprecated ``nn.utils.weight_norm``, whose
    modules cannot be deep-copied into an EMA teacher."""
    torch.manual_seed(0)
    ours = PrototypeHead(8, 16, hidden_dim=12, bottleneck_dim=4)
    theirs = DINOProjectionHead(8, 12, 4, 16, batch_norm=False)
    with torch.no_grad():
        for a, b in zip(
            [m for m in ours.mlp if isinstance(m, nn.Linear)],
            [m for m in theirs.layers if isinstance(m, nn.Linear)],
            strict=True,
        ):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        theirs.last_layer.weight_v.copy_(ours.last_layer.parametrizations.weight.original1)
        theirs.last_layer.weight_g.copy_(ours.last_layer.parametrizations.weight.original0)
    x = torch.randn(5, 8)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    with_bn = DINOProjectionHead(8, 12, 4, 16, batch_norm=True)
    assert with_bn.layers[0].bias is None
    with pytest.raises(RuntimeError):
        copy.deepcopy(theirs)
    copy.deepcopy(ours)


# ------------------------------------------------------------------------------ the teacher


def test_teacher_starts_as_student_without_drop_path_and_sees_only_global_crops() -> None:
    model = tiny_dino()
    assert model.eval_backbone is model.teacher_backbone
    assert model.ema_base_momentum == 0.996
    for student, teacher in model.teacher_pairs():
        for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
            assert torch.equal(ps, pt) and not pt.requires_grad
    rates = lambda m: [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.model.blocks]  # noqa: E731
    assert rates(model.backbone) == pytest.approx([0.0, 0.1])  # timm's linear decay rule
    assert rates(model.teacher_backbone) == [0.0, 0.0]

    seen = {"teacher": [], "student": []}
    model.teacher_backbone.register_forward_pre_hook(
        lambda m, a: seen["teacher"].append(tuple(a[0].shape))
    )
    model.backbone.register_forward_pre_hook(lambda m, a: seen["student"].append(tuple(a[0].shape)))
    views, labels = fake_views(batch=4, n_local=3)
    model.training_step((views, labels), 0)
    assert seen["teacher"] == [(8, 3, 16, 16)]  # the two global crops, in one forward
    assert seen["student"] == [(8, 3, 16, 16), (12, 3, 8, 8)]  # every crop, grouped by size


def test_vit_backbone_kwargs_only_touch_timm_vits() -> None:
    assert vit_backbone_kwargs("resnet18", None, 0.1) == {}
    assert vit_backbone_kwargs("timm/resnet18", {"layers": [1]}, 0.1) == {"layers": [1]}
    assert vit_backbone_kwargs("vit_small_patch16_224", {"img_size": 32}, 0.1) == {
        "img_size": 32,
        "drop_path_rate": 0.1,
        "dynamic_img_size": True,
    }
    assert (
        vit_backbone_kwargs("vit_small_patch16_224", {"drop_path_rate": 0.0}, 0.1)["drop_path_rate"]
        == 0.0
    )


def test_local_crops_get_dinos_position_embedding_interpolation() -> None:
    """main_dino's ``interpolate_pos_encoding``, written out: the 4x4 grid of patch position
    embeddings resized by bicubic interpolation with scale (n + 0.1) / 4, no antialiasing
    (timm's own resampling antialiases, which smooths a shrunk grid); the [CLS] embedding kept.
    Global crops use the embeddings as they are. Student and teacher both."""
    model = tiny_dino()
    for vit in (model.backbone.model, model.teacher_backbone.model):
        vit.eval()
        with torch.no_grad():
            vit.pos_embed.normal_()
        seen: list[torch.Tensor] = []
        vit.blocks.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
        for size in (16, 8):
            image = torch.randn(1, 3, size, size)
            vit(image)
            n = size // 4
            patches = vit.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
            if n != 4:
                patches = F.interpolate(patches, scale_factor=((n + 0.1) / 4,) * 2, mode="bicubic")
            expected_pos = torch.cat(
                [vit.pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, n * n, 32)], dim=1
            )
            tokens = vit.patch_embed(image).reshape(1, n * n, 32)
            expected = torch.cat([vit.cls_token, tokens], dim=1) + expected_pos
            torch.testing.assert_close(seen[-1], expected)
        timm_like = F.interpolate(
            vit.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2),
            size=(2, 2), mode="bicubic", antialias=True,
        )  # fmt: skip
        assert not torch.allclose(patches, timm_like, atol=1e-3)


def test_cls_token_starts_from_dinos_truncated_normal() -> None:
    """DINO and iBOT: ``trunc_normal_(cls_token, std=0.02)``; timm draws N(0, 1e-6^2)."""
    torch.manual_seed(0)
    model = tiny_dino(backbone_kwargs=dict(TINY_VIT["backbone_kwargs"], embed_dim=512))
    cls = model.backbone.model.cls_token
    assert float(cls.detach().std()) == pytest.approx(0.02, rel=0.15)  # (truncated at +-2, far out)
    assert torch.equal(model.teacher_backbone.model.cls_token, cls)


# ------------------------------------------------------------------------------------ views


def test_multicrop_views_follow_the_recipe() -> None:
    model = tiny_dino(views=dict(local_crops_number=3))
    transform = model.views.pil(16, [0.5] * 3, [0.25] * 3)
    views = transform(Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)))
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    settings = []
    for view in transform.transforms:
        ops = view.transform.transforms
        crop = ops[0]
        blur = next(o for o in ops if type(o).__name__ == "GaussianBlur")
        solar = next(o for o in ops if type(o).__name__ == "RandomSolarization")
        jitter = next(o for o in ops if type(o).__name__ == "RandomApply")
        cj = jitter.transforms[0]
        assert jitter.p == 0.8 and cj.brightness == pytest.approx((0.6, 1.4))
        assert cj.saturation == pytest.approx((0.8, 1.2)) and cj.hue == pytest.approx((-0.1, 0.1))
        assert crop.interpolation.value == "bicubic"
        settings.append((tuple(crop.scale), blur.prob, solar.prob))
    assert (
        settings == [((0.4, 1.0), 1.0, 0.0), ((0.4, 1.0), 0.1, 0.2)] + [((0.05, 0.4), 0.5, 0.0)] * 3
    )
    assert default_local_crop_size(224, 16) == 96
    assert default_local_crop_size(32, 4) == 12


def test_fixed_size_vit_with_local_crops_is_refused() -> None:
    kwargs = dict(TINY_VIT["backbone_kwargs"], dynamic_img_size=False)
    # the views are built from the recipe by the datamodule, so the method refuses them
    # when it is built: a fixed-size ViT's global crops are its img_size
    with pytest.raises(ValueError, match="dynamic_img_size"):
        tiny_dino(backbone_kwargs=kwargs)
    tiny_dino(backbone_kwargs=kwargs, views=dict(local_crops_number=0))


# ------------------------------------------------------------------------------- gradients


def test_clipping_is_per_parameter_not_global() -> None:
    torch.manual_seed(0)
    model = tiny_dino(clip_grad=3.0)
    views, labels = fake_views()
    loss = model.training_step((views, labels), 0)["loss"]
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    median = torch.stack([p.grad.norm() for p in params]).median()
    for p in params:  # put the clip threshold in the middle of the gradient norms
        p.grad.mul_(3.0 / median)
    before = [p.grad.clone() for p in params]
    optimizer = torch.optim.AdamW(params)
    model.configure_gradient_clipping(optimizer)
    norms_before = torch.stack([g.norm() for g in before])
    assert int((norms_before > 3.0).sum()) >= 2 and int((norms_before < 3.0).sum()) >= 1
    for p, g in zip(params, before, strict=True):
        expected = g * min(1.0, 3.0 / (float(g.norm()) + 1e-6))  # official clip_gradients
        assert torch.allclose(p.grad, expected, rtol=1e-5, atol=1e-7)
        assert float(p.grad.norm()) <= 3.0 + 1e-4
    global_norm = torch.stack([p.grad.norm() for p in params]).norm()
    assert float(global_norm) > 3.0  # a global clip would have brought this to 3


def test_clip_function_leaves_small_gradients_alone() -> None:
    small, large = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    small.grad, large.grad = torch.tensor([0.3, 0.4, 0.0]), torch.tensor([30.0, 40.0, 0.0])
    clip_gradients_per_parameter([small, large], 1.0)
    assert torch.equal(small.grad, torch.tensor([0.3, 0.4, 0.0]))
    assert float(large.grad.norm()) == pytest.approx(1.0, abs=1e-5)


class Recorder(L.Callback):
    """Per optimizer step: weight decay of each group, and the last layer's gradients and
    weights right after the step."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        groups = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
        self.rows.append({"step": trainer.global_step, "epoch": pl_module.epoch, **groups})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        v = pl_module.head.last_layer.parametrizations.weight.original1
        self.rows[-1]["last_grad"] = v.grad is not None
        self.rows[-1]["last_weight"] = v.detach().clone()


@pytest.fixture(scope="module")
def short_run() -> tuple[DINO, list[dict], int]:
    """Two epochs of three steps on the digits."""
    torch.manual_seed(0)
    model = tiny_dino(
        freeze_last_layer=1, optim=dict(weight_decay=0.04, weight_decay_end=0.4, warmup_epochs=0)
    )
    data = digits(batch_size=16, views=model.views)
    recorder = Recorder()
    trainer = quiet_trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder]
    )
    initial = model.head.last_layer.parametrizations.weight.original1.detach().clone()
    trainer.fit(model, datamodule=data)
    return model, recorder.rows, initial


def test_weight_decay_follows_a_cosine_on_the_decayed_group_only(short_run) -> None:
    _, rows, _ = short_run
    assert [r["step"] for r in rows] == list(range(6))
    for r in rows:
        expected = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * r["step"] / 6))
        assert r["decay"] == pytest.approx(expected)
        assert r["no_decay"] == 0.0


def test_last_layer_gets_no_gradient_in_the_first_epoch(short_run) -> None:
    _, rows, initial = short_run
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [r["last_grad"] for r in rows] == [False] * 3 + [True] * 3
    assert all(torch.equal(r["last_weight"], initial) for r in rows[:3])
    assert not torch.equal(rows[-1]["last_weight"], initial)


# ------------------------------------------------------------------------------ optimising


class FixedBatch(Dataset):
    """The same few images with the same augmented views, every step."""

    def __init__(self, items: list, steps: int) -> None:
        self.items, self.steps = items, steps

    def __len__(self) -> int:
        return len(self.items) * self.steps

    def __getitem__(self, i: int):
        return self.items[i % len(self.items)]


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.loss: list[float] = []
        self.std: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss.append(float(outputs["loss"]))
        self.std.append(float(trainer.callback_metrics["train/embedding_std"]))


def test_a_few_steps_on_a_fixed_batch_lower_the_loss() -> None:
    """The centre starts at the teacher's mean on the batch, as in a run past its first steps,
    so the targets are the per-image residuals rather than one sharp shared peak."""
    torch.manual_seed(0)
    model = tiny_dino(
        freeze_last_layer=0,
        optim=dict(lr=1e-3, lr_scaling="none", warmup_epochs=0, weight_decay_end=None),
    )
    data = digits(batch_size=16)
    transform = model.views.pil(16, data.mean, data.std)
    images, labels = data._train
    items = [(transform(Image.fromarray(images[i])), int(labels[i])) for i in range(16)]
    views, _ = default_collate(items)
    with torch.no_grad():
        teacher_out = model.teacher_head(model.teacher_backbone(torch.cat(views[:2])))
    model.criterion.center.copy_(teacher_out.mean(0, keepdim=True))
    log = LossLog()
    steps = 8
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[log])
    trainer.fit(model, train_dataloaders=DataLoader(FixedBatch(items, steps), batch_size=16))
    assert len(log.loss) == steps
    assert np.mean(log.loss[-3:]) < log.loss[0] - 0.5
    assert min(log.std) > 1e-4  # a constant output reads 0
    assert float(embedding_std(torch.ones(4, 8))) == 0.0
