"""DINOv2: KoLeo, Sinkhorn-Knopp and centred targets, the masked-token loss and the batch
masks against the official code written out here; LayerScale, registers and uniform drop path
against their definitions; the lr multiplier and weight decay of every parameter against
``get_params_groups_with_decay``; the step's loss against ``ssl_meta_arch.py``'s
composition; the schedules against ``CosineScheduler``. 2 ranks against 1 process, FSDP2 and
mid-epoch resume are in tests/test_ddp.py, tests/test_fsdp.py and
tests/test_resume_every_method.py; the CIFAR-10 case in tests/configs/real_data/dinov2.yaml."""

from __future__ import annotations

import math
import random
import threading
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.optim import param_groups_layer_decay

from sslzoo.augment.masks import MaskGenerator, stratified_masks
from sslzoo.losses.distillation import TeacherTargets, masked_tokens_loss
from sslzoo.losses.koleo import koleo_loss
from sslzoo.methods.dinov2 import OPTIM, VIEWS, DINOv2
from sslzoo.nn.vit import vit_tokens
from tests.conftest import REPO

TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=3, embed_dim=32, num_heads=2),
)
HEAD = dict(out_dim=16, hidden_dim=16, bottleneck_dim=8)


def tiny(**kwargs) -> DINOv2:
    torch.manual_seed(0)
    args = dict(**TINY_VIT, **HEAD, official_epoch_length=None,
                views=VIEWS.replace(local_crops_number=2, local_crop_size=8))  # fmt: skip
    return DINOv2(**{**args, **kwargs})


# ----------------------------------------------------------------- losses and targets


def test_koleo_is_minus_mean_log_nearest_neighbour_distance() -> None:
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z = x / x.norm(dim=1, keepdim=True)
    dist = (z[:, None] - z[None]).norm(dim=-1) + torch.eye(9) * 1e9
    expected = -torch.log(dist.min(dim=1).values + 1e-8).mean()
    loss = koleo_loss(x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert x.grad.abs().sum() > 0
    # spreading the points lowers it
    assert koleo_loss(torch.eye(5)) < koleo_loss(torch.eye(5) + 0.5)


def official_sinkhorn(out: torch.Tensor, temp: float, batch: float, iterations: int = 3):
    """``DINOLoss.sinkhorn_knopp_teacher`` with the all-reduces done by hand: ``out`` is every
    rank's rows, ``batch`` the global row count."""
    q = torch.exp(out.double() / temp).t()
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= q.shape[0]
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    return (q * batch).t()


def test_sinkhorn_knopp_targets_are_the_official_algorithm() -> None:
    out = torch.randn(10, 7, generator=torch.Generator().manual_seed(1))
    targets = TeacherTargets(7, "sinkhorn_knopp")(out, 0.07)
    expected = official_sinkhorn(out, 0.07, 10).float()
    torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(10))


def test_sinkhorn_knopp_sums_over_ranks_with_their_own_row_counts() -> None:
    """Two ranks (threads whose ``all_reduce`` adds both ranks' tensors) holding 3 and 7 rows,
    as masked patches are spread: together they give the targets of all 10 rows at once."""
    out = torch.randn(10, 7, generator=torch.Generator().manual_seed(1))
    shares, results, slots = [out[:3], out[3:]], {}, {}
    barrier = threading.Barrier(2)
    rank_of: dict[int, int] = {}

    def all_reduce(t: torch.Tensor, *args, **kwargs) -> None:
        rank = rank_of[threading.get_ident()]
        slots[rank] = t.clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        t.copy_(total)

    def run(rank: int) -> None:
        rank_of[threading.get_ident()] = rank
        results[rank] = TeacherTargets(7, "sinkhorn_knopp")(shares[rank], 0.07)

    with (
        mock.patch("torch.distributed.is_initialized", return_value=True),
        mock.patch("torch.distributed.get_world_size", return_value=2),
        mock.patch("torch.distributed.all_reduce", side_effect=all_reduce),
    ):  # fmt: skip
        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    expected = official_sinkhorn(out, 0.07, 10).float()
    torch.testing.assert_close(torch.cat([results[0], results[1]]), expected, rtol=1e-5,
                               atol=1e-7)  # fmt: skip


