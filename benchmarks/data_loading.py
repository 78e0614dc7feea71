"""Time the data work around training on CIFAR-10: decoding the 50,000 training JPEGs (one
process vs one per core) and one pass over the kNN bank loader (whole normalised batches vs the
PIL evaluation transform in N workers).

    python benchmarks/data_loading.py --data ../shared/data/cifar10-jpg.tar.gz --workers 2 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from sslzoo.datamodules import CIFAR10DataModule
from sslzoo.datamodules.images import ImageArray, decode_to_array, decode_workers, scan_folder


def timed(work: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    n = work()
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder copy or its .tar.gz")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8], help="PIL loader")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    dm = CIFAR10DataModule(args.data, batch_size=args.batch_size, pin_memory=False)
    dm.prepare_data()
    rows: list[tuple[str, int, float]] = []

    samples, _ = scan_folder(dm.image_folder() / "train", labeled=True)
    for workers in (0, decode_workers(len(samples))):
        start = time.perf_counter()
        train = decode_to_array(samples, workers=workers)
        seconds = time.perf_counter() - start
        name = f"decode training JPEGs, {max(workers, 1)} process(es)"
        rows.append((name, len(train[1]), seconds))

    dm._arrays["train"] = train  # the arrays just decoded, not a third decode
    dm.build_datasets(None, dm.eval_transform())
    count = lambda loader: sum(len(y) for _, y in loader)  # noqa: E731
    n, seconds = timed(lambda: count(dm.knn_bank_dataloader()))
    rows.append(("kNN bank: normalised batches, no workers", n, seconds))
    dm.bank_set = ImageArray(*dm.arrays("train"), transform=dm.eval_transform())
    for workers in args.workers:
        dm.num_workers = workers
        n, seconds = timed(lambda: count(dm.knn_bank_dataloader()))
        rows.append((f"kNN bank: PIL transform, {workers} workers", n, seconds))

    print("\n| work | images | seconds | images/s |\n| --- | --- | --- | --- |")
    for name, n, seconds in rows:
        print(f"| {name} | {n} | {seconds:.2f} | {n / seconds:.0f} |")


if __name__ == "__main__":
    main()
