"""Every YAML in configs/ parses and instantiates its model, data and trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from sslzoo.cli import SSLZooCLI
from sslzoo.datamodules import SSLDataModule
from sslzoo.methods import SSLMethod
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
TRAINER_PRESETS = REPO / "configs" / "trainer"


@pytest.fixture(scope="module")
def labeled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for name in ("cat", "dog"):
        (root / name).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / name / "0.jpg")
    return root


def data_args(config: Path, folder: Path) -> list[str]:
    text = config.read_text()
    if "ImageFolderDataModule" in text:
        return ["--data.train_dir", str(folder), "--data.val_dir", str(folder)]
    if "CIFAR" in text:
        return ["--data.root", str(folder)]
    return []


@pytest.mark.parametrize(
    "config",
    [c for c in CONFIGS if c.parent != TRAINER_PRESETS],
    ids=lambda p: str(p.relative_to(REPO / "configs")),
)
def test_config_instantiates(config: Path, labeled_folder: Path, tmp_path: Path) -> None:
    with torch.device("meta"):  # the full-size networks' shapes, without drawing their weights
        cli = SSLZooCLI(
            args=["--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
            + data_args(config, labeled_folder),
            run=False,
        )
    model, data = cli.model, cli.datamodule
    assert isinstance(model, SSLMethod)
    assert isinstance(data, SSLDataModule)
    assert cli.trainer.max_epochs and cli.trainer.max_epochs > 0
    # CIFAR-10 trains on device views by default, so its methods must have them
    assert data.device_augment is (config.parent.name == "cifar10")
    assert data.views is model.views  # the CLI hands the model's recipe to the data
    if data.device_augment:
        assert data.device_views(torch.device("cpu")) is not None


@pytest.mark.parametrize("preset", ["ddp", "fsdp"])
def test_trainer_presets_compose_with_method_configs(
    preset: str, capsys: pytest.CaptureFixture
) -> None:
    from sslzoo.cli import main

    method = REPO / "configs" / "cifar10" / "simclr.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(method), "--config", str(TRAINER_PRESETS / f"{preset}.yaml"),
              "--data.root", "/data/cifar10", "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"{preset.upper()}Strategy" in printed and "sslzoo.methods.SimCLR" in printed


def test_cifar10_simclr_is_the_simclr_readme_cifar_command(labeled_folder: Path) -> None:
    """The SimCLR README's CIFAR-10 command (``--temperature=0.5 --use_blur=False
    --color_jitter_strength=0.5 --train_batch_size=512 --resnet_depth=18``), which lightly's
    CIFAR-10 benchmark repeats as ``SimCLRTransform(input_size=32, cj_strength=0.5,
    gaussian_blur=0.0)``: the views are that transform's, setting by setting."""
    config = REPO / "configs" / "cifar10" / "simclr.yaml"
    cli = SSLZooCLI(args=["--config", str(config), "--data.root", str(labeled_folder)], run=False)
    model, data = cli.model, cli.datamodule
    assert model.hparams.temperature == 0.5 and data.batch_size == 512
    assert model.hparams.backbone == "resnet18" and model.hparams.cifar_stem
    expected = {"color_jitter_prob": 0.8, "color_jitter_strength": 0.5, "crop_min_scale": 0.08,
                "grayscale_prob": 0.2, "blur_prob": (0.0, 0.0), "hflip_prob": 0.5,
                "crop_sampler": "torchvision", "color_ops": "torchvision"}  # fmt: skip
    assert {key: getattr(model.views, key) for key in expected} == expected
    assert data.image_size == 32
    (view,) = set(model.views.device(32, data.mean, data.std).recipes)
    assert view.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1)) and view.blur_prob == 0.0


# The global batch of each official ImageNet recipe (SimCLR README, BYOL byol.py, MoCo v3
# CONFIG.md, SimSiam README, SwAV swav_200ep_bs256_pretrain.sh, DINO and iBOT READMEs, MAE
# PRETRAIN.md). ``devices: auto`` is counted as the 8 GPUs of one machine.
OFFICIAL_IMAGENET_BATCH = {
    "simclr": 4096, "byol": 4096, "mocov3": 4096, "mocov3_vit": 4096, "simsiam": 512,
    "swav": 256, "dino": 1024, "ibot": 1024, "mae": 4096, "barlowtwins": 2048, "vicreg": 2048,
    "dinov2_vits14": 2048, "dinov2_vitb14": 2048, "dinov2_vitl14": 3072,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OFFICIAL_IMAGENET_BATCH))
def test_imagenet_configs_train_with_the_official_global_batch(name: str) -> None:
    """``data.batch_size`` is per device: images per device x devices x nodes x accumulated
    steps is the recipe's batch, on which the learning rate is scaled."""
    config = yaml.safe_load((REPO / "configs" / "imagenet" / f"{name}.yaml").read_text())
    trainer = config["trainer"]
    devices = 8 if trainer.get("devices", "auto") == "auto" else int(trainer["devices"])
    batch = config["data"]["init_args"]["batch_size"] * devices * trainer.get("num_nodes", 1)
    assert batch * trainer.get("accumulate_grad_batches", 1) == OFFICIAL_IMAGENET_BATCH[name]


LIGHTLY_PROTOCOL = ["simclr", "byol", "simsiam", "swav", "dino_resnet", "barlowtwins"]


@pytest.mark.parametrize("name", LIGHTLY_PROTOCOL)
def test_lightly_protocol_configs_decay_every_parameter(name: str, labeled_folder: Path) -> None:
    """lightly's CIFAR-10 benchmark builds ``SGD(params, weight_decay=5e-4)`` over every
    parameter, biases and norms too; the configs that follow it do the same."""
    config = REPO / "configs" / "cifar10" / f"{name}.yaml"
    cli = SSLZooCLI(args=["--config", str(config), "--data.root", str(labeled_folder)], run=False)
    groups = cli.model.parameter_groups()
    assert all(g["weight_decay"] > 0 for g in groups if g["params"])
    trainable = [p for p in cli.model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
