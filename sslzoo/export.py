"""``sslzoo export --ckpt RUN.ckpt --out DIR``: the evaluation backbone alone, as
``backbone.safetensors`` plus ``backbone.json`` saying how to rebuild it with plain timm or
torchvision (no sslzoo import needed)::

    spec = json.load(open("DIR/backbone.json"))
    if spec["library"] == "timm":
        model = timm.create_model(spec["name"], **spec["kwargs"])
    else:
        model = torchvision.models.get_model(spec["name"], weights=None, **spec["kwargs"])
        setattr(model, spec["head"], torch.nn.Identity())
    if spec["cifar_stem"]:
        model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file("DIR/backbone.safetensors"))
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from sslzoo.checkpoints import load_method, read_checkpoint


def export_backbone(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the checkpoint's evaluation backbone to ``out``; returns the JSON spec."""
    model = load_method(ckpt)
    backbone = model.eval_backbone
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.model.state_dict().items()}
    save_file(tensors, str(out / "backbone.safetensors"))
    dm = read_checkpoint(ckpt).get("datamodule_hyper_parameters") or {}
    spec = {
        **backbone.spec,
        "num_features": backbone.num_features,
        "method": type(model).__name__,
        "weights": "teacher" if backbone is not model.backbone else "student",
        "source_checkpoint": str(ckpt),
        "image_size": dm.get("image_size"),
    }
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
    args = parser.parse_args(argv)
    spec = export_backbone(args.ckpt, args.out)
    print(
        f"exported {spec['method']} {spec['weights']} backbone ({spec['library']} "
        f"{spec['name']}, {spec['num_features']} features) to {args.out}"
    )
