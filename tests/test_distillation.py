"""Distillation's step against lightly-train's ``distillationv2`` written out here (the teacher's
last blocks run by hand), the frozen teacher (no gradient, evaluation mode, loaded from a
released file), the mixup of the batch, and the teacher's targets cached across epochs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslzoo.methods import Distillation
from sslzoo.nn.input_cache import InputCache
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


def test_input_cache_computes_each_distinct_input_once_and_returns_its_output() -> None:
    calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.flatten(1).sum(1, keepdim=True) * torch.tensor([1.0, -1.0])

    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 8, 8, generator=g)
    cache = InputCache()
    torch.testing.assert_close(cache(fn, images[:4]), fn(images[:4]))
    calls.clear()
    # seen images in other positions and batch sizes hit; a repeat within a batch runs once
    batch = torch.stack([images[5], images[2], images[4], images[5], images[0]])
    out = cache(fn, batch)
    assert calls == [2] and (cache.hits, cache.misses) == (2, 7)  # 3 new, 2 distinct
    torch.testing.assert_close(out, fn(batch))
    # one pixel changed by one grey level is another image
    changed = images[:1].clone()
    changed[0, 1, 3, 3] += 1 / 255
    assert cache.keys(changed) != cache.keys(images[:1]) and len(cache) == 6


def test_cached_teacher_runs_in_the_first_epoch_only_and_trains_the_same() -> None:
    # fixed inputs, no mixup: with the cache the teacher sees each image once in 3 epochs, and
    # the run (losses, student) equals the uncached one
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers import quiet_trainer

    class Views(TensorDataset):
        def __getitem__(self, i: int) -> tuple[list[torch.Tensor], torch.Tensor]:
            x, y = super().__getitem__(i)
            return [x], y

    images = torch.randn(12, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    data = Views(images, torch.zeros(12, dtype=torch.long))
    runs = {}
    for cached in (False, True):
        model = tiny(mixup=False, cache_teacher=cached, sync_batchnorm=False)
        seen: list[int] = []
        compute = model.teacher_target
        model.teacher_target = lambda x, f=compute, s=seen: s.append(len(x)) or f(x)
        losses: list[float] = []
        record = L.Callback()
        record.on_train_batch_end = lambda t, m, out, *a, ls=losses: ls.append(float(out["loss"]))
        quiet_trainer(max_epochs=3, callbacks=[record]).fit(model, DataLoader(data, batch_size=4))
        runs[cached] = (sum(seen), losses, model.backbone.state_dict())
    assert runs[False][0] == 36 and runs[True][0] == 12
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5)
    for key, value in runs[False][2].items():
        torch.testing.assert_close(runs[True][2][key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mixup=False"):
        tiny(cache_teacher=True)


def test_fixed_view_is_the_resized_centre_crop() -> None:
    from PIL import Image
    from torchvision.transforms import functional as TF

    from sslzoo.errors import ConfigError
    from sslzoo.methods.distillation import VIEWS

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    views = VIEWS.replace(fixed=True).pil(24, mean, std)
    crop = TF.center_crop(TF.resize(image, 24), 24)
    expected = TF.normalize(TF.to_tensor(crop), mean, std)
    for _ in range(2):
        (view,) = views(image)
        torch.testing.assert_close(view, expected)
    with pytest.raises(ConfigError, match="device_augment false"):
        VIEWS.replace(fixed=True).device(24, mean, std)
