"""Pretrain methods on CIFAR-10, evaluate them with kNN and a linear probe, write a table.

Two tiers:

* ``--tier cpu``: the real-data test configurations (tiny ResNet/ViT, a CIFAR-10 subset,
  16 px), a few epochs each: about a minute per method on 2 CPU cores.
* ``--tier gpu``: ``configs/cifar10/<method>.yaml``: ResNet-18 with the CIFAR stem (ViT-S/4 for
  the ViT methods), full CIFAR-10, batch 512, 200 epochs: the protocol of lightly's CIFAR-10
  table, so the numbers sit beside theirs.

    python benchmarks/cifar10.py --tier cpu --data ../shared/data/cifar10-jpg.tar.gz
    python benchmarks/cifar10.py --tier gpu --data DIR --methods simclr byol --epochs 200

Each method runs in its own process (clean peak-memory numbers). kNN (k=200 T=0.1 and k=20
T=0.07) and the linear probe (100 epochs on frozen training features) are measured once, on the
final weights, on the test split: nothing is selected on the test set. Results go to
``benchmarks/results/cifar10-<tier>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIERS = {
    "cpu": REPO / "tests" / "configs" / "real_data",
    "gpu": REPO / "configs" / "cifar10",
}
COLUMNS = [
    ("method", "method"), ("backbone", "backbone"), ("backbone_params_m", "params (M)"),
    ("epochs", "epochs"), ("views", "views"),
    ("global_batch", "batch"), ("knn_top1_k200_t0.1", "kNN k=200"),
    ("knn_top1_k20_t0.07", "kNN k=20"), ("linear_top1", "linear"),
    ("wall_minutes", "wall (min)"), ("images_per_sec", "img/s"),
    ("peak_memory_gb", "peak mem (GB)"), ("device", "device"), ("seed", "seed"),
]  # fmt: skip


def cpu_name() -> str:
    """The CPU model and the number of threads torch uses."""
    import torch

    model = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        model = names[0] if names else model
    return f"CPU {model}, {torch.get_num_threads()} threads"


def run_one(
    config: Path, data: str, epochs: int | None, seed: int, root: Path, overrides: list[str]
) -> dict:
    """Pretrain one config and evaluate it; runs inside the child process."""
    import lightly
    import lightning
    import timm
    import torch

    import sslzoo
    from sslzoo.callbacks import Throughput
    from sslzoo.cli import SSLZooCLI
    from sslzoo.eval.features import extract_features
    from sslzoo.eval.knn import knn_accuracy
    from sslzoo.eval.probes import linear_probe_accuracy

    args = ["--config", str(config), "--data.root", data, "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(root)]  # fmt: skip
    if epochs:
        args += ["--trainer.max_epochs", str(epochs)]
    args += [f"--{item}" for item in overrides]  # KEY=VALUE, KEY+=VALUE
    cli = SSLZooCLI(args=args, run=False)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    throughput = Throughput()
    trainer.callbacks.append(throughput)
    cuda = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - start

    device = trainer.strategy.root_device
    bank = extract_features(model.eval_backbone, dm.knn_bank_dataloader(), device)
    test = extract_features(model.eval_backbone, dm.val_dataloader(), device)
    result = {
        "method": type(model).__name__,
        "config": str(config.relative_to(REPO)),
        "backbone": model.hparams.backbone,
        "backbone_kwargs": model.hparams.get("backbone_kwargs"),
        "backbone_params_m": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
        "epochs": trainer.current_epoch,
        # lightly's PIL transforms in workers, or the batched device pipeline (sslzoo.augment)
        "views": "device" if dm.device_augment else "PIL",
        "global_batch": model.global_batch_size,
        "train_images": len(dm.train_set),
        "test_images": len(dm.val_set),
        "knn_top1_k200_t0.1": knn_accuracy(*bank, *test, k=200, temperature=0.1),
        "knn_top1_k20_t0.07": knn_accuracy(*bank, *test, k=20, temperature=0.07),
        "linear_top1": linear_probe_accuracy(*bank, *test),
        "wall_minutes": wall / 60,
        "images_per_sec": throughput.images_per_sec,
        "peak_memory_gb": (
            torch.cuda.max_memory_allocated() / 2**30
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        ),
        "memory_kind": "GPU peak allocated" if cuda else "process peak RSS",
        "device": torch.cuda.get_device_name() if cuda else cpu_name(),
        "seed": seed,
        "overrides": overrides,
        "versions": {
            "sslzoo": sslzoo.__version__,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "timm": timm.__version__,
            "lightly": lightly.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
    }
    return result


def markdown(results: list[dict], tier: str) -> str:
    lines = [
        f"# CIFAR-10 benchmark, {tier} tier ({date.today().isoformat()})",
        "",
        "kNN and linear top-1 on the test split at the final epoch (no selection on test). "
        "CIFAR-10 here is the JPEG re-encoding in ../shared/data, a little below numbers on "
        "the original PNG release.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in results:
        cells = []
        for key, _ in COLUMNS:
            value = r.get(key, "")
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    if results:
        v = results[0]["versions"]
        lines += ["", "Software: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
                  f"Memory: {results[0]['memory_kind']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tier", choices=sorted(TIERS), default="cpu")
    parser.add_argument("--data", required=True, help="CIFAR-10 root, ImageFolder copy or .tar.gz")
    parser.add_argument(
        "--methods", nargs="*", help="config names (default: every config of the tier)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, e.g. trainer.precision=bf16-mixed (repeatable)",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    runs = out / "runs" / args.tier

    if args.single:
        config = Path(args.single)
        result = run_one(config, args.data, args.epochs, args.seed, runs / config.stem, args.set)
        (runs / f"{config.stem}.json").write_text(json.dumps(result, indent=2))
        return

    configs = sorted(TIERS[args.tier].glob("*.yaml"))
    if args.methods:
        configs = [c for c in configs if c.stem in args.methods]
    runs.mkdir(parents=True, exist_ok=True)
    results = []
    for config in configs:
        print(f"== {config.stem}", flush=True)
        cmd = [sys.executable, __file__, "--tier", args.tier, "--data", args.data, "--seed",
               str(args.seed), "--out", str(out), "--single", str(config)]  # fmt: skip
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        cmd += [f"--set={item}" for item in args.set]
        if subprocess.run(cmd).returncode != 0:
            print(f"!! {config.stem} failed", flush=True)
            continue
        results.append(json.loads((runs / f"{config.stem}.json").read_text()))
        print(markdown(results[-1:], args.tier).splitlines()[-4], flush=True)
    table = markdown(results, args.tier)
    (out / f"cifar10-{args.tier}.md").write_text(table)
    (out / f"cifar10-{args.tier}.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
