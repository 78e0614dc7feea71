"""Image datasets: files decoded lazily (unreadable ones skipped and reported) or uint8 arrays
held in memory; both yield ``(transform(image), label)``."""

from __future__ import annotations

import logging
import os
import statistics
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from sslzoo.errors import DataError, MissingDataError

try:
    import fcntl
except ImportError:  # not POSIX: appends stay whole lines, only the lock is missing
    fcntl = None

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
Transform = Callable[[Image.Image], Any]


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) as RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def report_skipped(report_file: str | None, path: str, error: Exception) -> None:
    """Warn about an unreadable image and list it in the run's report file, once per file.

    Images are read in dataloader workers, started afresh each epoch, so no process remembers
    what an earlier one reported: the report file is the record. Without one, every skip
    is warned about."""
    reason = f"{type(error).__name__}: {error}".replace("\n", " ")
    if report_file and not append_once(report_file, path, reason):
        return
    log.warning("skipping unreadable image %s (%s)", path, reason)


def append_once(report_file: str, path: str, reason: str) -> bool:
    """Append the line ``path<TAB>reason`` to ``report_file`` unless ``path`` is listed there
    already; True if it was appended.

    An exclusive lock spans the read and the append, so two workers meeting the same file
    list it once; the line goes out in one ``write`` to a file opened for appending, so lines
    of concurrent writers never interleave."""
    with open(report_file, "a+", encoding="utf-8") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        f.seek(0)
        if any(line.split("\t", 1)[0] == path for line in f.read().splitlines()):
            return False
        os.write(f.fileno(), f"{path}\t{reason}\n".encode())
    return True


class ImageFiles(Dataset):
    """``(path, label)`` samples decoded on access. An image that cannot be decoded yields
    ``None`` (dropped by :func:`collate_skip_none`) and is reported with its path."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Transform | None = None,
        report_file: str | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.report_file = report_file

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        try:
            image = read_image(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            report_skipped(self.report_file, path, error)
            return None
        return (self.transform(image) if self.transform else image), label


def check_uint8_images(images: np.ndarray) -> None:
    """Raise unless ``images`` is one uint8 array of RGB images, shape (N, H, W, 3)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )


class ImageArray(Dataset):
    """Images held in memory as one uint8 array of shape (N, H, W, 3)."""

    def __init__(
        self, images: np.ndarray, labels: Sequence[int], transform: Transform | None = None
    ) -> None:
        check_uint8_images(images)
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class NormalizedImages(Dataset):
    """In-memory uint8 images (N, H, W, 3) served exactly as torchvision's ``ToTensor`` then
    ``Normalize(mean, std)`` would serve them, without PIL: the evaluation images of a dataset
    stored at its evaluation size (CIFAR at 32 px). A DataLoader fetches a whole batch in one
    vectorised call (``__getitems__``), so no worker processes are needed."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        check_uint8_images(images)
        self.images = torch.from_numpy(images)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        """(..., H, W, 3) uint8 -> (..., 3, H, W) float: ``ToTensor``'s ``/ 255``, then
        ``Normalize``'s ``- mean`` and ``/ std``, the same float operations."""
        return images.movedim(-1, -3).float().div(255).sub_(self.mean).div_(self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._normalized(self.images[index]), int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = self._normalized(self.images[index])
        return list(zip(batch.unbind(0), self.labels[index].tolist(), strict=True))


def collate_skip_none(batch: list[Any]) -> Any:
    """Default collation after dropping samples that failed to load; None if all failed."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def existing_folder(root: str | os.PathLike) -> Path:
    """``root`` as a Path; raises if it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"image folder {str(root)!r} does not exist; check the path")
    return root


def scan_folder(
    root: str | os.PathLike, labeled: bool = True
) -> tuple[list[tuple[str, int]], list[str]]:
    """List images under ``root``.

    Labeled: one sub-folder per class (the ImageFolder layout), classes sorted by name.
    Unlabeled: every image below ``root``, label -1.
    """
    root = existing_folder(root)
    if not labeled:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise MissingDataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
        return [(str(p), -1) for p in files], []
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise MissingDataError(
            f"{str(root)!r} has no class sub-folders; a labeled image folder is "
            "ROOT/<class>/<image>"
        )
    samples, empty = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples += [(str(p), label) for p in files]
        if not files:
            empty.append(name)
    if empty:
        raise DataError(empty_classes_message(root, classes, empty))
    return samples, classes


def empty_classes_message(root: Path, classes: Sequence[str], empty: Sequence[str]) -> str:
    """Why a labeled folder with class folders holding no images cannot be used."""
    kinds = ", ".join(IMAGE_EXTENSIONS)
    if len(empty) == len(classes):
        return (
            f"none of the {len(classes)} class folders of {str(root)!r} holds an image "
            f"({kinds}); a labeled image folder is ROOT/<class>/<image>"
        )
    names = ", ".join(repr(str(root / name)) for name in empty)
    return (
        f"{len(empty)} of the {len(classes)} class folders of {str(root)!r} hold no image "
        f"({kinds}): {names}. Every sub-folder is a class: add images to these or remove them"
    )