def test_centering_targets_use_the_centre_then_update_it() -> None:
    g = torch.Generator().manual_seed(2)
    first, second = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    targets = TeacherTargets(5, "centering", center_momentum=0.9)
    torch.testing.assert_close(targets(first, 0.07), F.softmax(first / 0.07, dim=-1))
    centre = 0.1 * first.mean(dim=0, keepdim=True)
    torch.testing.assert_close(targets.center, centre)
    torch.testing.assert_close(targets(second, 0.04), F.softmax((second - centre) / 0.04, -1))
    torch.testing.assert_close(targets.center, 0.9 * centre + 0.1 * second.mean(0, True))


def test_masked_tokens_loss_is_the_mean_over_images_of_the_mean_over_masked_tokens() -> None:
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(4, 6, generator=g) < 0.5
    masks[2] = False  # an unmasked image counts as 0
    student = torch.randn(4, 6, 5, generator=g)
    teacher = F.softmax(torch.randn(4, 6, 5, generator=g), dim=-1)
    ce = -(teacher * F.log_softmax(student / 0.1, dim=-1)).sum(-1)
    per_image = [ce[i][masks[i]].mean() if masks[i].any() else torch.tensor(0.0)
                 for i in range(4)]  # fmt: skip
    loss = masked_tokens_loss(student[masks], teacher[masks], masks, 0.1)
    torch.testing.assert_close(loss, torch.stack(per_image).mean())


def test_batch_masks_mask_half_the_crops_with_stratified_ratios() -> None:
    """``collate_data_and_cast`` with ``MaskingGenerator(min_num_patches=4,
    max_num_patches=0.5 N)``: int(n p) masked crops, the i-th with int(N U(p_i, p_i+1))
    patches (here every target is reached: a 16x16 grid has room)."""
    generator = MaskGenerator(min_block_patches=4, max_block_fraction=0.5)
    masks = stratified_masks(16, (16, 16), (0.1, 0.5), 0.5, generator, random.Random(0))
    counts = masks.sum(dim=1)
    assert masks.shape == (16, 256) and int((counts > 0).sum()) == 8
    bounds = np.linspace(0.1, 0.5, 9)
    for i, count in enumerate(sorted(counts[counts > 0].tolist())):
        assert int(256 * bounds[i]) <= count <= int(256 * bounds[i + 1])
    again = stratified_masks(16, (16, 16), (0.1, 0.5), 0.5, generator, random.Random(0))
    assert torch.equal(masks, again)
    # no block larger than half the grid: a target of 90 % stops at blocks of <= 128 patches
    assert generator.block_mask(16, 16, 256, random.Random(1)).sum() > 128


# ----------------------------------------------------------------- backbone


def test_layerscale_registers_and_uniform_drop_path_are_as_defined() -> None:
    model = tiny(num_register_tokens=2, layerscale=1e-5, drop_path_rate=0.3)
    vit = model.backbone.model
    for block in vit.blocks:  # every block has rate 0.3 (timm's rises from 0)
        assert isinstance(block.drop_path1, DropPath) and block.drop_path1.drop_prob == 0.3
        assert isinstance(block.drop_path2, DropPath) and block.drop_path2.drop_prob == 0.3
        assert torch.equal(block.ls1.gamma, torch.full((32,), 1e-5))
    for block in model.teacher_backbone.model.blocks:
        assert block.drop_path1.drop_prob == 0.0
    vit.eval()
    block, x = vit.blocks[0], torch.randn(2, 5, 32)
    with torch.no_grad():
        block.ls1.gamma.normal_()
        y = x + block.ls1.gamma * block.attn(block.norm1(x))
        y = y + block.ls2.gamma * block.mlp(block.norm2(y))
        torch.testing.assert_close(block(x), y)
        # [CLS] + its position embedding, the registers (none), the patches + theirs
        images = torch.randn(2, 3, 16, 16)
        patches = vit.patch_embed(images).flatten(1, 2)
        assert vit.pos_embed.shape == (1, 17, 32) and vit.num_prefix_tokens == 3
        expected = torch.cat([
            (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1),
            vit.reg_token.expand(2, -1, -1),
            patches + vit.pos_embed[:, 1:],
        ], dim=1)  # fmt: skip
        torch.testing.assert_close(vit._pos_embed(vit.patch_embed(images)), expected)
        assert vit_tokens(vit, images).shape == (2, 19, 32)


