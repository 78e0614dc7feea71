"""Images/s of an image folder vs the same images packed as litdata shards, both decoded and
cut with RandomResizedCrop(224) in N dataloader workers; the time ``sslzoo data pack`` takes;
packed size vs source size.

The source is N CIFAR-10 training images upscaled to 256 px and saved as JPEG (quality 90), an
ImageNet-like folder; it is written once and kept in --work.

    python benchmarks/data_throughput.py --data ../shared/data/cifar10-jpg.tar.gz --limit 50000
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader

from sslzoo.datamodules.images import (
    ImageFiles,
    collate_skip_none,
    extract_archive,
    scan_folder,
)
from sslzoo.datamodules.pack import pack_folder
from sslzoo.datamodules.shards import StreamingImages

RESULTS = Path(__file__).parent / "results" / "data_throughput.md"


def upscale(job: tuple[str, str, int]) -> None:
    source, target, side = job
    with Image.open(source) as img:
        img.convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(target, quality=90)


def make_source(cifar_train: Path, out: Path, limit: int, side: int, workers: int) -> Path:
    """The first ``limit`` training images (classes interleaved), upscaled to ``side`` px."""
    done = out / f".done-{limit}-{side}"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    samples, classes = scan_folder(cifar_train, labeled=True)
    per_class: dict[int, list[str]] = {}
    for path, label in samples:
        per_class.setdefault(label, []).append(path)
    order = [p for group in zip(*per_class.values(), strict=False) for p in group][:limit]
    jobs = []
    for path in order:
        target = out / Path(path).parent.name / (Path(path).stem + ".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((path, str(target), side))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(upscale, jobs, chunksize=256))
    done.touch()
    return out


def folder_bytes(root: Path, pattern: str = "**/*.jpg") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern))


def images_per_second(loader: DataLoader, images: int) -> tuple[int, float]:
    """Images/s over the first ``images`` images of ``loader`` (worker start-up included)."""
    seen, start = 0, time.perf_counter()
    for views, _ in loader:
        seen += len(views)
        if seen >= images:
            break
    return seen, seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder copy or its .tar.gz")
    parser.add_argument("--limit", type=int, default=50_000, help="images to pack")
    parser.add_argument("--side", type=int, default=256, help="side of the upscaled source")
    parser.add_argument("--workers", type=int, default=2, help="loader and packing processes")
    parser.add_argument("--measure", type=int, default=3_000, help="images timed per loader")
    parser.add_argument("--rounds", type=int, default=3, help="timings of each loader")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", default=None, help="scratch folder (default: the cache)")
    args = parser.parse_args()
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    data = Path(args.data)
    root = extract_archive(data) if data.is_file() else data
    work = Path(args.work or Path(root).parent / "data_throughput")
    source = make_source(Path(root) / "train", work / "source", args.limit, args.side, args.workers)
    shards = work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    start = time.perf_counter()
    record = pack_folder(source, shards, workers=args.workers)
    pack_seconds = time.perf_counter() - start

    crop = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()])
    options = {"batch_size": args.batch_size, "num_workers": args.workers,
               "collate_fn": collate_skip_none, "drop_last": True}  # fmt: skip
    samples, _ = scan_folder(source, labeled=True)
    folder = DataLoader(ImageFiles(samples, crop), shuffle=True, **options)
    from litdata import StreamingDataLoader

    streamed = StreamingDataLoader(StreamingImages(str(shards), crop), **options)
    rates: dict[str, list[float]] = {"image folder": [], "litdata shards": []}
    for loader in (folder, streamed):
        images_per_second(loader, args.batch_size * args.workers)  # page cache, imports
    for _ in range(args.rounds):  # alternated: a shared machine's load hits both alike
        for name, loader in (("image folder", folder), ("litdata shards", streamed)):
            rates[name].append(images_per_second(loader, args.measure)[1])

    n = record["counts"]["packed"]
    source_mb, packed_mb = record["source_bytes"] / 2**20, record["shard_bytes"] / 2**20
    lines = [
        f"Data throughput, {date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores: `python benchmarks/data_throughput.py --limit {args.limit} "
        f"--workers {args.workers} --measure {args.measure} --rounds {args.rounds}`",
        "",
        f"Source: {n} CIFAR-10 training images upscaled to {args.side} px, JPEG quality 90. "
        f"Each loader: decode, RandomResizedCrop(224), flip, {args.workers} workers, batch "
        f"{args.batch_size}, first {args.measure} images (worker start included), "
        f"{args.rounds} rounds alternating the two loaders. Load average at the end: "
        f"{os.getloadavg()[0]:.1f}.",
        "",
        "| loader | images/s, each round | median |",
        "| --- | --- | --- |",
        *(
            f"| {name} | {', '.join(f'{r:.0f}' for r in runs)} | {statistics.median(runs):.0f} |"
            for name, runs in rates.items()
        ),
        "",
        "| pack (`sslzoo data pack`, original bytes) | value |",
        "| --- | --- |",
        f"| images packed | {n} |",
        f"| time | {pack_seconds:.1f} s ({n / pack_seconds:.0f} images/s, "
        f"{args.workers} workers) |",
        f"| source size | {source_mb:.1f} MiB |",
        f"| shards size | {packed_mb:.1f} MiB ({packed_mb / source_mb:.2f}x) |",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(table)


if __name__ == "__main__":
    main()
