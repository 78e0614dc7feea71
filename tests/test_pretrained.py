"""Continued pretraining from released backbone weights (``init_backbone``): files in DINOv2's,
DINOv3's, timm's and ``sslzoo export``'s naming land tensor by tensor in the backbone (the same
features as the model the file was written from), teachers start as the student, heads stay
new, bad files fail by name, ``freeze_backbone_steps`` trains the heads alone first, and
DINOv2's SwiGLU feed-forward layers (``ffn_layer: swiglu``) are its formula and load.

The DINOv2 and DINOv3 files are re-created here from a timm model's tensors by the official
naming rules (facebookresearch/dinov2 and dinov3 ``vision_transformer.py``), written out key by
key, not by the converter the loader uses: loading them through timm's
``checkpoint_filter_fn`` must give back the timm model. timm's converters are what the loader
uses because timm builds the backbones: they know its layouts (register tokens outside the
position embedding, Eva's split q/v biases and ``gamma_1``), which a copy would have to follow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from sslzoo.backbones import build_backbone
from sslzoo.errors import MissingDataError
from sslzoo.methods import BYOL, DINO, IBOT, DINOv2, MoCoV3
from sslzoo.methods import dino as dino_recipe
from sslzoo.pretrained import PretrainedWeightsError
from tests.conftest import TINY_HEADS, TINY_RESNET
from tests.ddp_helpers import TINY_VIT, ViewsDataModule
from tests.helpers import quiet_trainer

VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
DINO_HEAD = {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8, "drop_path_rate": 0.0}


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor drawn at random (layer scales and biases are constants at init)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def timm_vit(name: str, img_size: int, **kwargs: Any) -> torch.nn.Module:
    return randomised(
        timm.create_model(name, num_classes=0, img_size=img_size, **{**VIT, **kwargs})
    )


def dinov2_state(vit: torch.nn.Module, chunks: int = 0) -> dict[str, torch.Tensor]:
    """A timm DINOv2 ViT's tensors under the torch-hub names: the class token has its own
    position in ``pos_embed`` (timm's register models fold it into ``cls_token``), registers
    are ``register_tokens``, a ``mask_token`` is kept for masked modelling, blocks are
    ``blocks.N.`` or, with ``chunks``, ``blocks.C.N.`` (``BlockChunk``)."""
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    dim = state["cls_token"].shape[-1]
    out = {"mask_token": torch.randn(1, dim)}
    if "reg_token" in state:
        cls_pos = torch.randn(1, 1, dim)
        out["register_tokens"] = state.pop("reg_token")
        out["cls_token"] = state.pop("cls_token") - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, state.pop("pos_embed")], dim=1)
    per_chunk = len(vit.blocks) // chunks if chunks else 0
    for key, value in state.items():
        if chunks and key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // per_chunk}.{key[len('blocks.') :]}"
        out[key] = value
    return out


def dinov3_state(eva: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm DINOv3 Eva's tensors under facebookresearch/dinov3's names: ``storage_tokens``,
    one ``attn.qkv.bias`` with a zero key part and its ``bias_mask``, ``ls1/ls2.gamma``, the
    RoPE ``rope_embed.periods`` buffer and a ``mask_token``."""
    out: dict[str, torch.Tensor] = {}
    state = eva.state_dict()
    dim = state["cls_token"].shape[-1]
    for key, value in state.items():
        if key.endswith("attn.q_bias"):
            stem = key[: -len("q_bias")]
            out[stem + "qkv.bias"] = torch.cat([value, torch.zeros(dim), state[stem + "v_bias"]])
            out[stem + "qkv.bias_mask"] = torch.cat(
                [torch.ones(dim), torch.zeros(dim), torch.ones(dim)]
            )
        elif not key.endswith("attn.v_bias"):
            key = key.replace("reg_token", "storage_tokens")
            out[key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")] = value
    out["mask_token"] = torch.zeros(1, dim)
    out["rope_embed.periods"] = torch.rand(4)
    return out


def dino(backbone: str, img_size: int, path: Path | None, **kwargs: Any) -> DINO:
    kwargs = {**kwargs, "backbone_kwargs": {"img_size": img_size, **VIT}}
    return DINO(backbone=backbone, init_backbone=str(path) if path else None, **DINO_HEAD, **kwargs)


def features(vit: torch.nn.Module, size: int) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return vit.eval()(x)


@pytest.mark.parametrize(
    "name,chunks",
    [("vit_small_patch14_dinov2", 0), ("vit_small_patch14_reg4_dinov2", 0),
     ("vit_small_patch14_dinov2", 2)],
)  # fmt: skip
def test_dinov2_hub_naming_lands_every_tensor(tmp_path: Path, name: str, chunks: int) -> None:
    source = timm_vit(name, 28)
    path = tmp_path / "dinov2.pth"
    torch.save(dinov2_state(source, chunks), path)
    model = dino(name, 28, path)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    model.load_init_backbone()
    loaded = model.backbone.model.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value, msg=key)
    torch.testing.assert_close(features(model.backbone, 28), features(source, 28))
    # the teacher starts as the student; the heads stay new
    for key, value in model.teacher_backbone.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key]), key
    assert all(torch.equal(v, model.head.state_dict()[k]) for k, v in head.items())