def official_lr_multiplier(name: str, decay: float, num_layers: int, patch_mult: float):
    """``get_vit_lr_decay_rate`` (``force_is_backbone``) and the patch-embedding factor, on
    DINOv2's parameter names."""
    layer_id = num_layers + 1
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token",
                               "register_tokens")):  # fmt: skip
        layer_id = 0
    elif "blocks." in name and "residual." not in name:
        layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    rate = decay ** (num_layers + 1 - layer_id)
    return rate * patch_mult if "patch_embed" in name else rate


def test_parameter_groups_are_get_params_groups_with_decay() -> None:
    """Each parameter's lr multiplier and weight decay as DINOv2's, heads at 1 with their last
    layers marked; timm's ``param_groups_layer_decay`` would put the final norm with the last
    block, making every other multiplier 1 / 0.9 too large, so it is not used."""
    model = tiny(num_register_tokens=1, separate_head=True, ibot_out_dim=12)
    groups = model.parameter_groups()
    where = {id(p): g for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(where) == len(trainable) == sum(len(g["params"]) for g in groups)
    for name, p in trainable:
        group = where[id(p)]
        official = name.replace("backbone.model.", "").replace("reg_token", "register_tokens")
        if name.startswith(("backbone.", "mask_token")):
            expected = official_lr_multiplier(official, 0.9, 3, 0.2)
        else:
            expected = 1.0
        assert group["lr_scale"] == pytest.approx(expected), name
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.04), name
        assert group.get("last_layer", False) == ("last_layer" in name), name
    timm_groups = param_groups_layer_decay(model.backbone.model, 0.04, layer_decay=0.9)
    timm_scale = {id(p): g["lr_scale"] for g in timm_groups for p in g["params"]}
    block = model.backbone.model.blocks[0].attn.qkv.weight
    assert timm_scale[id(block)] == pytest.approx(where[id(block)]["lr_scale"] / 0.9)


def test_gradients_are_clipped_per_student_module() -> None:
    model = tiny(separate_head=True, ibot_out_dim=12, clip_grad=0.5)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    norms = [torch.cat([p.grad.flatten() for p in part]).norm() for part in model.student_parts()]
    model.configure_gradient_clipping(torch.optim.SGD(model.parameters(), lr=0.1))
    for part, before in zip(model.student_parts(), norms, strict=True):
        after = torch.cat([p.grad.flatten() for p in part]).norm()
        assert after == pytest.approx(min(0.5, float(before)), rel=1e-4)


# ----------------------------------------------------------------- the step


def test_training_step_is_ssl_meta_arch_forward_backward() -> None:
    """The loss of one step, recomputed as ``forward_backward`` composes it: teacher [CLS]
    targets reversed so crop A meets B, local crops against both, divided by
    2 + 2 n_local terms, KoLeo on each global crop's [CLS] tokens, the masked-patch loss."""
    model = tiny(koleo_loss_weight=0.1, centering="sinkhorn_knopp", separate_head=True,
                 ibot_out_dim=12, drop_path_rate=0.0)  # fmt: skip
    g = torch.Generator().manual_seed(4)
    views = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    views += [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    masks = torch.rand(8, 16, generator=g) < 0.4
    with (
        mock.patch.object(DINOv2, "draw_masks", return_value=masks),
        mock.patch.object(DINOv2, "log_dict"), mock.patch.object(DINOv2, "log"),
        mock.patch.object(DINOv2, "log_scalar"),
        mock.patch.object(DINOv2, "global_step", 0),
        mock.patch.object(DINOv2, "steps_per_epoch", 5),
    ):  # fmt: skip
        loss = model.training_step((views, torch.zeros(4)), 0)["loss"]
    temp = 0.04  # the warmup's first value
    with torch.no_grad():
        teacher = vit_tokens(model.teacher_backbone.model, torch.cat(views[:2]))
        t_cls = model.teacher_head(teacher[:, 0])
        t_cls = torch.cat(t_cls.chunk(2)[::-1])
        q_cls = official_sinkhorn(t_cls, temp, 8).float()
        t_patch = model.teacher_ibot_head(teacher[:, 1:][masks])
        q_patch = official_sinkhorn(t_patch, temp, int(masks.sum())).float()
    student = vit_tokens(model.backbone.model, torch.cat(views[:2]), masks, model.mask_token)
    s_global = model.head(student[:, 0])
    s_local = model.head(torch.cat([vit_tokens(model.backbone.model, v)[:, 0] for v in views[2:]]))

    def ce(t, s):
        return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    terms = 2 + 2 * 2
    dino = sum(ce(t, s) for s in s_local.chunk(2) for t in q_cls.chunk(2)) / terms
    dino = dino + ce(q_cls, s_global) * 2 / terms
    koleo = sum(koleo_loss(c) for c in student[:, 0].chunk(2))
    s_patch = model.ibot_head(student[:, 1:][masks])
    pe = -(q_patch * F.log_softmax(s_patch / 0.1, dim=-1)).sum(-1)
    weight = (1 / masks.sum(-1).clamp(min=1))[:, None].expand_as(masks)[masks]
    ibot = (pe * weight).sum() / 8
    torch.testing.assert_close(loss, dino + 0.1 * koleo + ibot, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- schedules


def cosine_scheduler(base, final, total, warmup=0, start=0.0):
    """``dinov2.utils.utils.CosineScheduler``."""
    iters = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.linspace(start, base, warmup), cos))


