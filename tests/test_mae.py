"""MAE: masking, patchify, the masked-patch loss against a hand-written formula, fixed sin-cos
position embeddings, the official init, unmasked evaluation features and a short training."""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from sslzoo.callbacks import OnlineProbe
from sslzoo.methods.mae import MAE, OPTIM
from tests.helpers import digits, quiet_trainer

TINY_VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=64, num_heads=2),
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)
P, GRID = 4, 4  # patch size and patches per side of a 16x16 image: L = 16


def tiny_mae(**kwargs: Any) -> MAE:
    torch.manual_seed(0)
    return MAE(**{**TINY_VIT, **kwargs})


def official_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """mae/util/pos_embed.py ``get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True)``
    written out again."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h)).reshape(2, 1, grid_size, grid_size)

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], 1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def patch_of(img: torch.Tensor, index: int) -> torch.Tensor:
    """Patch ``index`` (row-major) of a (3, H, W) image, flattened as (row, col, channel)."""
    i, j = divmod(index, GRID)
    return img[:, i * P : (i + 1) * P, j * P : (j + 1) * P].permute(1, 2, 0).reshape(-1)


def reference_loss(imgs, pred, mask, norm_pix: bool) -> float:
    """Mean over masked patches of the per-patch MSE; with norm_pix the target patch is
    (x - mean) / sqrt(var + 1e-6), var = sum((x - mean)^2) / (n - 1)."""
    total, count = 0.0, 0
    for n in range(imgs.shape[0]):
        for index in range(GRID * GRID):
            if mask[n, index] == 0:
                continue
            target = patch_of(imgs[n], index).double()
            if norm_pix:
                mean = target.mean()
                var = ((target - mean) ** 2).sum() / (target.numel() - 1)
                target = (target - mean) / math.sqrt(var + 1e-6)
            total += float(((pred[n, index].double() - target) ** 2).mean())
            count += 1
    return total / count


def test_defaults_are_the_official_recipe() -> None:
    defaults = {
        k: v.default for k, v in inspect.signature(MAE.__init__).parameters.items() if k != "self"
    }
    assert defaults["mask_ratio"] == 0.75 and defaults["norm_pix_loss"] is True
    assert (defaults["decoder_embed_dim"], defaults["decoder_depth"]) == (512, 8)
    optim, views = defaults["optim"], defaults["views"]
    assert defaults["decoder_num_heads"] == 16 and optim.optimizer == "adamw"
    assert optim.betas == (0.9, 0.95) and optim.weight_decay == 0.05
    assert (optim.lr, optim.lr_scaling) == (1.5e-4, "linear")
    assert (optim.warmup_epochs, optim.min_lr) == (40, 0.0)
    assert views.crop_min_scale == 0.2
    for name in defaults:
        assert f"{name}:" in MAE.__doc__, f"{name} has no line in the docstring's Args"


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6, 0.9])
def test_random_masking_keeps_a_fixed_share_per_image(ratio: float) -> None:
    model = tiny_mae()
    n, length, dim = 8, GRID * GRID, 5
    x = torch.arange(length).float().view(1, length, 1).expand(n, length, dim).contiguous()
    kept, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert kept.shape == (n, keep, dim)
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))
    for i in range(n):  # the kept tokens are exactly the unmasked positions
        assert (
            sorted(kept[i, :, 0].long().tolist()) == torch.nonzero(mask[i] == 0).view(-1).tolist()
        )
    assert len({tuple(m.tolist()) for m in mask}) > 1, "every image got the same mask"
    # ids_restore puts the kept tokens (followed by fillers) back in their original places
    filler = torch.full((n, length - keep, dim), -1.0)
    restored = torch.gather(
        torch.cat([kept, filler], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim)
    )
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert bool((restored[~visible] == -1).all())


# models_mae.py random_masking: ``len_keep = int(L * (1 - mask_ratio))``, float arithmetic
# truncated; these are the values Python gives for that expression
OFFICIAL_KEEP = [
    (196, 0.75, 49), (196, 0.7, 58), (196, 0.9, 19), (196, 0.95, 9), (256, 0.9, 25),
    (16, 0.9, 1), (16, 0.75, 4),
]  # fmt: skip


@pytest.mark.parametrize("length, ratio, keep", OFFICIAL_KEEP)
def test_random_masking_keeps_the_official_truncated_count(
    length: int, ratio: float, keep: int
) -> None:
    assert int(length * (1 - ratio)) == keep  # the table is the official expression
    kept, mask, _ = tiny_mae().random_masking(torch.zeros(2, length, 3), ratio)
    assert kept.shape == (2, keep, 3)
    assert mask.sum(1).tolist() == [length - keep] * 2


def test_patchify_layout_and_round_trip() -> None:
    model = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    patches = model.patchify(imgs)
    assert patches.shape == (2, GRID * GRID, P * P * 3)
    for n in range(2):
        for index in (0, 3, 5, 15):
            assert torch.equal(patches[n, index], patch_of(imgs[n], index))
    assert torch.equal(model.unpatchify(patches), imgs)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_reference_on_masked_patches_only(norm_pix: bool) -> None:
    model = tiny_mae(norm_pix_loss=norm_pix)
    torch.manual_seed(1)
    imgs = torch.randn(3, 3, 16, 16)
    pred = torch.randn(3, GRID * GRID, P * P * 3)
    _, mask, _ = model.random_masking(torch.zeros(3, GRID * GRID, 1), 0.75)
    loss = model.forward_loss(imgs, pred, mask)
    assert float(loss) == pytest.approx(reference_loss(imgs, pred, mask, norm_pix), rel=1e-5)
    visible = (mask == 0).unsqueeze(-1)
    changed_visible = torch.where(visible, pred + 10 * torch.randn_like(pred), pred)
    assert torch.equal(model.forward_loss(imgs, changed_visible, mask), loss)
    changed_masked = torch.where(visible, pred, pred + 1.0)
    assert not torch.allclose(model.forward_loss(imgs, changed_masked, mask), loss)


def test_position_embeddings_are_fixed_sincos() -> None:
    model = tiny_mae()
    for table, dim in ((model.backbone.model.pos_embed, 64), (model.decoder_pos_embed, 32)):
        assert not table.requires_grad
        expected = torch.from_numpy(official_sincos(dim, GRID)).float().unsqueeze(0)
        assert torch.allclose(table, expected, atol=1e-6)
    in_groups = {id(p) for g in model.parameter_groups() for p in g["params"]}
    assert id(model.backbone.model.pos_embed) not in in_groups
    assert id(model.decoder_pos_embed) not in in_groups


def test_weight_decay_groups_follow_official_add_weight_decay() -> None:
    """timm ``add_weight_decay`` as MAE calls it: no decay for 1-D tensors (biases, norms),
    decay for everything else trainable, the cls and mask tokens included."""
    model = tiny_mae()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in model.parameter_groups()}
    assert id(model.backbone.model.cls_token) in groups["decay"]
    assert id(model.mask_token) in groups["decay"]
    assert id(model.decoder_embed.bias) in groups["no_decay"]
    assert id(model.decoder_norm.weight) in groups["no_decay"]


@torch.no_grad()
def test_official_initialisation() -> None:
    model = tiny_mae()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) >= 2 * 4 + 2  # encoder blocks, decoder block, embed and pred
    for layer in linears:
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert float(layer.weight.abs().max()) <= bound
        assert float(layer.weight.abs().max()) > 0.9 * bound
        assert not layer.bias.any()
    kernel = model.backbone.model.patch_embed.proj.weight
    bound = math.sqrt(6 / (kernel[0].numel() + kernel.shape[0]))
    assert bound * 0.9 < float(kernel.abs().max()) <= bound
    for token in (model.backbone.model.cls_token, model.mask_token):
        assert 0.005 < float(token.std()) < 0.04


def test_evaluation_features_see_the_whole_image() -> None:
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    first = model.extract_features(imgs)
    torch.manual_seed(2)
    assert torch.equal(model.extract_features(imgs), first)
    assert torch.equal(model.eval_backbone(imgs), first)
    # the cls token of the encoder with nothing masked (attention does not care about order)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.0)
    assert not mask.any()
    assert torch.allclose(latent[:, 0], first, atol=1e-5)
    for index in range(GRID * GRID):  # every patch changes the feature
        changed = imgs.clone()
        i, j = divmod(index, GRID)
        changed[:, :, i * P : (i + 1) * P, j * P : (j + 1) * P] += 1.0
        assert not torch.allclose(model.extract_features(changed), first, atol=1e-4)


def test_view_is_one_crop_and_flip_without_colour() -> None:
    """lightly's MAETransform is exactly the official pretraining augmentation:
    RandomResizedCrop(scale=(0.2, 1), bicubic) + flip, then ToTensor and Normalize."""
    model = tiny_mae()
    views = model.views.pil(16, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    ops = views.transform.transforms
    names = [type(o).__name__ for o in ops]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert ops[0].scale == (0.2, 1.0) and ops[0].size == (16, 16)
    assert ops[0].interpolation == T.InterpolationMode.BICUBIC
    assert ops[1].p == 0.5
    out = views(Image.new("RGB", (20, 20), (51, 102, 153)))
    assert len(out) == 1 and out[0].shape == (3, 16, 16)
    expected = [(0.2 - 0.5) / 0.2, (0.4 - 0.4) / 0.25, (0.6 - 0.3) / 0.3]  # datamodule stats
    assert torch.allclose(out[0].mean((1, 2)), torch.tensor(expected), atol=1e-2)


def test_non_vit_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="VisionTransformer"):
        MAE(backbone="resnet18")


def test_short_training_lowers_reconstruction_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 Lightning steps on the digits: the loss on a fixed batch with fixed masks falls below
    that of predicting zeros (the per-patch mean under norm_pix_loss), the sin-cos tables stay
    put, and the online probe trains on the features the step hands over."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    model = tiny_mae(optim=OPTIM.replace(lr=3e-3, lr_scaling="none", warmup_epochs=0))
    pos_embed = model.backbone.model.pos_embed.clone()
    data = digits(batch_size=32, views=model.views)
    data.build_datasets(None, data.eval_transform())
    imgs = torch.stack([data.bank_set[i][0] for i in range(64)])

    def fixed_losses() -> tuple[float, float]:
        torch.manual_seed(123)
        with torch.no_grad():
            loss, pred, mask, _ = model(imgs)
            return float(loss), float(model.forward_loss(imgs, torch.zeros_like(pred), mask))

    before, zeros = fixed_losses()
    trainer = quiet_trainer(max_steps=40, limit_val_batches=0, callbacks=[OnlineProbe()])
    trainer.fit(model, datamodule=data)
    after, _ = fixed_losses()
    assert after < 0.6 * before and after < 0.95 * zeros, (before, after, zeros)
    assert torch.equal(model.backbone.model.pos_embed, pos_embed)
    assert "probe/train_top1" in trainer.callback_metrics
