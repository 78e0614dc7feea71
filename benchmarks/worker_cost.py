"""CPU time a dataloader worker spends per image: lightly's full PIL view transform against
the image-folder device path's worker half (:class:`sslzoo.augment.CropViews`: crop and flip
only; the colour steps run on the training device), with and without JPEG decoding.

    python benchmarks/worker_cost.py                 # SimCLR, 224 px views of 500x375 images
    python benchmarks/worker_cost.py --method dino   # two global and ten local crops
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import torch
from PIL import Image

from sslzoo.methods import DINO, SimCLR

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def jpegs(n: int, width: int, height: int) -> list[bytes]:
    """``n`` JPEG files of smooth random colours (quality 90)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, height // 16, width // 16, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")
    out = []
    for image in (x.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def ms_per_image(files: list[bytes], transform: Callable, decode: bool) -> float:
    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in files]
    transform(images[0])
    start = time.perf_counter()
    for f, image in zip(files, images, strict=True):
        transform(Image.open(io.BytesIO(f)).convert("RGB") if decode else image)
    return (time.perf_counter() - start) / len(files) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["simclr", "dino"], default="simclr")
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--size", type=int, default=224, help="side of the (global) views")
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a worker
    model = SimCLR(backbone="resnet18") if args.method == "simclr" else DINO(backbone="resnet18")
    pil = model.views.pil(args.size, MEAN, STD)
    crops = model.views.worker_crops(args.size, MEAN, STD)
    files = jpegs(args.images, 500, 375)
    print(f"{args.method}: {len(crops.recipes)} views per image, {args.size} px, 500x375 JPEGs, "
          "one thread\n")  # fmt: skip
    print("| worker transform | ms / image | ms / image with JPEG decoding |")
    print("| --- | --- | --- |")
    for name, t in (("lightly PIL views", pil), ("CropViews (device path)", crops)):
        print(f"| {name} | {ms_per_image(files, t, False):.1f} | "
              f"{ms_per_image(files, t, True):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
