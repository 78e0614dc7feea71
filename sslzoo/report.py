"""``sslzoo report RUN_DIR... [--out report.png]``: one figure comparing runs: kNN and probe
accuracy and training loss against epoch, one line per run (read from each ``metrics.csv``)."""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from sslzoo.errors import MissingDataError
from sslzoo.runs import VERSION, versions

PANELS = (
    ("knn/val_top1", "kNN top-1 (val)"),
    ("probe/val_top1", "online probe top-1 (val)"),
    ("train/loss", "training loss"),
)


def run_folder(run_dir: str | Path) -> Path:
    """The folder holding a run's ``metrics.csv``: ``run_dir`` itself, or the newest
    ``version_N`` in it (``runs/simclr_cifar10`` means its latest run)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.csv").is_file() and versions(run_dir):
        return versions(run_dir)[-1]
    return run_dir


def run_label(run_dir: str | Path) -> str:
    """``simclr_cifar10/version_1`` for a version folder, else the folder's name."""
    folder = run_folder(run_dir).resolve()
    return f"{folder.parent.name}/{folder.name}" if VERSION.match(folder.name) else folder.name


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[float, float]]]:
    """metric -> [(epoch, value)], from a run's ``metrics.csv``; per-step values are averaged
    per epoch."""
    path = run_folder(run_dir) / "metrics.csv"
    if not path.is_file():
        raise MissingDataError(
            f"no metrics.csv in {str(path.parent)!r}: not an sslzoo run folder, or a run that "
            "has logged nothing yet (rows come every trainer.log_every_n_steps steps)"
        )
    sums: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(path) as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if not epoch:
                continue
            for name, value in row.items():
                if name not in ("epoch", "step") and value not in ("", None):
                    sums[name][float(epoch)].append(float(value))
    return {
        name: sorted((e, sum(v) / len(v)) for e, v in by_epoch.items())
        for name, by_epoch in sums.items()
    }


def make_figure(run_dirs: list[str]):
    """A matplotlib figure with one panel per metric and one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for run in run_dirs:
        metrics = read_metrics(run)
        label = run_label(run)
        for ax, (name, _) in zip(axes, PANELS, strict=True):
            if name in metrics:
                epochs, values = zip(*metrics[name], strict=True)
                ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=label)
    for ax, (_, title) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: list[str], out: str | Path) -> Path:
    """Write the comparison figure to ``out`` and return its path."""
    import matplotlib.pyplot as plt

    fig = make_figure(run_dirs)
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sslzoo report", description=__doc__)
    parser.add_argument(
        "runs", nargs="+", help="run folders (version_N, or a root: its newest version)"
    )
    parser.add_argument("--out", default="report.png", help="PNG to write")
    args = parser.parse_args(argv)
    print(f"wrote {plot_runs(args.runs, args.out)}")
