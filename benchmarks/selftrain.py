"""How far unlabeled images take a method with few labels: pretrain, then at each label
fraction a linear probe, fine-tuning (SimCLR v2's recipe) and self-training from the
fine-tuned network (SimCLR v2's distillation, one Noisy Student round), for the pretrained
backbone and for the same architecture untrained (``sslzoo eval all --selftrain true``).

    python benchmarks/selftrain.py --data ../shared/data/cifar10-jpg.tar.gz
    python benchmarks/selftrain.py --tier gpu --data DIR --methods simclr byol \\
        --label_fractions 0.01 0.1

``--tier cpu`` pretrains the real-data test configurations (tiny ResNet, a CIFAR-10 subset of
200 images a class at 16 px); ``--tier gpu`` the ``configs/cifar10`` ones. Fine-tuning and
self-training use their recipes' epochs (30 at 10 % of the labels) unless ``--epochs`` says
otherwise. Every number is the last epoch's test top-1: nothing is selected on the test set.
The table goes to ``benchmarks/results/selftrain-<tier>.{md,json}``; the runs and reports stay
under ``benchmarks/results/runs/selftrain-<tier>/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIERS = {"cpu": REPO / "tests" / "configs" / "real_data", "gpu": REPO / "configs" / "cifar10"}
EVALUATED = ("knn", "mlp", "fewshot", "robustness")  # left out: not what this table compares


def pretrain(config: Path, data: str, seed: int, ckpt: Path, epochs: int | None) -> None:
    """Train ``config`` and save its checkpoint at ``ckpt`` (in this process)."""
    from sslzoo.cli import SSLZooCLI

    args = ["--config", str(config), "--data.root", data, "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(ckpt.parent)]  # fmt: skip
    if epochs:
        args += ["--trainer.max_epochs", str(epochs)]
    cli = SSLZooCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.save_checkpoint(ckpt)


def rows(method: str, report: dict) -> list[dict]:
    """One row per backbone (pretrained, untrained) and label fraction."""
    found = []
    for name, backbone in report["backbones"].items():
        for fraction, tuned in backbone["finetune"].items():
            row = {"method": method, "weights": "pretrained" if name == "trained" else "untrained",
                   "label_fraction": float(fraction),
                   "labeled_images": tuned.get("train_images"),
                   "linear": backbone["linear"][fraction]["top1"],
                   "finetune": tuned["top1"]}  # fmt: skip
            for mode, run in backbone.get("selftrain", {}).get(fraction, {}).items():
                rounds = run.get("rounds", [])
                row[mode] = rounds[-1]["top1"] if rounds else None
                row[f"{mode}_unlabeled_images"] = run.get("unlabeled_images")
            found.append(row)
    return found


def markdown(results: list[dict], tier: str, seconds: float) -> str:
    head = ("| method | labels | weights | linear | fine-tune | distill | noisy student |\n"
            "|---|---|---|---|---|---|---|")  # fmt: skip

    def cell(value: float | None) -> str:
        return "left out" if value is None else f"{value:.3f}"

    lines = [
        f"# Self-training after fine-tuning, {tier} tier ({date.today().isoformat()})",
        "",
        "Test top-1 at the last epoch of each stage (nothing selected on test): linear probe "
        "and SimCLR v2 fine-tuning on the labeled subset, then students trained from scratch "
        "on the training images, labels unused, by distillation from the fine-tuned network "
        "(SimCLR v2) and by one Noisy Student round (left out: no pseudo-label reached its "
        "confidence threshold), for the pretrained backbone and the same architecture "
        "untrained. Command: `python benchmarks/selftrain.py --tier "
        f"{tier} ...`; {seconds / 60:.1f} min in all.",
        "",
        head,
    ]
    for r in results:
        labels = f"{r['label_fraction']:.0%} ({r['labeled_images']})"
        lines.append(
            f"| {r['method']} | {labels} | {r['weights']} | {cell(r['linear'])} | "
            f"{cell(r['finetune'])} | {cell(r.get('distill'))} | "
            f"{cell(r.get('noisy-student'))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tier", choices=sorted(TIERS), default="cpu")
    parser.add_argument("--data", required=True, help="CIFAR-10 root, ImageFolder copy or .tar.gz")
    parser.add_argument("--methods", nargs="*", default=["simclr", "byol"])
    parser.add_argument("--label_fractions", nargs="*", type=float, default=[0.1])
    parser.add_argument("--pretrain_epochs", type=int, default=None, help="config's if unset")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning, self-training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    runs = out / "runs" / f"selftrain-{args.tier}"
    start, results = time.perf_counter(), []
    for method in args.methods:
        config = TIERS[args.tier] / f"{method}.yaml"
        if not config.is_file():
            sys.exit(f"no {args.tier}-tier config {config}")
        ckpt = runs / method / "pretrained.ckpt"
        print(f"== {method}: pretraining", flush=True)
        pretrain(config, args.data, args.seed, ckpt, args.pretrain_epochs)
        fractions = "[" + ",".join(f"{f:g}" for f in args.label_fractions) + "]"
        skip = "[" + ",".join(EVALUATED) + "]"
        cmd = [sys.executable, "-m", "sslzoo", "eval", "all", "--ckpt", str(ckpt),
               "--data.root", args.data, "--out", str(runs / method / "eval"),
               "--label_fractions", fractions, "--skip", skip, "--selftrain", "true",
               "--seed", str(args.seed), "--progress_bar", "false"]  # fmt: skip
        if args.epochs:
            cmd += ["--epochs", str(args.epochs), "--selftrain_epochs", str(args.epochs)]
        print(f"== {method}: sslzoo eval all --selftrain true", flush=True)
        subprocess.run(cmd, check=True)
        report = json.loads((runs / method / "eval" / "report.json").read_text())
        results += rows(method, report)
    table = markdown(results, args.tier, time.perf_counter() - start)
    (out / f"selftrain-{args.tier}.md").write_text(table)
    (out / f"selftrain-{args.tier}.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
