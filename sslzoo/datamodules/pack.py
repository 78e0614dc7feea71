"""``sslzoo data pack``: an image folder written as litdata shards, each image decoded once,
unreadable files skipped and listed, exact duplicates (same decoded pixels) dropped and listed.

The output folder holds the shards (``index.json`` and ``chunk-*.bin``, read by
:class:`~sslzoo.datamodules.streaming.StreamingDataModule`), ``pack.json`` (the settings,
class names and counts; written last, so a folder without it is an unfinished pack),
``skipped_images.txt`` (``path<TAB>reason``) and ``duplicates.txt`` (``kept <- dropped``).
Each sample is ``{"image": encoded bytes, "label": class index or -1, "id": its place in the
pack, "path": the file relative to the source}``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sslzoo.datamodules.images import IMAGE_EXTENSIONS, existing_folder, scan_folder
from sslzoo.errors import ConfigError, DataError

PACK_FILE = "pack.json"
SKIPPED_FILE = "skipped_images.txt"
DUPLICATES_FILE = "duplicates.txt"
CHUNK_BYTES = "64MB"  # litdata's shard size: large enough to stream, small enough to spread
DECODE_CHUNK = 32  # images a decoding process takes at a time


@dataclass
class Packed:
    """One source file after decoding: the bytes to store and the decoded pixels' hash, or the
    reason it could not be read."""

    data: bytes | None = None
    digest: str = ""
    shorter_side: int = 0
    error: str = ""


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """``image`` scaled (aspect kept) so that its shorter side is ``size``."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def pack_one(path: str, size: int | None, quality: int) -> Packed:
    """Decode ``path`` once: hash its RGB pixels, then keep its own bytes (``size`` None) or
    the image resized to ``size`` on its shorter side and re-encoded as JPEG at ``quality``."""
    try:
        raw = Path(path).read_bytes()
        if not raw:
            return Packed(error="empty file (0 bytes)")
        with Image.open(path) as img:  # named in errors, not as a buffer
            img.load()
            image = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        return Packed(error=f"{type(error).__name__}: {error}".replace("\n", " "))
    pixels = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
    if size is None:
        return Packed(raw, pixels, min(image.size))
    image = resize_shorter_side(image, size)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Packed(out.getvalue(), pixels, min(image.size))


def _pack_chunk(args: tuple[Sequence[str], int | None, int]) -> list[Packed]:
    paths, size, quality = args
    return [pack_one(path, size, quality) for path in paths]


def decoded(paths: Sequence[str], size: int | None, quality: int, workers: int) -> Iterator[Packed]:
    """:func:`pack_one` of each path, in order; ``workers`` > 1 processes share the work."""
    chunks = [
        (paths[i : i + DECODE_CHUNK], size, quality) for i in range(0, len(paths), DECODE_CHUNK)
    ]
    workers = min(workers, len(chunks))
    if workers <= 1:
        for chunk in chunks:
            yield from _pack_chunk(chunk)
        return
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(_pack_chunk, chunks):
            yield from part


