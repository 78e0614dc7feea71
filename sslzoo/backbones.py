"""One factory for every backbone: ResNets (optionally with the CIFAR stem), any torchvision
classification model, and any timm model, ViTs included."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torchvision
from torch import nn


class Backbone(nn.Module):
    """A feature extractor: ``forward`` maps images to pooled features of size ``num_features``.

    ``model`` is the wrapped network with its classifier removed. ``spec`` records how to
    rebuild it without sslzoo: library, model name, constructor arguments, stem and head.
    """

    def __init__(self, model: nn.Module, num_features: int, spec: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.num_features = num_features
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _cifar_stem(conv1: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 convolution replacing the 7x7 stride-2 ImageNet stem."""
    return nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)


def _torchvision(name: str, cifar_stem: bool, kwargs: dict[str, Any]) -> Backbone:
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if cifar_stem:
        if not hasattr(model, "conv1"):
            raise ValueError(f"cifar_stem=True needs a ResNet-like model with conv1; got {name!r}")
        model.conv1 = _cifar_stem(model.conv1)
        model.maxpool = nn.Identity()
    for head in ("fc", "classifier", "head", "heads"):
        layer = getattr(model, head, None)
        if layer is None:
            continue
        # the whole head is removed, so the features are the input of its first Linear
        dim = next(m for m in layer.modules() if isinstance(m, nn.Linear)).in_features
        setattr(model, head, nn.Identity())
        spec = {"library": "torchvision", "name": name, "kwargs": kwargs, "head": head}
        return Backbone(model, dim, {**spec, "cifar_stem": cifar_stem})
    raise ValueError(f"cannot find the classifier of torchvision model {name!r}")


def swiglu_ratio(embed_dim: int) -> float:
    """timm's ``mlp_ratio`` for DINOv2's SwiGLU feed-forward layer (``SwiGLUFFNFused``):
    hidden width int(4 d x 2/3) rounded up to a multiple of 8, both halves packed in fc1."""
    hidden = (int(4 * embed_dim * 2 / 3) + 7) // 8 * 8
    return 2 * hidden / embed_dim


def _ffn_arguments(name: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(timm's arguments, the arguments to record) for ``ffn_layer``: ``mlp`` (the model's
    own) or ``swiglu`` (DINOv2's ``swiglufused``: timm's ``SwiGLUPacked`` with SiLU, and
    ``mlp_ratio`` from :func:`swiglu_ratio` unless given)."""
    kwargs = dict(kwargs)
    layer = kwargs.pop("ffn_layer", "mlp")
    if layer == "mlp":
        return kwargs, kwargs
    if layer != "swiglu":
        raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', not {layer!r}")
    if "mlp_ratio" not in kwargs:
        with torch.device("meta"):
            dim = timm.create_model(name, **{"num_classes": 0, **kwargs}).embed_dim
        kwargs["mlp_ratio"] = swiglu_ratio(dim)
    kwargs["act_layer"] = "silu"
    return {**kwargs, "mlp_layer": timm.layers.SwiGLUPacked}, {**kwargs, "ffn_layer": "swiglu"}


def _timm(name: str, cifar_stem: bool, kwargs: dict[str, Any]) -> Backbone:
    kwargs, recorded = _ffn_arguments(name, kwargs)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if cifar_stem:
        if not hasattr(model, "conv1"):
            raise ValueError(f"cifar_stem=True needs a ResNet-like model with conv1; got {name!r}")
        model.conv1 = _cifar_stem(model.conv1)
        model.maxpool = nn.Identity()
    spec = {"library": "timm", "name": name, "kwargs": {**recorded, "num_classes": 0}}
    return Backbone(model, model.num_features, {**spec, "head": None, "cifar_stem": cifar_stem})


def _zero_init_argument(library: str, name: str) -> str | None:
    """The constructor argument that zero-initialises the last BatchNorm scale of every
    residual block: ``zero_init_residual`` of torchvision's ResNets, ``zero_init_last`` of
    timm's (``timm.models.resnet``); None for other models."""
    if library == "torchvision":
        builder = torchvision.models.get_model_builder(name)
        return "zero_init_residual" if builder.__module__ == "torchvision.models.resnet" else None
    entrypoint = timm.models.model_entrypoint(timm.models.get_arch_name(name))
    return "zero_init_last" if entrypoint.__module__ == "timm.models.resnet" else None


def build_backbone(
    name: str = "resnet18",
    cifar_stem: bool = False,
    img_size: int | None = None,
    patch_size: int | None = None,
    zero_init_residual: bool | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a backbone with its classifier removed.

    Args:
        name: ``"resnet18"``, ``"resnet50"``, any torchvision classification model name, or any
            timm model name. A ``"tv/"`` or ``"timm/"`` prefix picks the library explicitly;
            without one, torchvision is tried first.
        cifar_stem: replace the ResNet stem with a 3x3 stride-1 convolution and no max-pool,
            the usual variant for 32x32 images.
        img_size: input size for ViTs (timm), e.g. 32 for CIFAR.
        patch_size: patch size for ViTs (timm), e.g. 4 for CIFAR.
        zero_init_residual: start the last BatchNorm of every residual block of a ResNet at
            zero scale (torchvision's ``zero_init_residual``, timm's ``zero_init_last``);
            ``None`` keeps the library's default (off in torchvision, on in timm). Models
            without residual BatchNorm blocks (ViTs...) ignore it.
        kwargs: passed to the model constructor (e.g. ``drop_path_rate`` or ``channels`` for
            timm models). ``ffn_layer: swiglu`` gives a timm ViT DINOv2's SwiGLU
            feed-forward layers (``ffn_layer: swiglufused`` of its ViT-L/14 and ViT-g/14).
    """
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    library, _, bare = name.rpartition("/")
    if library not in ("", "tv", "timm"):
        raise ValueError(f"unknown backbone library {library!r} in {name!r}; use 'tv/' or 'timm/'")
    tv_names = set(torchvision.models.list_models(module=torchvision.models))
    if library == "tv" or (library == "" and bare in tv_names):
        if bare not in tv_names:
            raise ValueError(f"unknown torchvision model {bare!r}")
        library = "torchvision"
    elif not timm.is_model(bare):
        raise ValueError(
            f"unknown backbone {name!r}: not a torchvision classification model nor a timm model "
            "(see torchvision.models.list_models() and timm.list_models())"
        )
    else:
        library = "timm"
    key = _zero_init_argument(library, bare) if zero_init_residual is not None else None
    if key is not None:
        if kwargs.get(key, zero_init_residual) != zero_init_residual:
            raise ValueError(
                f"zero_init_residual={zero_init_residual} contradicts {key}={kwargs[key]}"
            )
        kwargs[key] = zero_init_residual
    build = _torchvision if library == "torchvision" else _timm
    return build(bare, cifar_stem, kwargs)
