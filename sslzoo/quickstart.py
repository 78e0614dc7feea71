"""``sslzoo quickstart``: train a method on the offline digits set and compare its backbone
with the same backbone untrained, on kNN and linear-probe accuracy."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sslzoo.eval.features import extract_features
from sslzoo.eval.knn import knn_accuracy
from sslzoo.eval.probes import linear_probe_accuracy

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "simclr.yaml"


def frozen_scores(backbone: torch.nn.Module, datamodule, k: int, temperature: float) -> dict:
    """kNN and linear-probe top-1 of frozen features on the datamodule's validation set."""
    bank = extract_features(backbone, datamodule.knn_bank_dataloader())
    val = extract_features(backbone, datamodule.val_dataloader())
    return {
        "knn": knn_accuracy(*bank, *val, k=k, temperature=temperature),
        "linear": linear_probe_accuracy(*bank, *val),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the quickstart; extra arguments are passed on to the config (e.g.
    ``--trainer.max_epochs 5``)."""
    parser = argparse.ArgumentParser(prog="sslzoo quickstart", description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="quickstart YAML")
    args, overrides = parser.parse_known_args(argv)
    if not Path(args.config).is_file():
        raise SystemExit(f"error: config {args.config!r} not found (run from a clone of sslzoo)")

    from sslzoo.callbacks import KNNMonitor
    from sslzoo.cli import SSLZooCLI

    cli = SSLZooCLI(args=["--config", args.config, *overrides], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    knn = next((c for c in trainer.callbacks if isinstance(c, KNNMonitor)), KNNMonitor())
    k, temperature = knn.protocols[0]

    data.build_datasets(None, data.eval_transform())
    print(
        f"Evaluating the untrained {model.hparams.backbone} backbone (kNN k={k}, linear probe)..."
    )
    before = frozen_scores(model.eval_backbone, data, k, temperature)

    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    minutes = (time.perf_counter() - start) / 60
    after = frozen_scores(model.eval_backbone, data, k, temperature)
    online = trainer.callback_metrics.get("probe/val_top1")

    method = type(model).__name__
    rows = [
        ("untrained backbone", before["knn"], before["linear"]),
        (f"{method}, {trainer.current_epoch} epochs", after["knn"], after["linear"]),
    ]
    print(
        f"\n{method} on {len(data.train_set)} digits in {minutes:.1f} min "
        f"(validation: {len(data.val_set)} held-out digits)"
    )
    print(f"{'backbone':<28}{'kNN top-1':>10}{'linear top-1':>14}")
    for name, knn_acc, lin_acc in rows:
        print(f"{name:<28}{knn_acc:>10.3f}{lin_acc:>14.3f}")
    if online is not None:
        print(f"online probe during training (val top-1): {float(online):.3f}")
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    print(f"\nlogs:       {log_dir}  (tensorboard --logdir {log_dir})")
    print(f"checkpoint: {log_dir / 'checkpoints' / 'last.ckpt'}")
    return {
        "before": before,
        "after": after,
        "online_probe": None if online is None else float(online),
    }
