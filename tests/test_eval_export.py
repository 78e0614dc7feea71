"""Evaluation, export and report commands on a checkpoint written by ``sslzoo fit``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision

from sslzoo.checkpoints import load_method
from sslzoo.cli import SSLZooCLI, main
from sslzoo.datamodules import CIFAR10DataModule, ImageFolderDataModule
from sslzoo.eval import run as eval_run
from sslzoo.report import make_figure
from tests.augment_helpers import cifar_folder
from tests.conftest import REPO

CONFIG = REPO / "configs" / "quickstart" / "simclr.yaml"


def fit(root: Path, *overrides: str) -> SSLZooCLI:
    cli = SSLZooCLI(
        args=[
            "--config", str(CONFIG),
            "--trainer.default_root_dir", str(root),
            "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "2",
            "--trainer.check_val_every_n_epoch", "1",
            "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "32",
            "--data.num_workers", "0",
            *overrides,
        ],
        run=False,
    )  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> SSLZooCLI:
    return fit(tmp_path_factory.mktemp("timm_run"))


def test_datamodules_record_absolute_data_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cifar_folder(tmp_path / "cifar", per_class=1)
    monkeypatch.chdir(tmp_path)
    folder = ImageFolderDataModule(train_dir="cifar/train", val_dir="./cifar/test")
    assert folder.hparams.train_dir == folder.train_dir == str(tmp_path / "cifar" / "train")
    assert folder.hparams.val_dir == folder.val_dir == str(tmp_path / "cifar" / "test")
    assert folder.hparams.bank_dir is None and folder.bank_dir == folder.train_dir
    assert CIFAR10DataModule(root="cifar").hparams.root == str(tmp_path / "cifar")


def test_eval_knn_agrees_with_callback(timm_run: SSLZooCLI, tmp_path: Path) -> None:
    ckpt = Path(timm_run.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    out = tmp_path / "knn.json"
    result = eval_run(["knn", "--ckpt", str(ckpt), "--k", "[20]", "--temperature", "[0.1]",
                       "--output", str(out)])  # fmt: skip
    callback = float(timm_run.trainer.callback_metrics["knn/val_top1"])
    assert result["knn_top1_k20_t0.1"] == pytest.approx(callback, abs=1e-6)
    assert json.loads(out.read_text())["val_images"] == 450


def test_eval_linear_caches_features(timm_run: SSLZooCLI) -> None:
    ckpt = Path(timm_run.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    first = eval_run(["linear", "--ckpt", str(ckpt), "--epochs", "5"])
    assert list(ckpt.parent.glob("last.features-*.pt"))
    again = eval_run(["linear", "--ckpt", str(ckpt), "--epochs", "5"])
    assert 0.1 < first["linear_top1"] == again["linear_top1"]


def plain_model(spec: dict) -> torch.nn.Module:
    """Rebuild the exported backbone with timm/torchvision only, as the export docstring says."""
    if spec["library"] == "timm":
        model = timm.create_model(spec["name"], **spec["kwargs"])
    else:
        model = torchvision.models.get_model(spec["name"], weights=None, **spec["kwargs"])
        setattr(model, spec["head"], torch.nn.Identity())
    if spec["cifar_stem"]:
        model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


@pytest.mark.parametrize("backbone", ["timm", "torchvision"])
def test_export_loads_into_plain_models(backbone: str, timm_run: SSLZooCLI, tmp_path: Path) -> None:
    if backbone == "timm":
        ckpt = Path(timm_run.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    else:
        run = fit(tmp_path / "tv", "--model.backbone", "resnet18", "--model.backbone_kwargs", "{}")
        ckpt = Path(run.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    spec = json.loads((tmp_path / "export" / "backbone.json").read_text())
    assert spec["library"] == backbone
    model = plain_model(spec).eval()
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "export" / "backbone.safetensors"))
    x = torch.randn(4, 3, 16, 16)
    expected = load_method(ckpt).eval_backbone(x)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert model(x).shape[1] == spec["num_features"]


def test_report_draws_one_line_per_run(timm_run: SSLZooCLI, tmp_path: Path) -> None:
    other = fit(tmp_path / "second", "--seed_everything", "1")
    runs = [timm_run.trainer.default_root_dir, other.trainer.default_root_dir]
    fig = make_figure(runs)
    assert all(len(ax.lines) == 2 for ax in fig.axes)
    main(["report", *runs, "--out", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
