"""Released backbone weights into a backbone sslzoo builds (``init_backbone``).

A file is read as one of four namings and converted to the backbone's own:

- DINOv2's torch-hub state dict (facebookresearch/dinov2 ``vision_transformer.py``:
  ``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``, ``blocks.N.ls1.gamma``...,
  also the chunked ``blocks.C.N.`` form), into a timm ``VisionTransformer`` (the
  ``vit_*_dinov2`` and ``vit_*_reg4_dinov2`` models) by timm's own
  ``vision_transformer.checkpoint_filter_fn``, which drops the pre-training ``mask_token``,
  folds the class position into ``cls_token`` for register models and resamples ``pos_embed``;
- DINOv3's (facebookresearch/dinov3: ``storage_tokens``, ``rope_embed.periods``,
  ``attn.qkv.bias_mask``, ``ls1.gamma``), into a timm ``Eva`` (the ``vit_*_dinov3`` models) by
  timm's ``eva.checkpoint_filter_fn``; what an Eva cannot hold (untied ``cls_norm``, a non-zero
  key bias, a non-zero qkv bias for a model without one) is refused by name;
- timm's own naming, which is also what ``sslzoo export`` writes (``backbone.safetensors``);
- an sslzoo checkpoint (``.ckpt`` written by ``sslzoo fit``): its evaluation backbone.

``.safetensors`` files are read with safetensors, anything else with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models import eva, vision_transformer
from torch import nn

from sslzoo.errors import MissingDataError, UserError


class PretrainedWeightsError(UserError, ValueError):
    """Backbone weights that do not fit the backbone (the message names the key)."""


CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a plain state dict, or an sslzoo checkpoint's evaluation
    backbone."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"backbone weights {str(path)!r} do not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedWeightsError(
            f"{path}: not a weights file torch.load(weights_only=True) can read ({e})"
        ) from e
    if isinstance(state, dict) and "hyper_parameters" in state and "state_dict" in state:
        return checkpoint_backbone(state, path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: not a state dict of tensors")
    return state


def checkpoint_backbone(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """The evaluation backbone's tensors of an sslzoo checkpoint, in the backbone's naming."""
    name = checkpoint.get("eval_backbone")
    if not name:
        raise PretrainedWeightsError(
            f"{path}: an sslzoo checkpoint that does not say which module is its backbone "
            "(written by an older sslzoo): `sslzoo export` it and use backbone.safetensors"
        )
    prefix = f"{name}.model."
    state = checkpoint["state_dict"].items()
    return {k[len(prefix) :]: v for k, v in state if k.startswith(prefix)}


def naming(state: dict[str, torch.Tensor]) -> str:
    """``dinov3``, ``dinov2`` or ``timm`` (the model's own names)."""
    if "storage_tokens" in state or "rope_embed.periods" in state:
        return "dinov3"
    if "mask_token" in state and "pos_embed" in state:
        return "dinov2"
    return "timm"


def _dinov3(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict:
    if not isinstance(model, eva.Eva):
        key = "storage_tokens" if "storage_tokens" in state else "rope_embed.periods"
        raise PretrainedWeightsError(
            f"{path}: DINOv3 key {key!r} (RoPE, storage tokens) cannot be represented by a "
            f"{type(model).__name__}: use a timm vit_*_dinov3 backbone"
        )
    has_qv_bias = any(k.endswith("attn.q_bias") for k in model.state_dict())
    for key, value in state.items():
        if key.startswith("cls_norm."):
            raise PretrainedWeightsError(
                f"{path}: {key!r} (untied class-token norm) cannot be represented by timm's Eva"
            )
        if key.endswith("attn.qkv.bias"):
            _, k_bias, _ = value.chunk(3, dim=-1)
            if k_bias.any() or (not has_qv_bias and value.any()):
                need = "the _qkvb variant" if not has_qv_bias else "a zero key bias"
                raise PretrainedWeightsError(
                    f"{path}: {key!r} is not zero where the backbone has no such bias ({need})"
                )
    if not has_qv_bias:
        state = {k: v for k, v in state.items() if not k.endswith("attn.qkv.bias")}
    return eva.checkpoint_filter_fn(state, model)


def convert(
    state: dict[str, torch.Tensor], model: nn.Module, path: str | Path = "weights"
) -> dict[str, torch.Tensor]:
    """``state`` in ``model``'s naming, position embeddings resampled to its grid."""
    path = Path(path)
    kind = naming(state)
    if kind == "dinov2":
        state = {CHUNKED.sub(r"blocks.\1.", k): v for k, v in state.items()}
    proj = model.state_dict().get("patch_embed.proj.weight")
    given = state.get("patch_embed.proj.weight")
    if proj is not None and given is not None and given.shape != proj.shape:
        raise _mismatch(path, "patch_embed.proj.weight", given.shape, proj.shape)
    if kind == "dinov3":
        return _dinov3(state, model, path)
    if isinstance(model, vision_transformer.VisionTransformer):
        return vision_transformer.checkpoint_filter_fn(dict(state), model)
    if kind == "dinov2":
        raise PretrainedWeightsError(
            f"{path}: DINOv2 weights need a timm VisionTransformer backbone (vit_*_dinov2), "
            f"not a {type(model).__name__}"
        )
    if isinstance(model, eva.Eva):
        return eva.checkpoint_filter_fn(dict(state), model)
    return state


def _mismatch(path: Path, key: str, given: torch.Size, expected: torch.Size) -> Exception:
    return PretrainedWeightsError(
        f"{path}: {key!r} has shape {tuple(given)} in the file but {tuple(expected)} in the "
        "backbone: a different architecture"
    )


@torch.no_grad()
def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load the weights file ``path`` into ``model`` (a backbone's timm or torchvision module),
    every tensor of the model and nothing else."""
    state = convert(read_weights(path), model, path)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise PretrainedWeightsError(
            f"{path}: keys the backbone does not have: {', '.join(unexpected[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise PretrainedWeightsError(
            f"{path}: the backbone's {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + " are not in the file"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise _mismatch(Path(path), key, value.shape, expected[key].shape)
    model.load_state_dict(state)