def test_ibot_and_mocov3_start_student_and_teacher_from_the_file(tmp_path: Path) -> None:
    """The base class loads for every method: iBOT (its own ViT forward), MoCo v3 (sin-cos
    position embeddings and a frozen patch projection set up after the backbone is built)."""
    source = timm_vit("vit_small_patch14_dinov2", 28)
    path = tmp_path / "dinov2.pth"
    torch.save(dinov2_state(source), path)
    arch = {"backbone": "vit_small_patch14_dinov2", "init_backbone": str(path),
            "backbone_kwargs": {"img_size": 28, **VIT}}  # fmt: skip
    ibot = IBOT(**arch, out_dim=16, patch_out_dim=16, hidden_dim=16, bottleneck_dim=8)
    moco = MoCoV3(**arch, moco_dim=8, moco_mlp_dim=16)
    for model, teacher in ((ibot, ibot.teacher_backbone), (moco, moco.momentum_backbone)):
        model.load_init_backbone()
        for vit in (model.backbone, teacher):
            torch.testing.assert_close(features(vit, 28), features(source, 28))


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_continues_from_a_released_backbone(tmp_path: Path, name: str) -> None:
    """DINOv2 (its [CLS] position embedding beside registers without one) loads a hub file:
    the same features as the released model, its teacher too."""
    source = timm_vit(name, 28, init_values=1e-5)
    path = tmp_path / "dinov2.pth"
    torch.save(dinov2_state(source), path)
    registers = 4 if "reg4" in name else 0
    model = DINOv2(backbone=name, init_backbone=str(path), num_register_tokens=registers,
                   backbone_kwargs={"img_size": 28, **VIT}, out_dim=16, hidden_dim=16,
                   bottleneck_dim=8, drop_path_rate=0.0)  # fmt: skip
    model.load_init_backbone()
    for vit in (model.backbone, model.teacher_backbone):
        torch.testing.assert_close(features(vit, 28), features(source, 28))


def test_position_embeddings_are_resampled_to_the_image_size(tmp_path: Path) -> None:
    source = timm_vit("vit_small_patch14_dinov2", 28)  # 2 x 2 patches
    path = tmp_path / "dinov2.pth"
    torch.save(dinov2_state(source), path)
    model = dino("vit_small_patch14_dinov2", 42, path)  # 3 x 3 patches
    model.load_init_backbone()
    expected = resample_abs_pos_embed(source.pos_embed, (3, 3), num_prefix_tokens=1)
    torch.testing.assert_close(model.backbone.model.pos_embed, expected)
    assert model.backbone.model.pos_embed.shape == (1, 10, 32)


