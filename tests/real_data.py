"""Train a real-data case (``tests/configs/real_data/*.yaml``) and measure its backbone before
and after, shared by the real-data tests and the tests that start from a trained backbone;
fine-tune the SimCLR case and its untrained twin on few labels (fine-tuning and
self-training tests)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sslzoo.callbacks import KNNMonitor
from sslzoo.cli import SSLZooCLI
from sslzoo.datamodules import CIFAR10DataModule
from sslzoo.eval.features import extract_features
from sslzoo.eval.finetune import finetune
from sslzoo.eval.knn import knn_accuracy
from sslzoo.eval.probes import linear_probe_accuracy

FINETUNE_SETTINGS = dict(label_fraction=0.1, epochs=15, batch_size=25, accelerator="cpu",
                         progress_bar=False)  # fmt: skip
CONFIGS = sorted((Path(__file__).parent / "configs" / "real_data").glob("*.yaml"))
SIMCLR = Path(__file__).parent / "configs" / "real_data" / "simclr.yaml"


def read_expectation(config: Path) -> tuple[str, float]:
    match = re.match(r"#\s*metric:\s*(knn|linear),\s*margin:\s*([0-9.]+)", config.read_text())
    if not match:
        raise ValueError(f"{config} must start with '# metric: knn|linear, margin: X'")
    return match.group(1), float(match.group(2))


def frozen_accuracy(model, data, metric: str, k: int, temperature: float) -> float:
    bank = extract_features(model.eval_backbone, data.knn_bank_dataloader())
    val = extract_features(model.eval_backbone, data.val_dataloader())
    if metric == "knn":
        return knn_accuracy(*bank, *val, k=k, temperature=temperature)
    return linear_probe_accuracy(*bank, *val)


@dataclass
class TrainedCase:
    """A real-data case after training: its metric before and after, the run, a checkpoint."""

    metric: str
    before: float
    after: float
    cli: SSLZooCLI
    checkpoint: Path


def train_and_compare(
    config: Path, cifar_root: str, root_dir: Path, seed: int = 0, extra: tuple[str, ...] = ()
) -> TrainedCase:
    """Train one config at one seed (``extra``: more command-line arguments), measuring its
    metric before and after; the trained run is saved as ``root_dir/<config>.ckpt``."""
    metric, _ = read_expectation(config)
    cli = SSLZooCLI(
        args=[
            "--config", str(config),
            "--data.root", cifar_root,
            "--trainer.default_root_dir", str(root_dir),
            "--seed_everything", str(seed),
            *extra,
        ],
        run=False,
    )  # fmt: skip
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    knn = next((c for c in trainer.callbacks if isinstance(c, KNNMonitor)), KNNMonitor())
    k, temperature = knn.protocols[0]
    data.build_datasets(None, data.eval_transform())
    before = frozen_accuracy(model, data, metric, k, temperature)
    trainer.fit(model, datamodule=data)
    after = frozen_accuracy(model, data, metric, k, temperature)
    root_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = root_dir / f"{config.stem}.ckpt"
    trainer.save_checkpoint(checkpoint)
    return TrainedCase(metric, before, after, cli, checkpoint)


@dataclass
class FinetunedPair:
    """The real-data SimCLR backbone and the same architecture untrained, each fine-tuned with
    SimCLR v2's recipe (its learning rate, batches of 25, 15 epochs) on 10 % of the labels of
    a 500-a-class CIFAR-10 subset (50 images a class), tested on its 5,000 test images; the
    pretrained one saved as a classifier checkpoint (a self-training teacher)."""

    data: CIFAR10DataModule
    untrained: dict
    pretrained: dict
    teacher: Path


def finetune_pair(model, cifar_root: str, seed: int, out: Path) -> FinetunedPair:
    data = CIFAR10DataModule(root=cifar_root, batch_size=256, num_workers=0, image_size=16,
                             subset_per_class=500, pin_memory=False)  # fmt: skip
    settings = dict(FINETUNE_SETTINGS, seed=seed)
    teacher = out / "finetuned.ckpt"
    after = finetune(model, data, out_dir=out, save_to=teacher, **settings)
    before = finetune(model, data, pretrained=False, **settings)
    assert after["train_images"] == before["train_images"] == 500
    return FinetunedPair(data, before, after, teacher)
