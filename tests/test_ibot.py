"""iBOT: the masked-patch loss against its formula, separate centres, the mask generator's
ratios, masks reaching the student only, the head variants, and a few optimisation steps."""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightly.loss import IBOTPatchLoss
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from sslzoo.augment.masks import MaskGenerator
from sslzoo.losses.distillation import (
    MaskedSelfDistillationLoss,
    cross_view_loss,
    masked_patch_loss,
    teacher_probs,
)
from sslzoo.methods.ibot import IBOT, OPTIM, VIEWS
from sslzoo.nn.vit import embed_patches, vit_tokens
from tests.helpers import digits, quiet_trainer

TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2),
)
SMALL_HEAD = dict(out_dim=64, patch_out_dim=64, hidden_dim=32, bottleneck_dim=16)


def tiny_ibot(
    views: dict[str, Any] | None = None, optim: dict[str, Any] | None = None, **kwargs: Any
) -> IBOT:
    """A tiny ViT iBOT with two local crops; ``views`` and ``optim`` change the recipes."""
    return IBOT(
        **{**TINY_VIT, **SMALL_HEAD, **kwargs},
        views=VIEWS.replace(**{"local_crops_number": 2, **(views or {})}),
        optim=OPTIM.replace(**(optim or {})),
    )


def fake_batch(batch: int = 4, masked: bool = True):
    """Two 16 px global crops (4x4 patches), two 8 px local crops, and masks."""
    torch.manual_seed(0)
    views = [torch.randn(batch, 3, 16, 16) for _ in range(2)]
    views += [torch.randn(batch, 3, 8, 8) for _ in range(2)]
    masks = [torch.rand(batch, 4, 4) < (0.4 if masked else 0.0) for _ in range(2)]
    return {"views": views, "masks": masks}, torch.arange(batch)


# ------------------------------------------------------------------------------------- loss


def reference_patch_loss(student, teacher, mask, center, tps, tpt) -> float:
    """main_ibot.py loss2 written out: per image, the mean over its masked tokens of the
    cross-entropy; images without masked tokens count 0; then the mean over images."""
    total = 0.0
    for b in range(student.shape[0]):
        image, count = 0.0, 0
        for n in range(student.shape[1]):
            if not mask[b].flatten()[n]:
                continue
            t = [math.exp((float(teacher[b, n, k]) - float(center[0, 0, k])) / tpt)
                 for k in range(teacher.shape[2])]  # fmt: skip
            s = [math.exp(float(student[b, n, k]) / tps) for k in range(student.shape[2])]
            pairs = zip(t, s, strict=True)
            image += -sum((tk / sum(t)) * math.log(sk / sum(s)) for tk, sk in pairs)
            count += 1
        total += image / max(count, 1)
    return total / student.shape[0]


def test_patch_loss_matches_reference_and_ignores_unmasked_tokens() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    center = torch.randn(1, 1, 6) * 0.1
    loss = masked_patch_loss(student, teacher_probs(teacher, center, 0.07), mask, 0.1)
    assert float(loss) == pytest.approx(
        reference_patch_loss(student, teacher, mask, center, 0.1, 0.07), rel=1e-5
    )
    changed = teacher.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6) * 5  # unmasked positions only
    same = masked_patch_loss(student, teacher_probs(changed, center, 0.07), mask, 0.1)
    assert float(same) == pytest.approx(float(loss), rel=1e-6)
    changed[mask] += 1.0 + torch.randn(int(mask.sum()), 6)
    other = masked_patch_loss(student, teacher_probs(changed, center, 0.07), mask, 0.1)
    assert abs(float(other) - float(loss)) > 1e-3


def test_ibot_loss_combines_cls_and_patch_terms_and_updates_both_centres() -> None:
    torch.manual_seed(0)
    fn = MaskedSelfDistillationLoss(5, 6, student_temp=0.1, center_momentum=0.9,
                                    center_momentum2=0.8, lambda1=0.5, lambda2=2.0)  # fmt: skip
    c1, c2 = torch.randn(1, 5) * 0.1, torch.randn(1, 1, 6) * 0.1
    fn.center.copy_(c1)
    fn.center2.copy_(c2)
    s_cls = [torch.randn(3, 5) for _ in range(4)]
    t_cls = [torch.randn(3, 5) for _ in range(2)]
    s_patch = [torch.randn(3, 4, 6) for _ in range(2)]
    t_patch = [torch.randn(3, 4, 6) for _ in range(2)]
    masks = [torch.rand(3, 2, 2) < 0.5 for _ in range(2)]
    loss_cls, loss_patch = fn(s_cls, t_cls, s_patch, t_patch, masks, 0.04, 0.07)
    expected_cls = cross_view_loss(s_cls, [teacher_probs(t, c1, 0.04) for t in t_cls], 0.1)
    same_view = [
        reference_patch_loss(s_patch[q], t_patch[q], masks[q], c2, 0.1, 0.07) for q in (0, 1)
    ]
    expected_patch = sum(same_view) / 2
    assert float(loss_cls) == pytest.approx(0.5 * float(expected_cls), rel=1e-5)
    assert float(loss_patch) == pytest.approx(2.0 * expected_patch, rel=1e-5)
    cls_mean = torch.cat(t_cls).mean(0, keepdim=True)
    patch_mean = torch.cat(t_patch).mean(1).mean(0)[None, None]  # all patches, per image
    assert torch.allclose(fn.center, 0.9 * c1 + 0.1 * cls_mean, atol=1e-6)
    assert torch.allclose(fn.center2, 0.8 * c2 + 0.2 * patch_mean, atol=1e-6)


