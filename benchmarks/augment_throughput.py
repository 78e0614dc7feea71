"""Throughput of SimCLR's two-view augmentation: lightly's PIL transform in DataLoader workers
against the batched device pipeline (sslzoo.augment), alone and inside a training step.

Rows (source images per second; each image gives two views):

* ``pil``: lightly's ``SimCLRTransform`` per image in a DataLoader with N workers.
* ``device``: :func:`sslzoo.augment.twin_views` on uint8 batches cut from an in-memory tensor
  on the device (CPU, and CUDA when available).
* ``crops``: the image-folder device path: :class:`sslzoo.augment.CropViews` (crop and flip,
  uint8) per image in a DataLoader with N workers, the photometric steps of the same views on
  the device.
* ``device+compile`` (``--compile-views``): the same views through ``torch.compile``.
* ``kornia`` (``--kornia``, if importable): kornia.augmentation with the same settings; its
  ``ColorJitter`` draws one order of the four ops per call, not per image.
* ``--official``: SimCLR's official views instead of the CIFAR config's lightly views in every
  row but kornia: bicubic crops, TensorFlow's colour ops at strength 1, blur with p 0.5 and a
  kernel of a tenth of the side, zero padded (``sslzoo.methods.simclr.VIEWS``' ``pil`` and
  ``device``), e.g. at ``--size 96`` or ``224`` on synthetic images.
* with ``--step``: a full SimCLR training step (ResNet-18 with the CIFAR stem, the CIFAR-10
  config's head, loss and SGD) fed by each pipeline.

    python benchmarks/augment_throughput.py --workers 0 2 8 --step
    python benchmarks/augment_throughput.py --data ../shared/data/cifar10-jpg.tar.gz
    python benchmarks/augment_throughput.py --official --size 224 --batch-size 64

Images are synthetic (smooth random colours) unless ``--data`` points at CIFAR-10. Timing
synchronises the device only at the start and end of each measured run.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslzoo.augment import twin_views
from sslzoo.losses.contrastive import NTXentLoss
from sslzoo.methods.simclr import VIEWS as SIMCLR_VIEWS
from sslzoo.methods.simclr import SimCLR

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# configs/cifar10/simclr.yaml
SIMCLR_CIFAR = dict(
    temperature=0.5,
    num_proj_layers=2,
    proj_hidden_dim=512,
    proj_out_dim=128,
    views=SIMCLR_VIEWS.replace(
        crop_sampler="torchvision",
        crop_interpolation="bilinear",
        color_ops="torchvision",
        blur_prob=(0.0, 0.0),
        color_jitter_strength=0.5,
    ),
)
TINY = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}


class PILImages(Dataset):
    """uint8 images (N, H, W, 3) through a per-image PIL transform."""

    def __init__(self, images: np.ndarray, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        return self.transform(Image.fromarray(self.images[i])), 0


def load_images(n: int, size: int, data: str | None) -> np.ndarray:
    """``n`` uint8 images (n, size, size, 3): CIFAR-10 training images or synthetic ones."""
    if data:
        from sslzoo.datamodules import CIFAR10DataModule

        images, _ = CIFAR10DataModule(data, num_workers=0).arrays("train")
        return images[np.resize(np.arange(len(images)), n)]
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_loader(dataset: Dataset, batch: int, workers: int, device: torch.device) -> DataLoader:
    """Shuffled full batches of ``dataset`` from ``workers`` processes."""
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


OFFICIAL = SIMCLR_VIEWS  # SimCLR's official views


def pil_transform(size: int, official: bool) -> Callable:
    """SimCLR's official PIL views, or lightly's as the CIFAR config sets them."""
    if official:
        return OFFICIAL.pil(size, MEAN, STD)
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(
        input_size=size, cj_strength=0.5, gaussian_blur=0.0, normalize={"mean": MEAN, "std": STD}
    )


def pil_batches(
    images: np.ndarray, batch: int, workers: int, device: torch.device, official: bool = False
) -> Iterator[list[torch.Tensor]]:
    """View pairs from the PIL transform in a DataLoader, moved to ``device``."""
    transform = pil_transform(images.shape[1], official)
    for views, _ in worker_loader(PILImages(images, transform), batch, workers, device):
        yield [v.to(device, non_blocking=True) for v in views]


def device_batches(
    images: np.ndarray, batch: int, device: torch.device, views: nn.Module
) -> Iterator[list[torch.Tensor]]:
    """View pairs from uint8 batches cut on ``device`` and augmented there."""
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    order = torch.randperm(len(data), device=device)
    for b in range(len(data) // batch):
        yield views(data.index_select(0, order[b * batch : (b + 1) * batch]))


def crop_batches(
    images: np.ndarray, batch: int, workers: int, device: torch.device, views: nn.Module
) -> Iterator[list[torch.Tensor]]:
    """View pairs cropped per image in DataLoader workers (uint8), then photometric steps on
    ``device``."""
    from sslzoo.augment import CropViews

    dataset = PILImages(images, CropViews(views.recipes))
    for crops, _ in worker_loader(dataset, batch, workers, device):
        yield views([c.to(device, non_blocking=True) for c in crops])


def kornia_views(size: int, device: torch.device) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """kornia.augmentation with the CIFAR config's SimCLR settings (jitter strength 0.5, no
    blur)."""
    import kornia.augmentation as K

    aug = nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
    ).to(device)

    def views(x: torch.Tensor) -> list[torch.Tensor]:
        x = x.float() / 255
        return [aug(x), aug(x)]

    return views


class SimCLRStep:
    """One SimCLR training step (forward both views, NT-Xent, backward, SGD) with no host
    sync: bf16 autocast and channels_last on CUDA if asked, optional torch.compile."""

    def __init__(self, device: torch.device, args: argparse.Namespace) -> None:
        arch = {"backbone": "timm/resnet18", "backbone_kwargs": TINY} if args.tiny else {}
        arch = arch or {"backbone": "resnet18"}
        method = SimCLR(cifar_stem=True, **SIMCLR_CIFAR, **arch)
        self.net = nn.Sequential(method.backbone, method.projection_head).to(device)
        self.memory_format = torch.channels_last if args.channels_last else torch.preserve_format
        self.net = self.net.to(memory_format=self.memory_format)
        self.forward = torch.compile(self.net) if args.compile else self.net
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.SGD(
            self.net.parameters(), lr=0.12, momentum=0.9, weight_decay=5e-4, **fused
        )
        self.amp = device.type == "cuda" and args.precision == "bf16"
        self.device = device

    def __call__(self, views: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(views).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            z1, z2 = self.forward(x).float().chunk(2)
            loss = NTXentLoss(0.5)(z1, z2)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def measure(
    batches: Iterator[list[torch.Tensor]],
    n: int,
    warmup: int,
    batch: int,
    device: torch.device,
    step: SimCLRStep | None,
) -> float:
    """Source images per second over ``n`` batches after ``warmup`` batches."""
    for _ in range(warmup):
        views = next(batches)
        if step is not None:
            step(views)
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        views = next(batches)
        if step is not None:
            step(views)
    sync(device)
    return n * batch / (time.perf_counter() - start)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
        if line.startswith("model name")
    ]
    return names[0] if names else platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--batches", type=int, default=10, help="measured batches per row")
    p.add_argument("--warmup", type=int, default=2, help="batches before timing")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8])
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if any")
    p.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    p.add_argument("--data", default=None, help="CIFAR-10 root or archive (default: synthetic)")
    p.add_argument("--kornia", action="store_true", help="also time kornia.augmentation")
    p.add_argument("--step", action="store_true", help="also time full training steps")
    p.add_argument("--official", action="store_true", help="SimCLR's official views")
    p.add_argument("--step-batch-size", type=int, default=None, help="default: --batch-size")
    p.add_argument("--tiny", action="store_true", help="tiny ResNet instead of ResNet-18")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="CUDA steps")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--compile-views", action="store_true", help="also time compiled views")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [torch.device(d) for d in devices]
    bs, step_bs = args.batch_size, args.step_batch_size or args.batch_size
    images = load_images(max(bs, step_bs) * (args.batches + args.warmup), args.size, args.data)
    rows: list[tuple[str, str, str, int, float]] = []

    def run(name: str, where: torch.device, workers: str, batches: Callable) -> None:
        """Time the views alone, then (with --step) training steps fed by them."""
        for kind, b in [("views", bs)] + ([("step", step_bs)] if args.step else []):
            step = SimCLRStep(where, args) if kind == "step" else None
            rate = measure(batches(b), args.batches, args.warmup, b, where, step)
            rows.append((f"{name} {kind}", str(where), workers, b, rate))
            print(f"{name:>14} {kind:>5} on {where}: {rate:9.0f} images/s", flush=True)

    for where in devices:
        for w in args.workers:
            pil = lambda b, w=w, d=where: pil_batches(images, b, w, d, args.official)  # noqa: E731
            run("pil", where, str(w), pil)
        if args.official:
            views = OFFICIAL.device(args.size, MEAN, STD).to(where)
        else:
            views = twin_views(args.size, MEAN, STD, cj_strength=0.5, gaussian_blur=0.0)
            views = views.to(where)
        for w in args.workers:
            cropped = lambda b, w=w, d=where, v=views: crop_batches(images, b, w, d, v)  # noqa: E731
            run("crops", where, str(w), cropped)
        run("device", where, "-", lambda b, d=where, v=views: device_batches(images, b, d, v))
        if args.compile_views:
            cv = torch.compile(views, fullgraph=True)  # compiles during the warm-up batches
            compiled = lambda b, d=where, v=cv: device_batches(images, b, d, v)  # noqa: E731
            run("device+compile", where, "-", compiled)
        if args.kornia:
            kv = kornia_views(args.size, where)
            run("kornia", where, "-", lambda b, d=where, v=kv: device_batches(images, b, d, v))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"\ntorch {torch.__version__}; CPU {cpu_name()}, {torch.get_num_threads()} threads; "
          f"GPU {gpu}; {args.size} px, two SimCLR views per image "
          f"({'official' if args.official else 'CIFAR config'}), "
          f"{'CIFAR-10' if args.data else 'synthetic'} images\n")  # fmt: skip
    print("| pipeline | device | workers | batch | images/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, where, workers, b, rate in rows:
        print(f"| {name} | {where} | {workers} | {b} | {rate:.0f} |")


if __name__ == "__main__":
    main()