def test_schedules_are_the_official_ones() -> None:
    """lr (sqrt_wrt_1024, warmup, cosine), weight decay, teacher momentum and temperature per
    step (``build_schedulers``) with 5-step epochs, and the last layers' lr 0 while frozen."""
    model = tiny(freeze_last_layer=1, warmup_teacher_temp_epochs=2,
                 optim=OPTIM.replace(warmup_epochs=2))  # fmt: skip
    total, epoch = 40, 5
    with (
        mock.patch.object(DINOv2, "total_steps", total),
        mock.patch.object(DINOv2, "global_batch_size", 2048),
        mock.patch.object(DINOv2, "steps_per_epoch", epoch),
    ):  # fmt: skip
        lr = 0.004 * math.sqrt(2048 / 1024)
        assert model.scaled_lr == pytest.approx(lr)
        lrs = cosine_scheduler(lr, 1e-6, total, 2 * epoch)
        wds = cosine_scheduler(0.04, 0.4, total)
        temps = np.concatenate([np.linspace(0.04, 0.07, 2 * epoch), [0.07] * (total - 10)])
        momenta = cosine_scheduler(0.992, 1.0, total)
        update = model.teacher_update()
        for step in range(total):
            assert model.learning_rate_at(step) == pytest.approx(lrs[step])
            assert model.weight_decay_at(step, 0.04) == pytest.approx(wds[step])
            assert model.teacher_temperature(step) == pytest.approx(temps[step])
            assert update.momentum_at(step, total) == pytest.approx(momenta[step])
        optimizer = torch.optim.AdamW(model.parameter_groups())
        for g in optimizer.param_groups:
            g["base_weight_decay"] = g["weight_decay"]
        for step, frozen in ((0, True), (epoch - 1, True), (epoch, False)):
            with (
                mock.patch.object(DINOv2, "global_step", step),
                mock.patch.object(DINOv2, "optimizers", return_value=optimizer),
                mock.patch.object(DINOv2, "log_scalar"),
            ):  # fmt: skip
                model.on_train_batch_start(None, 0)
            for g in optimizer.param_groups:
                expected = 0.0 if frozen and g.get("last_layer") else lrs[step] * g["lr_scale"]
                assert g["lr"] == pytest.approx(expected), (step, g["name"])


def test_fsdp2_preset_composes_with_the_dinov2_configs(capsys: pytest.CaptureFixture) -> None:
    from sslzoo.cli import main

    config = REPO / "configs" / "imagenet" / "dinov2_vitl14.yaml"
    preset = REPO / "configs" / "trainer" / "fsdp2_shard_grad_op.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--config", str(preset), "--data.train_dir", "x",
              "--data.val_dir", "x", "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "FSDP2Strategy" in printed and "reshard_after_forward: false" in printed
    assert "sslzoo.methods.dinov2.DINOv2" in printed and "sinkhorn_knopp" in printed


def test_model_help_documents_every_argument() -> None:
    import inspect

    from tests.test_method_arguments import description, entries, help_text

    documented = entries(help_text("--model.help", "DINOv2"))
    for name in inspect.signature(DINOv2.__init__).parameters:
        if name not in ("self", "views", "optim"):
            (entry,) = documented[f"--model.{name}"]
            assert description(entry), entry
