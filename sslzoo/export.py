"""``sslzoo export --ckpt RUN.ckpt --out DIR``: the evaluation backbone alone, as
``backbone.safetensors`` plus ``backbone.json`` saying how to rebuild it with plain timm or
torchvision and how to prepare images as the run's evaluation did (no sslzoo import needed)::

    spec = json.load(open("DIR/backbone.json"))
    if spec["library"] == "timm":
        kwargs = dict(spec["kwargs"])
        if kwargs.pop("ffn_layer", "mlp") == "swiglu":  # DINOv2's SwiGLU feed-forward layers
            kwargs["mlp_layer"] = timm.layers.SwiGLUPacked
        model = timm.create_model(spec["name"], **kwargs)
    else:
        model = torchvision.models.get_model(spec["name"], weights=None, **spec["kwargs"])
        setattr(model, spec["head"], torch.nn.Identity())
    if spec["cifar_stem"]:
        model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file("DIR/backbone.safetensors"))
    preprocess = T.Compose([  # torchvision.transforms as T
        T.Resize(spec["resize"], interpolation=T.InterpolationMode(spec["interpolation"])),
        T.CenterCrop(spec["image_size"]),
        T.ToTensor(),
        T.Normalize(spec["mean"], spec["std"]),
    ])
    features = model.eval()(preprocess(pil_image).unsqueeze(0))

``resize`` is what the shorter image side is resized to before the centre crop. These input
values come from the run's datamodule, rebuilt from the checkpoint (the digits load their
bundled images to compute ``mean`` and ``std``); where it cannot be built (its image folder is
not on this machine), from the arguments the checkpoint records, null where those lack them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from sslzoo.checkpoints import IMPORT_HELP, import_trusted, load_method, recorded_datamodule
from sslzoo.datamodules import SSLDataModule
from sslzoo.errors import UserError

INPUT_KEYS = ("image_size", "resize", "interpolation", "mean", "std")


def eval_input(ckpt: str | Path) -> dict[str, Any]:
    """How the run's evaluation transform prepared images (:data:`INPUT_KEYS`), read from its
    datamodule as the checkpoint records it."""
    recorded = recorded_datamodule(ckpt)
    if recorded is None:
        return dict.fromkeys(INPUT_KEYS)
    cls, init_args = recorded
    try:
        dm = cls(**init_args)
        values = {k: getattr(dm, k) for k in ("image_size", "eval_resize_ratio", "mean", "std")}
    except (OSError, UserError):  # its data is not here: the arguments the checkpoint records
        values = init_args
    size, ratio = values.get("image_size"), values.get("eval_resize_ratio")
    # a datamodule with its own evaluation transform may not resize and crop as the base does
    default = cls.eval_transform is SSLDataModule.eval_transform
    resized = default and size is not None and ratio is not None
    return {
        "image_size": size,
        "resize": round(size * ratio) if resized else None,
        "interpolation": "bicubic" if default else None,
        "mean": None if values.get("mean") is None else [float(m) for m in values["mean"]],
        "std": None if values.get("std") is None else [float(s) for s in values["std"]],
    }


def export_backbone(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the checkpoint's evaluation backbone to ``out``; returns the JSON spec."""
    model = load_method(ckpt)
    backbone = model.eval_backbone
    spec = {
        **backbone.spec,
        "num_features": backbone.num_features,
        "method": type(model).__name__,
        "weights": "teacher" if backbone is not model.backbone else "student",
        "source_checkpoint": str(ckpt),
        **eval_input(ckpt),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.model.state_dict().items()}
    save_file(tensors, str(out / "backbone.safetensors"))
    (out / "backbone.json").write_text(json.dumps(spec, indent=2, default=list))
    return spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sslzoo export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by sslzoo fit")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--import_module", default=None, help=IMPORT_HELP)
    args = parser.parse_args(argv)
    import_trusted(args.import_module)
    spec = export_backbone(args.ckpt, args.out)
    print(
        f"exported {spec['method']} {spec['weights']} backbone ({spec['library']} "
        f"{spec['name']}, {spec['num_features']} features) to {args.out}"
    )