def test_lightly_patch_loss_matches_the_value_but_not_the_centre() -> None:
    """lightly's IBOTPatchLoss (DINOv2's) gives the same loss on the masked tokens, but its
    centre is the mean of the masked teacher tokens, where iBOT's ``center2`` is the mean over
    every patch token of each image: so it is not used."""
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    mask = torch.rand(3, 2, 2) < 0.5
    mask[0, 0, 0] = True
    flat = mask.flatten(1)
    theirs = IBOTPatchLoss(6, teacher_temp=0.07, student_temp=0.1, center_momentum=0.9)
    their_loss = theirs(teacher[flat], student[flat], mask)
    ours = MaskedSelfDistillationLoss(6, 6)
    our_loss = masked_patch_loss(student, teacher_probs(teacher, ours.center2, 0.07), flat, 0.1)
    assert float(their_loss) == pytest.approx(float(our_loss), rel=1e-5)
    ours([torch.randn(3, 6)] * 2, [torch.randn(3, 6)] * 2, [student] * 2, [teacher] * 2,
         [mask] * 2, 0.04, 0.07)  # fmt: skip
    assert not torch.allclose(theirs.center.value.flatten(), ours.center2.flatten())


def test_centres_are_separate_checkpointed_buffers() -> None:
    model = tiny_ibot(out_dim=64, patch_out_dim=64)
    state = model.state_dict()
    assert state["criterion.center"].shape == (1, 64)
    assert state["criterion.center2"].shape == (1, 1, 64)


def test_patch_temperature_warmup_starts_at_pred_start_epoch() -> None:
    model = tiny_ibot(
        warmup_teacher_patch_temp=0.04,
        teacher_patch_temp=0.07,
        warmup_teacher_temp_epochs=30,
        pred_start_epoch=10,
    )
    official = np.concatenate((np.ones(10) * 0.04, np.linspace(0.04, 0.07, 30), np.ones(60) * 0.07))
    for epoch in (0, 9, 10, 11, 25, 39, 40, 99):
        assert model.teacher_patch_temperature(epoch) == pytest.approx(official[epoch])
    assert model.teacher_temperature(0) == pytest.approx(0.04)


# ---------------------------------------------------------------------------------- masking


def test_block_masks_have_the_requested_ratio_range() -> None:
    random.seed(0)
    for grid in (14, 8):
        gen = MaskGenerator(0.3, 0.2, "block", (0.3, 1 / 0.3))
        ratios = np.array([float(gen(grid, grid).float().mean()) for _ in range(300)])
        assert ratios.max() <= 0.5 + 1e-9  # never past the drawn target
        assert 0.2 < ratios.mean() < 0.35
        assert (ratios >= 0.05).mean() > 0.95
    square = MaskGenerator(0.3, 0.0, "block")(14, 14)
    assert square.shape == (14, 14) and square.dtype == torch.bool


def test_random_masks_mask_exactly_the_drawn_number() -> None:
    random.seed(1)
    np.random.seed(1)
    gen = MaskGenerator(0.3, 0.2, "rand")
    counts = np.array([int(gen(8, 8).sum()) for _ in range(200)])
    assert counts.min() >= int(0.1 * 64) and counts.max() <= int(0.5 * 64)
    assert int(MaskGenerator(0.25, 0.0, "rand")(8, 8).sum()) == 16


def test_recipe_ratios_leave_about_half_of_the_images_unmasked() -> None:
    random.seed(2)
    gen = MaskGenerator((0.0, 0.3), (0.0, 0.2), "block")
    masks = [gen(14, 14) for _ in range(600)]
    unmasked = np.mean([not bool(m.any()) for m in masks])
    assert 0.44 < unmasked < 0.56
    masked = [float(m.float().mean()) for m in masks if m.any()]
    assert 0.2 < np.mean(masked) < 0.35