def is_labeled(source: Path) -> bool:
    """A folder whose top level holds only sub-folders (no images) is labeled by them."""
    entries = [p for p in source.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(p.is_dir() for p in entries)


def check_output(out: Path) -> None:
    """Refuse an output folder that holds anything: two packs must never mix."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        state = "a finished pack" if (out / PACK_FILE).exists() else "files (an unfinished pack?)"
        raise ConfigError(
            f"--out {str(out)!r} already holds {state}; packing into it would mix two packs: "
            "choose a new --out, or delete it first"
        )


def pack_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    size: int | None = None,
    quality: int = 95,
    workers: int = 1,
    labeled: bool | None = None,
    chunk_bytes: str = CHUNK_BYTES,
) -> dict:
    """Write the images under ``source`` as litdata shards in ``out``; returns what
    ``pack.json`` records. ``labeled`` None: labeled if ``source`` holds only folders."""
    from litdata import __version__ as litdata_version
    from litdata.streaming.writer import BinaryWriter
    from tqdm.auto import tqdm

    source, out = existing_folder(source).resolve(), Path(out).expanduser().resolve()
    if size is not None and size < 1:
        raise ConfigError(f"--size must be a positive number of pixels, got {size}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"--quality must be between 1 and 100, got {quality}")
    check_output(out)
    labeled = is_labeled(source) if labeled is None else labeled
    if labeled:
        samples, classes = scan_folder(source, labeled=True)
    else:
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples, classes = [(str(p), -1) for p in files], []
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(source)!r}")
    out.mkdir(parents=True, exist_ok=True)
    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
    seen: dict[str, str] = {}
    skipped, duplicates, sides = [], [], []
    source_bytes = packed_bytes = 0
    paths = [path for path, _ in samples]
    results = decoded(paths, size, quality, workers)
    bar = tqdm(total=len(paths), desc=f"packing {source.name}", unit="img", mininterval=1.0)
    for (path, label), item in zip(samples, results, strict=True):
        bar.update()
        source_bytes += os.path.getsize(path)
        relative = os.path.relpath(path, source)
        if item.data is None:
            skipped.append(f"{path}\t{item.error}\n")
            continue
        if item.digest in seen:
            duplicates.append(f"{seen[item.digest]} <- {path}\n")
            continue
        seen[item.digest] = path
        sample = {"image": item.data, "label": label, "id": len(seen) - 1, "path": relative}
        writer.add_item(len(seen) - 1, sample)
        packed_bytes += len(item.data)
        sides.append(item.shorter_side)
    bar.close()
    if not seen:
        raise DataError(f"none of the {len(paths)} images under {str(source)!r} could be read")
    writer.done()
    writer.merge()
    (out / SKIPPED_FILE).write_text("".join(skipped), encoding="utf-8")
    (out / DUPLICATES_FILE).write_text("".join(duplicates), encoding="utf-8")
    record = {
        "source": str(source),
        "size": size,
        "quality": quality if size is not None else None,
        "labeled": labeled,
        "classes": classes,
        "counts": {
            "found": len(paths),
            "packed": len(seen),
            "skipped": len(skipped),
            "duplicates": len(duplicates),
        },
        "shorter_side_median": statistics.median_low(sides),
        "source_bytes": source_bytes,
        "packed_image_bytes": packed_bytes,
        "shard_bytes": sum(p.stat().st_size for p in out.glob("*.bin")),
        "litdata": litdata_version,
    }
    (out / PACK_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def read_pack_record(folder: str | os.PathLike) -> dict | None:
    """``pack.json`` of a local pack, None for a URL or a folder without one."""
    if "://" in str(folder):
        return None
    path = Path(folder).expanduser() / PACK_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sslzoo data pack",
        description="Write an image folder (ImageFolder layout or any tree of images) as "
        "litdata shards for StreamingDataModule. Unreadable files are skipped and listed in "
        f"OUT/{SKIPPED_FILE}, exact duplicates dropped and listed in OUT/{DUPLICATES_FILE}.",
    )
    p.add_argument("source", metavar="SRC", help="image folder to pack")
    p.add_argument("--out", required=True, help="new (or empty) folder for the shards")
    p.add_argument(
        "--size", type=int, default=None,
        help="resize the shorter side to this many pixels and store JPEG; default: the "
        "original file bytes",
    )  # fmt: skip
    p.add_argument("--quality", type=int, default=95, help="JPEG quality with --size")
    p.add_argument(
        "--workers", type=int, default=min(os.cpu_count() or 1, 16), help="decoding processes"
    )
    p.add_argument(
        "--unlabeled", action="store_true",
        help="no labels even if SRC holds only sub-folders (default: labeled by the "
        "top-level folder names when SRC holds nothing else)",
    )  # fmt: skip
    return p


def main(argv: list[str]) -> None:
    """``sslzoo data pack SRC --out DIR ...``"""
    if not argv or argv[0] != "pack":
        what = f"unknown data command {argv[0]!r}" if argv and argv[0][0] != "-" else "usage"
        raise SystemExit(f"{what}: sslzoo data pack SRC --out DIR (see sslzoo data pack --help)")
    args = parser().parse_args(argv[1:])
    record = pack_folder(
        args.source,
        args.out,
        size=args.size,
        quality=args.quality,
        workers=args.workers,
        labeled=False if args.unlabeled else None,
    )
    counts = record["counts"]
    print(
        f"packed {counts['packed']} of {counts['found']} images into {args.out} "
        f"({record['shard_bytes'] / 2**20:.1f} MiB from {record['source_bytes'] / 2**20:.1f} MiB); "
        f"{counts['skipped']} unreadable (listed in {SKIPPED_FILE}), {counts['duplicates']} "
        f"duplicates dropped (listed in {DUPLICATES_FILE})"
    )
