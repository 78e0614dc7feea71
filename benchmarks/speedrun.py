"""The speed goal: SimCLR, ResNet-18 with the CIFAR stem, CIFAR-10, batch 512, 200 epochs on one
GPU, timed from the command's start to its end, with the kNN top-1 (k=200, T=0.1) of the last
epoch and the best epoch read from the run's ``metrics.csv``.

    python benchmarks/speedrun.py --data DIR                 # device views, bf16
    python benchmarks/speedrun.py --data DIR --fast          # + channels_last, compiled backbone
    python benchmarks/speedrun.py --data DIR --pil           # lightly's PIL views in 8 workers
    python benchmarks/speedrun.py --data DIR -- --trainer.max_epochs 20   # any CLI override

Prints a one-row table and writes ``<out>/speedrun-<name>.{md,json}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cifar10" / "simclr.yaml"


def read_run(run_dir: Path) -> dict[str, float | None]:
    """Last and best ``knn/val_top1``, the epoch of the last one, and the mean logged
    ``perf/images_per_sec``."""
    knn: list[tuple[int, float]] = []
    rates: list[float] = []
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("knn/val_top1"):
                knn.append((int(float(row["epoch"])), float(row["knn/val_top1"])))
            if row.get("perf/images_per_sec"):
                rates.append(float(row["perf/images_per_sec"]))
    return {
        "knn_last": knn[-1][1] if knn else None,
        "knn_last_epoch": knn[-1][0] if knn else None,
        "knn_best": max(v for _, v in knn) if knn else None,
        "images_per_sec": sum(rates) / len(rates) if rates else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 root, ImageFolder copy or .tar.gz")
    parser.add_argument("--pil", action="store_true", help="lightly's PIL views in workers")
    parser.add_argument("--fast", action="store_true", help="channels_last + compiled backbone")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--name", default=None, help="result name (default from the flags)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("overrides", nargs="*", help="extra sslzoo CLI arguments, after --")
    args = parser.parse_args()
    name = args.name or "-".join(
        ["pil" if args.pil else "device", args.precision] + (["fast"] if args.fast else [])
    )
    out = Path(args.out)
    run_dir = out / "runs" / f"speedrun-{name}"
    command = [
        sys.executable, "-m", "sslzoo", "fit", "--config", str(CONFIG),
        "--data.root", args.data, "--trainer.precision", args.precision,
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    command += ["--data.device_augment", "false" if args.pil else "true"]
    if args.fast:
        command += [
            "--trainer.callbacks+=sslzoo.callbacks.ChannelsLast",
            "--trainer.callbacks+=sslzoo.callbacks.CompileBackbone",
        ]
    command += args.overrides
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    minutes = (time.perf_counter() - start) / 60
    result = {"name": name, "wall_minutes": round(minutes, 2), **read_run(run_dir)}
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["torch"] = torch.__version__
    rows = ["| run | wall (min) | kNN last (epoch) | kNN best | img/s | device |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    rows.append(
        f"| {name} | {minutes:.2f} | {fmt(result['knn_last'], '.4f')} "
        f"({result['knn_last_epoch']}) | {fmt(result['knn_best'], '.4f')} "
        f"| {fmt(result['images_per_sec'], '.0f')} | {result['device']} |"
    )
    table = "\n".join(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speedrun-{name}.md").write_text(table + "\n")
    (out / f"speedrun-{name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