def first_images(root: Path, count: int) -> list[Path]:
    """The first ``count`` images below ``root`` in a sorted walk, listing no more folders than
    it takes to find them."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        images = [f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        found += [Path(folder) / f for f in images]
        if len(found) >= count:
            break
    return found[:count]


def sample_images(root: str | os.PathLike, labeled: bool, count: int = 64) -> list[Path]:
    """At most ``count`` images of a folder, found without listing all of it (an ImageNet-sized
    tree takes seconds). Labeled: the first images of class folders spread evenly over the
    sorted classes; unlabeled: the first images of a sorted walk."""
    root = existing_folder(root)
    if not labeled:
        return first_images(root, count)
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        return []
    picked = classes[:: -(-len(classes) // count)]  # at most count, evenly spaced
    per_class = count // len(picked)
    return [path for folder in picked for path in first_images(folder, per_class)]


def typical_shorter_side(paths: Sequence[Path]) -> int | None:
    """Median shorter side in pixels of the images that open (only their headers are read),
    None if none does."""
    sides = []
    for path in paths:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # reported when training reads it
    return statistics.median_low(sides) if sides else None


def stratified_subset(
    samples: Sequence[tuple[Any, int]], per_class: int, seed: int = 0
) -> list[tuple[Any, int]]:
    """At most ``per_class`` samples of each label, picked with a fixed seed, in input order."""
    labels = np.array([label for _, label in samples])
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        keep += rng.permutation(idx)[:per_class].tolist()
    return [samples[i] for i in sorted(keep)]


def extract_archive(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack a .tar/.tar.gz once into the cache and return the folder it was unpacked to."""
    archive = Path(archive)
    cache = Path(cache_dir or os.environ.get("SSLZOO_CACHE", Path.home() / ".cache" / "sslzoo"))
    name = archive.name.split(".tar")[0]
    dest = cache / name
    done = dest / ".extracted"
    if done.exists() and done.read_text() == str(archive.stat().st_size):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    log.info("unpacking %s to %s", archive, dest)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, zlib.error) as error:
        reason = " ".join(str(error).split())  # tarfile's reasons span lines
        raise DataError(
            f"cannot unpack {str(archive)!r} ({type(error).__name__}: {reason}); it is damaged "
            "or incomplete: copy or download it again"
        ) from error
    done.write_text(str(archive.stat().st_size))
    return dest


DECODE_CHUNK = 500  # images a decoding process takes at a time


def _decode_chunk(paths: Sequence[str]) -> list[np.ndarray | Exception]:
    """Each image as a uint8 array (H, W, 3), or the error that stopped its decoding."""
    decoded: list[np.ndarray | Exception] = []
    for path in paths:
        try:
            decoded.append(np.asarray(read_image(path)))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            decoded.append(error)
    return decoded


def decode_workers(n_images: int) -> int:
    """Decoding processes for ``n_images``: one per available core (at most 16) when there
    are at least four chunks of work, else none (decoded in this process)."""
    if n_images < 4 * DECODE_CHUNK:
        return 0
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return min(cores, 16) if cores > 1 else 0


def decode_to_array(
    samples: Sequence[tuple[str, int]], report_file: str | None = None, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode same-sized images into one uint8 array, in order, skipping (and reporting) bad
    files. ``workers`` processes decode chunks of the list (default: :func:`decode_workers`;
    0 or 1: this process only)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    paths = [str(path) for path, _ in samples]
    workers = decode_workers(len(paths)) if workers is None else workers
    chunks = [paths[i : i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    decoded: list[np.ndarray | Exception] = []
    with tqdm(total=len(paths), desc="decoding images", leave=False, mininterval=1.0) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for part in pool.map(_decode_chunk, chunks):
                    decoded += part
                    bar.update(len(part))
        else:
            for chunk in chunks:
                decoded += _decode_chunk(chunk)
                bar.update(len(chunk))
    images, labels, kept = [], [], []
    for path, label, image in zip(paths, (label for _, label in samples), decoded, strict=True):
        if isinstance(image, Exception):
            report_skipped(report_file, path, image)
            continue
        images.append(image)
        labels.append(label)
        kept.append(path)
    if not images:
        folder = os.path.commonpath(paths)
        raise DataError(f"none of the {len(paths)} images under {folder!r} could be read")
    shapes = [image.shape for image in images]
    if len(set(shapes)) != 1:
        raise DataError(size_mismatch_message(kept, shapes))
    return np.stack(images), np.array(labels, dtype=np.int64)


def size_mismatch_message(paths: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> str:
    """Which files differ in size from the most common one (the first few, with their sizes)."""

    def px(shape: tuple[int, ...]) -> str:
        return f"{shape[1]}x{shape[0]}"  # (H, W, 3) as width x height

    common, count = Counter(shapes).most_common(1)[0]
    example = paths[shapes.index(common)]
    others = [(p, s) for p, s in zip(paths, shapes, strict=True) if s != common]
    listed = ", ".join(f"{p!r} ({px(s)})" for p, s in others[:5])
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    return (
        f"images must all have one size (they are held as one array), but {count} of "
        f"{len(paths)} are {px(common)} px (e.g. {example!r}) and these differ: {listed}{more}. "
        f"Resize them to {px(common)}, or train on the folder with ImageFolderDataModule, "
        "which takes images of any size"
    )


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = torch.from_numpy(images).float().div_(255).reshape(-1, 3)
    return x.mean(0).tolist(), x.std(0).tolist()