def test_dinov3_naming_lands_every_tensor_and_refuses_what_eva_cannot_hold(
    tmp_path: Path,
) -> None:
    source = timm_vit("vit_small_patch16_dinov3_qkvb", 32)
    path = tmp_path / "dinov3.pth"
    state = dinov3_state(source)
    torch.save(state, path)
    model = dino("vit_small_patch16_dinov3_qkvb", 32, path)
    model.load_init_backbone()
    torch.testing.assert_close(features(model.backbone, 32), features(source, 32))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.model.state_dict()[key], value), key
    # a ViT without RoPE cannot hold it
    with pytest.raises(PretrainedWeightsError, match="storage_tokens.*VisionTransformer"):
        dino("vit_small_patch16_224", 32, path).load_init_backbone()
    # an untied class-token norm, a non-zero key bias: named
    torch.save({**state, "cls_norm.weight": torch.ones(32)}, path)
    with pytest.raises(PretrainedWeightsError, match="'cls_norm.weight'"):
        model.load_init_backbone()
    state["blocks.0.attn.qkv.bias"][40] = 1.0
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError, match="'blocks.0.attn.qkv.bias'"):
        model.load_init_backbone()


def test_timm_naming_safetensors_into_a_resnet_with_a_random_target(tmp_path: Path) -> None:
    """``sslzoo export``'s file (the backbone module's own state dict as safetensors) into
    BYOL, whose target starts random by default: with weights it starts as the student."""
    source = BYOL(**TINY_RESNET, **TINY_HEADS["BYOL"]).backbone.model
    randomised(source)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = BYOL(**TINY_RESNET, **TINY_HEADS["BYOL"], init_backbone=str(path))
    model.load_init_backbone()
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.model.state_dict()[key], value), key
        assert torch.equal(model.target_backbone.model.state_dict()[key], value), key
    torch.testing.assert_close(features(model.backbone, 16), features(source, 16))


def test_bad_files_fail_by_name(tmp_path: Path) -> None:
    source = timm_vit("vit_small_patch14_dinov2", 28)
    state = dinov2_state(source)
    model = dino("vit_small_patch14_dinov2", 28, tmp_path / "absent.pth")
    with pytest.raises(MissingDataError, match="absent.pth"):
        model.load_init_backbone()
    model.init_backbone = str(tmp_path / "wide.pth")
    wide = timm_vit("vit_small_patch14_dinov2", 28, mlp_ratio=2.0)
    torch.save(dinov2_state(wide), model.init_backbone)
    with pytest.raises(
        PretrainedWeightsError, match=r"'blocks.0.mlp.fc1.weight'.*\(64, 32\).*\(128, 32\)"
    ):
        model.load_init_backbone()
    torch.save({**state, "head.weight": torch.ones(3, 32)}, model.init_backbone)
    with pytest.raises(PretrainedWeightsError, match="does not have: head.weight"):
        model.load_init_backbone()
    del state["norm.weight"]
    torch.save(state, model.init_backbone)
    with pytest.raises(PretrainedWeightsError, match="norm.weight .*not in the file"):
        model.load_init_backbone()
    Path(model.init_backbone).write_text("not weights")
    with pytest.raises(PretrainedWeightsError, match="wide.pth: not a weights file"):
        model.load_init_backbone()
    # a checkpoint that does not name its evaluation backbone
    torch.save({"hyper_parameters": {}, "state_dict": {}}, model.init_backbone)
    with pytest.raises(PretrainedWeightsError, match="does not say which module.*sslzoo export"):
        model.load_init_backbone()


