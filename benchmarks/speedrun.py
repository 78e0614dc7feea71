"""The speed goal: SimCLR, ResNet-18 with the CIFAR stem, CIFAR-10, batch 512, 200 epochs on one
GPU, timed from the command's start to its end, with the kNN top-1 (k=200, T=0.1) of the last
epoch and the best epoch read from the run's ``metrics.csv``.

    python benchmarks/speedrun.py --data DIR                 # device views, bf16
    python benchmarks/speedrun.py --data DIR --channels-last # + channels-last convolutions
    python benchmarks/speedrun.py --data DIR --fast          # + channels_last, compiled backbone
    python benchmarks/speedrun.py --data DIR --pil           # lightly's PIL views in 8 workers
    python benchmarks/speedrun.py --data DIR -- --trainer.max_epochs 20   # any CLI override
    python benchmarks/speedrun.py --data DIR --budget-min 9    # stop a run still going at 9 min

Prints a one-row table and writes ``<out>/speedrun-<name>.{md,json}``. A run stopped by
``--budget-min`` (SIGTERM, then SIGKILL 30 s later) is reported as unfinished, with the step it
reached and the wall time its pace would give the whole run.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from sslzoo.runs import versions

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cifar10" / "simclr.yaml"


def read_run(run_dir: Path) -> dict[str, float | None]:
    """Last and best ``knn/val_top1``, the epoch of the last one, the mean logged
    ``perf/images_per_sec``, the last logged step, and the steps per epoch (from the step of a
    validation row, logged at its epoch's end)."""
    knn: list[tuple[int, float]] = []
    rates: list[float] = []
    last_step, steps_per_epoch = None, None
    metrics = run_dir / "metrics.csv"
    rows: list[dict[str, str]] = []
    if metrics.is_file():
        with open(metrics) as f:
            rows = list(csv.DictReader(f))
    for row in rows:
        if row.get("step"):
            last_step = max(last_step or 0, int(float(row["step"])))
        if row.get("knn/val_top1"):
            epoch = int(float(row["epoch"]))
            knn.append((epoch, float(row["knn/val_top1"])))
            steps_per_epoch = (int(float(row["step"])) + 1) / (epoch + 1)
        if row.get("perf/images_per_sec"):
            rates.append(float(row["perf/images_per_sec"]))
    return {
        "knn_last": knn[-1][1] if knn else None,
        "knn_last_epoch": knn[-1][0] if knn else None,
        "knn_best": max(v for _, v in knn) if knn else None,
        "images_per_sec": sum(rates) / len(rates) if rates else None,
        "last_step": last_step,
        "steps_per_epoch": steps_per_epoch,
    }


def run_with_budget(command: list[str], budget_s: float | None) -> tuple[float, bool]:
    """Run ``command`` in the repository; past ``budget_s`` seconds stop it (SIGTERM, SIGKILL
    30 s later). Returns its wall seconds and whether it finished; a failure raises."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO)
    try:
        code = process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return time.perf_counter() - start, False
    if code != 0:
        raise subprocess.CalledProcessError(code, command)
    return time.perf_counter() - start, True


def max_epochs(overrides: list[str]) -> int:
    """The run's epochs: a ``--trainer.max_epochs`` override, else the config's."""
    for i, arg in enumerate(overrides):
        if arg == "--trainer.max_epochs" and i + 1 < len(overrides):
            return int(overrides[i + 1])
        if arg.startswith("--trainer.max_epochs="):
            return int(arg.split("=", 1)[1])
    return int(yaml.safe_load(CONFIG.read_text())["trainer"]["max_epochs"])


def projected_minutes(minutes: float, run: dict, epochs: int) -> float | None:
    """Wall minutes of the whole run at the pace of the steps done (None before the first
    validation row gives the steps per epoch)."""
    if not run["steps_per_epoch"] or run["last_step"] is None:
        return None
    return minutes * epochs * run["steps_per_epoch"] / (run["last_step"] + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 root, ImageFolder copy or .tar.gz")
    parser.add_argument("--pil", action="store_true", help="lightly's PIL views in workers")
    parser.add_argument("--channels-last", action="store_true", help="channels-last convolutions")
    parser.add_argument("--fast", action="store_true", help="channels_last + compiled backbone")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--name", default=None, help="result name (default from the flags)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--budget-min", type=float, default=None, help="stop the run after it")
    parser.add_argument("overrides", nargs="*", help="extra sslzoo CLI arguments, after --")
    args = parser.parse_args()
    speed = ["fast"] if args.fast else ["cl"] if args.channels_last else []
    name = args.name or "-".join(["pil" if args.pil else "device", args.precision, *speed])
    out = Path(args.out)
    root = out / "runs" / f"speedrun-{name}"
    command = [
        sys.executable, "-m", "sslzoo", "fit", "--config", str(CONFIG),
        "--data.root", args.data, "--trainer.precision", args.precision,
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    command += ["--data.device_augment", "false" if args.pil else "true"]
    if args.fast or args.channels_last:
        command += ["--trainer.callbacks+=sslzoo.callbacks.ChannelsLast"]
    if args.fast:
        command += ["--trainer.callbacks+=sslzoo.callbacks.CompileBackbone"]
    command += args.overrides
    print(" ".join(command), flush=True)
    budget_s = args.budget_min * 60 if args.budget_min else None
    seconds, finished = run_with_budget(command, budget_s)
    minutes = seconds / 60
    run_dir = (versions(root) or [root])[-1]  # this run's version_N
    run = read_run(run_dir)
    if (run_dir / "metrics.csv").is_file():  # beside the tables, where a copy of them is kept
        shutil.copy(run_dir / "metrics.csv", out / f"speedrun-{name}.metrics.csv")
    epochs = max_epochs(args.overrides)
    result = {"name": name, "wall_minutes": round(minutes, 2), "finished": finished, **run}
    result["epochs"] = epochs
    result["projected_minutes"] = None if finished else projected_minutes(minutes, run, epochs)
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["torch"] = torch.__version__
    rows = ["| run | wall (min) | kNN last (epoch) | kNN best | img/s | device |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    wall = f"{minutes:.2f}"
    if not finished:
        wall += (
            f" (stopped at step {fmt(run['last_step'], 'd')}; whole run at this pace: "
            f"{fmt(result['projected_minutes'], '.1f')})"
        )
    rows.append(
        f"| {name} | {wall} | {fmt(result['knn_last'], '.4f')} "
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