def test_invalid_ratio_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MaskGenerator(0.1, 0.2)
    with pytest.raises(ValueError):
        MaskGenerator((0.0, 0.3), (0.0, 0.1, 0.2))


def test_pil_views_add_one_mask_per_global_crop() -> None:
    model = tiny_ibot(views=dict(pred_ratio=(0.3,), pred_ratio_var=(0.0,)))
    out = model.views.pil(16, [0.5] * 3, [0.25] * 3)(
        Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8))
    )
    assert [tuple(v.shape) for v in out["views"]] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2
    assert [tuple(m.shape) for m in out["masks"]] == [(4, 4)] * 2
    assert all(m.dtype == torch.bool and m.any() for m in out["masks"])


# ------------------------------------------------------------------ the student and teacher


def test_mask_token_replaces_masked_patch_embeddings() -> None:
    model = tiny_ibot()
    vit = model.backbone.model
    x = torch.randn(2, 3, 16, 16)
    mask = torch.rand(2, 4, 4) < 0.5
    token = torch.randn(1, 32)
    plain = embed_patches(vit, x).reshape(2, 4, 4, 32)
    masked = embed_patches(vit, x, mask, token).reshape(2, 4, 4, 32)
    assert torch.allclose(masked[mask], token.expand(int(mask.sum()), 32))
    assert torch.equal(masked[~mask], plain[~mask])
    vit.eval()
    assert torch.allclose(vit_tokens(vit, x)[:, 0], model.backbone(x), atol=1e-5)


def test_only_the_student_sees_masks() -> None:
    model = tiny_ibot()
    with torch.no_grad():
        model.masked_embed.normal_()
    for module in (model.backbone, model.teacher_backbone):
        for m in module.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0  # deterministic student
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    model.teacher_head.mlp.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0]))
    model.head.mlp.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0]))
    model.teacher_backbone.model.patch_embed.register_forward_pre_hook(
        lambda m, a: seen.setdefault("teacher_images", []).append(a[0])
    )
    masked_batch, labels = fake_batch(masked=True)
    unmasked_batch, _ = fake_batch(masked=False)
    model.training_step((masked_batch, labels), 0)
    model.training_step((unmasked_batch, labels), 0)
    views = masked_batch["views"]
    assert len(seen["teacher_images"]) == 2  # one teacher forward per step: the global crops
    assert torch.equal(seen["teacher_images"][0], torch.cat(views[:2]))
    assert torch.equal(seen["teacher"][0], seen["teacher"][1])  # masks change nothing there
    assert not torch.allclose(seen["student"][0], seen["student"][2])  # the student's tokens
    assert seen["student"][1].shape == (8, 32)  # local crops: [CLS] features only


@pytest.mark.parametrize("mim", [True, False])
def test_every_trainable_parameter_gets_a_gradient(mim: bool) -> None:
    """What DDP without ``find_unused_parameters`` needs: with masked image modelling off
    there is no mask token (the official model builds none)."""
    model = tiny_ibot(use_masked_im_modeling=mim)
    model.log_dict = lambda d, **kw: None  # type: ignore[method-assign]
    model.training_step(fake_batch(masked=True), 0)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert ("masked_embed" in dict(model.named_parameters())) is mim


def test_pred_start_epoch_empties_the_masks_before_it() -> None:
    model = tiny_ibot(pred_start_epoch=5)
    metrics = {}
    model.log_dict = lambda d, **kw: metrics.update(d)  # type: ignore[method-assign]
    model.training_step(fake_batch(masked=True), 0)
    assert float(metrics["train/mask_ratio"]) == 0.0
    assert float(metrics["train/loss_patch"].detach()) == 0.0


def test_head_sharing_variants_and_teacher_pairs() -> None:
    default = tiny_ibot()  # shared_head False, shared_head_teacher True (official defaults)
    assert default.head.last_layer2 is not None and default.teacher_head.last_layer2 is None
    assert len(default.last_layers()) == 2
    for variant in (default, tiny_ibot(shared_head=True), tiny_ibot(shared_head_teacher=False)):
        assert variant.eval_backbone is variant.teacher_backbone
        for _, teacher in variant.teacher_pairs():
            assert not any(p.requires_grad for p in teacher.parameters())
    assert "masked_embed" in dict(default.named_parameters())
    assert not any("masked_embed" in n for n, _ in default.teacher_backbone.named_parameters())
    with pytest.raises(ValueError, match="patch_out_dim"):
        tiny_ibot(out_dim=64, patch_out_dim=32)
    tiny_ibot(out_dim=64, patch_out_dim=32, shared_head_teacher=False)
    with pytest.raises(ValueError, match="VisionTransformer"):
        IBOT(backbone="resnet18")