class Record(L.Callback):
    """The backbone, head and teacher after each optimizer step, and at the start."""

    def __init__(self) -> None:
        self.states: list[dict[str, dict[str, torch.Tensor]]] = []

    def snapshot(self, model: DINO) -> None:
        parts = {"backbone": model.backbone.model, "head": model.head,
                 "teacher": model.teacher_backbone.model}  # fmt: skip
        self.states.append(
            {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in parts.items()}
        )

    def on_train_start(self, trainer: L.Trainer, model: DINO) -> None:
        self.snapshot(model)

    def on_train_batch_end(self, trainer: L.Trainer, model: DINO, *args: Any) -> None:
        self.snapshot(model)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_freeze_backbone_steps_trains_the_heads_alone_first(tmp_path: Path) -> None:
    """DINO trained 3 steps with ``freeze_backbone_steps=2`` from a file: the backbone and
    teacher start as the file, the backbone stays so for 2 steps (weight decay on), and so
    does its EMA teacher, and moves at the third; the head moves from the first."""
    source = randomised(DINO(**TINY_VIT, **DINO_HEAD).backbone.model)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    opt = {"optimizer": "sgd", "lr": 0.5, "lr_scaling": "none", "warmup_epochs": 0.0}
    model = DINO(**TINY_VIT, **DINO_HEAD, freeze_last_layer=0, init_backbone=str(path),
                 freeze_backbone_steps=2, optim=dino_recipe.OPTIM.replace(**opt))  # fmt: skip
    record = Record()
    quiet_trainer(max_steps=3, callbacks=[record], enable_checkpointing=False).fit(
        model, datamodule=ViewsDataModule("dino", 8)
    )
    start, *steps = record.states
    assert same(source.state_dict(), start["backbone"])
    assert same(start["backbone"], start["teacher"])
    assert same(start["backbone"], steps[0]["backbone"])
    assert same(start["backbone"], steps[1]["backbone"])
    assert not same(start["backbone"], steps[2]["backbone"])
    # the EMA of an unchanged student that started as the teacher leaves the teacher as it is
    for key, value in steps[1]["teacher"].items():
        torch.testing.assert_close(value, start["backbone"][key], msg=key)
    assert not same(start["head"], steps[0]["head"])


def test_swiglu_feed_forward_is_dinov2s_and_loads_from_hub_naming(tmp_path: Path) -> None:
    # DINOv2's SwiGLUFFNFused (ffn_layer swiglufused of ViT-L/14, ViT-g/14): hidden width
    # h = (int(4 d 2/3) + 7) // 8 * 8; w12: d -> 2h, x1, x2 = halves; w3(silu(x1) * x2)
    backbone = build_backbone("vit_small_patch14_dinov2", img_size=28, ffn_layer="swiglu", **VIT)
    d = 32
    h = (int(4 * d * 2 / 3) + 7) // 8 * 8  # 88
    mlp = backbone.model.blocks[0].mlp
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.in_features) == (d, 2 * h, h)
    x = torch.randn(3, 5, d)
    x12 = x @ mlp.fc1.weight.T + mlp.fc1.bias
    x1, x2 = x12[..., :h], x12[..., h:]
    silu = x1 * torch.sigmoid(x1)
    torch.testing.assert_close(mlp(x), (silu * x2) @ mlp.fc2.weight.T + mlp.fc2.bias)
    # hub files name the packed layer w12 and the output w3
    source = randomised(backbone.model)
    state = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
             for k, v in dinov2_state(source).items()}  # fmt: skip
    assert any(".mlp.w12." in k for k in state)
    torch.save(state, tmp_path / "dinov2_swiglu.pth")
    model = DINOv2(backbone="vit_small_patch14_dinov2", **DINO_HEAD, layerscale=1e-5,
                   backbone_kwargs={"img_size": 28, "ffn_layer": "swiglu", **VIT},
                   init_backbone=str(tmp_path / "dinov2_swiglu.pth"))  # fmt: skip
    model.load_init_backbone()
    torch.testing.assert_close(features(model.backbone, 28), features(source, 28))
    # the recorded arguments rebuild it, with sslzoo or with plain timm
    spec = {k: v for k, v in model.backbone.spec["kwargs"].items() if k != "num_classes"}
    assert spec["ffn_layer"] == "swiglu" and spec["mlp_ratio"] == 2 * h / d
    rebuilt = build_backbone("vit_small_patch14_dinov2", **spec)
    assert rebuilt.model.blocks[0].mlp.fc1.out_features == 2 * h
