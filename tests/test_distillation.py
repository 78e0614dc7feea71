"""Distillation's step against lightly-train's ``distillationv2`` written out here (the teacher's
last blocks run by hand), the frozen teacher (no gradient, evaluation mode, loaded from a
released file), and the mixup of the batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sslzoo.methods import Distillation
from tests.conftest import TINY_RESNET
from tests.test_pretrained import dinov2_state, features, timm_vit

TEACHER = {"img_size": 28, "depth": 3, "embed_dim": 32, "num_heads": 2}


def tiny(**kwargs) -> Distillation:
    torch.manual_seed(0)
    return Distillation(
        **TINY_RESNET, teacher="vit_small_patch14_dinov2", teacher_kwargs=TEACHER, **kwargs
    )


def reference_target(vit: torch.nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """DINOv2's ``get_intermediate_layers(x, n, norm=True)``: the outputs of the last ``n``
    blocks, each through the final norm, the class token dropped, on the patch grid, then
    concatenated along the channels (lightly-train's ``_forward_teacher``)."""
    tokens = vit._pos_embed(vit.patch_embed(x))
    outputs = []
    for block in vit.blocks:
        tokens = block(tokens)
        outputs.append(vit.norm(tokens)[:, 1:])
    side = x.shape[-1] // 14
    maps = [t.reshape(len(x), side, side, -1).permute(0, 3, 1, 2) for t in outputs[-n:]]
    return torch.cat(maps, dim=1)


def test_step_is_the_mse_of_the_projected_resized_student_to_the_teacher() -> None:
    model = tiny(mixup=False)
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    out = model.training_step(([x], torch.zeros(4, dtype=torch.long)), 0)
    with torch.no_grad():
        target = reference_target(model.teacher.model, x, n=2)  # (4, 64, 2, 2)
        fmap = model.backbone.model.forward_features(x)  # (4, 128, 7, 7)
        w, b = model.projection.weight, model.projection.bias
        student = torch.einsum("bchw,dc->bdhw", fmap, w) + b[:, None, None]
        student = F.interpolate(student, size=(2, 2), mode="bilinear", align_corners=False)
        expected = ((student - target) ** 2).mean()
    assert target.shape == (4, 64, 2, 2)
    torch.testing.assert_close(out["loss"].detach(), expected)
    torch.testing.assert_close(out["features"], fmap.mean(dim=(2, 3)))
    # the target is a plain tensor: the loss backpropagates to the student, not the teacher
    out["loss"].backward()
    assert model.projection.weight.grad is not None and model.backbone.model.conv1.weight.grad.any()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not model.train().teacher.training and model.backbone.training


def test_teacher_is_loaded_from_released_weights_at_fit_start(tmp_path: Path) -> None:
    source = timm_vit("vit_small_patch14_dinov2", 28, depth=3)
    path = tmp_path / "dinov2_hub.pth"
    torch.save(dinov2_state(source), path)
    model = tiny(teacher_weights=str(path))
    model.load_init_backbone()  # what setup("fit") calls
    torch.testing.assert_close(features(model.teacher, 28), features(source, 28))
    # the teacher is saved with the run: a resumed run or an export needs no file
    assert any(k.startswith("teacher.model.blocks.2.") for k in model.state_dict())


def test_mixup_is_a_convex_combination_with_a_permutation_of_the_batch() -> None:
    model = tiny()
    x = torch.randn(6, 3, 8, 8)
    torch.manual_seed(5)
    mixed = model.mix(x)
    torch.manual_seed(5)
    weight, perm = torch.rand(()), torch.randperm(6)
    torch.testing.assert_close(mixed, weight * x + (1 - weight) * x[perm])
    assert sorted(perm.tolist()) == list(range(6)) and 0 < weight < 1
