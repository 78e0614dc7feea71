"""Parameters and seconds per training step of each method at a config's size.

    python benchmarks/step_time.py --data ../shared/data/cifar10-jpg.tar.gz
    python benchmarks/step_time.py --data DIR --configs configs/cifar10 --steps 20

By default the configs are the real-data test configs (tiny backbones, 16 px, CPU): the table
says what one optimizer step of each method costs at the size the test suite trains. The step
time is the median over ``--steps`` timed steps after ``--warmup`` untimed ones, data loading
included, as the trainer runs them; it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]


class StepClock(L.Callback):
    """Wall time of each training step, batch fetch included (start to start)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.starts.append(time.perf_counter())


def count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def measure(config: Path, data: str, steps: int, warmup: int) -> dict:
    from sslzoo.cli import SSLZooCLI

    cli = SSLZooCLI(
        args=[
            "--config", str(config), "--data.root", data,
            "--trainer.max_steps", str(steps + warmup), "--trainer.max_epochs", "-1",
            "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir",
            "/tmp/sslzoo-step-time",
        ],
        run=False,
    )  # fmt: skip
    clock = StepClock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    times = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)][warmup:]
    model = cli.model
    return {
        "method": type(model).__name__,
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        "backbone_params": count(model.backbone),
        "trainable_params": count(model, trainable=True),
        "batch": cli.datamodule.batch_size,
        "sec_per_step": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="CIFAR-10 root, ImageFolder copy or .tar.gz")
    parser.add_argument("--configs", default=str(REPO / "tests" / "configs" / "real_data"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = [
        measure(c, args.data, args.steps, args.warmup)
        for c in sorted(Path(args.configs).glob("*.yaml"))
    ]
    device = "cuda" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntorch {torch.__version__}, {device}\n")
    print("| method | config | backbone params | trainable params | batch | s / step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | `{r['config']}` | {r['backbone_params'] / 1e6:.3f} M | "
            f"{r['trainable_params'] / 1e6:.3f} M | {r['batch']} | {r['sec_per_step']:.3f} |"
        )


if __name__ == "__main__":
    main()