class OfficialLastLayers(nn.Module):
    """The last layers of the official ``iBOTHead`` (models/head.py): with ``shared_head``,
    ``last_layer2`` is ``last_layer`` itself, registered under both names."""

    def __init__(self, shared: bool, in_dim: int = 16, out_dim: int = 64) -> None:
        super().__init__()
        self.last_layer = nn.Linear(in_dim, out_dim, bias=False)
        self.last_layer2 = self.last_layer if shared else nn.Linear(in_dim, out_dim, bias=False)


@pytest.mark.parametrize("shared_head", [False, True])
@pytest.mark.parametrize("shared_head_teacher", [True, False])
def test_teacher_head_starts_and_follows_as_in_main_ibot(
    shared_head: bool, shared_head_teacher: bool
) -> None:
    """main_ibot.py builds the teacher with ``shared_head_teacher``, then
    ``teacher.load_state_dict(student.state_dict(), strict=False)``: each name is loaded in
    turn, so a sharing teacher's one last layer ends with the student's ``last_layer2``. Its
    EMA then updates the teacher parameters whose names the student's named_parameters()
    also lists."""
    model = tiny_ibot(shared_head=shared_head, shared_head_teacher=shared_head_teacher)
    student, teacher = OfficialLastLayers(shared_head), OfficialLastLayers(shared_head_teacher)
    with torch.no_grad():
        student.last_layer.weight.copy_(model.head.last_layer.weight)
        student.last_layer2.weight.copy_(model.head.patch_layer.weight)
    teacher.load_state_dict(student.state_dict(), strict=False)
    ours = model.teacher_head
    assert torch.equal(ours.last_layer.weight, teacher.last_layer.weight)
    assert torch.equal(ours.patch_layer.weight, teacher.last_layer2.weight)
    if shared_head_teacher and not shared_head:  # the official default: the patch layer wins
        assert not torch.equal(ours.last_layer.weight, model.head.last_layer.weight)
    for s, t in [(model.backbone, model.teacher_backbone), (model.head.mlp, ours.mlp)]:
        for ps, pt in zip(s.parameters(), t.parameters(), strict=True):
            assert torch.equal(ps, pt)

    common = {n for n, _ in student.named_parameters()} & {n for n, _ in teacher.named_parameters()}
    pairs = {(id(s), id(t)) for s, t in model.teacher_pairs()}
    for name in common:
        layer = name.split(".")[0]
        assert (id(getattr(model.head, layer)), id(getattr(ours, layer))) in pairs, name


# ------------------------------------------------------------------------------ optimising


class FixedBatch(Dataset):
    """The same few images with the same augmented views and masks, every step."""

    def __init__(self, items: list, steps: int) -> None:
        self.items, self.steps = items, steps

    def __len__(self) -> int:
        return len(self.items) * self.steps

    def __getitem__(self, i: int):
        return self.items[i % len(self.items)]


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.rows.append(
            {k: float(m[f"train/{k}"]) for k in ("loss", "loss_cls", "loss_patch", "embedding_std")}
        )


def test_a_few_steps_on_a_fixed_batch_lower_the_loss() -> None:
    """Both centres start at the teacher's means on the batch, as in a run past its first
    steps, so the targets are per-image and per-patch residuals."""
    torch.manual_seed(0)
    random.seed(0)
    model = tiny_ibot(
        freeze_last_layer=0,
        warmup_teacher_temp_epochs=0,
        views=dict(pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2)),
        optim=dict(lr=1e-3, lr_scaling="none", warmup_epochs=0, weight_decay_end=None),
    )
    data = digits(batch_size=16)
    transform = model.views.pil(16, data.mean, data.std)
    images, labels = data._train
    items = [(transform(Image.fromarray(images[i])), int(labels[i])) for i in range(16)]
    crops, _ = default_collate(items)
    with torch.no_grad():
        tokens = vit_tokens(model.teacher_backbone.model, torch.cat(crops["views"][:2]))
        cls, patch = model.teacher_head.forward_tokens(tokens)
    model.criterion.center.copy_(cls.mean(0, keepdim=True))
    model.criterion.center2.copy_(patch.mean(1).mean(0)[None, None])
    log = LossLog()
    steps = 8
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[log])
    trainer.fit(model, train_dataloaders=DataLoader(FixedBatch(items, steps), batch_size=16))
    first, last = log.rows[0], log.rows[-3:]
    assert len(log.rows) == steps
    assert np.mean([r["loss"] for r in last]) < first["loss"] - 0.5
    assert np.mean([r["loss_patch"] for r in last]) < first["loss_patch"]
    assert min(r["embedding_std"] for r in log.rows) > 1e-4  # a constant output reads 0
