"""Evaluation, export and report commands on a checkpoint written by ``sslzoo fit``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from sslzoo.checkpoints import load_method
from sslzoo.cli import SSLZooCLI, main
from sslzoo.datamodules import CIFAR10DataModule, ImageFolderDataModule
from sslzoo.errors import MissingDataError
from sslzoo.eval.cli import run as eval_run
from sslzoo.export import export_backbone
from sslzoo.report import make_figure
from tests.augment_helpers import cifar_folder
from tests.conftest import fit


def last_ckpt(run: SSLZooCLI) -> Path:
    return Path(run.trainer.default_root_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory: pytest.TempPathFactory) -> SSLZooCLI:
    """A run started in the folder holding ``cifar/`` (2 classes x 12 images per split), given
    as the relative --data.root, on 10 images per class."""
    start = tmp_path_factory.mktemp("cifar_run")
    cifar_folder(start / "cifar", per_class=12)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(start)
        return fit(start / "run", "--data", "CIFAR10DataModule", "--data.root", "cifar",
                   "--data.subset_per_class", "10", "--data.batch_size", "8",
                   "--data.pin_memory", "false")  # fmt: skip


KNN_5 = ["--k", "[5]", "--temperature", "[0.1]"]


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


def test_eval_from_another_directory(
    cifar_run: SSLZooCLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = last_ckpt(cifar_run)
    recorded = torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]
    assert recorded["root"] == str(Path(cifar_run.trainer.default_root_dir).parents[1] / "cifar")
    monkeypatch.chdir(tmp_path)
    result = eval_run(["knn", "--ckpt", str(ckpt), *KNN_5])
    assert result["train_images"] == result["val_images"] == 2 * 10


def test_eval_data_root_keeps_the_runs_other_settings(cifar_run: SSLZooCLI, tmp_path: Path) -> None:
    other = cifar_folder(tmp_path / "other", per_class=14)
    for split in ("train", "test"):  # a third class tells this folder from the run's
        shutil.copytree(other / split / "cat", other / split / "bird")
    args = ["knn", "--ckpt", str(last_ckpt(cifar_run)), "--data.root", str(other), *KNN_5]
    result = eval_run(args)
    assert result["train_images"] == result["val_images"] == 3 * 10  # the run's subset_per_class
    with pytest.raises(SystemExit):  # typed as the datamodule's argument
        eval_run([*args, "--data.subset_per_class", "ten"])


def test_eval_data_class_chooses_another_datamodule(cifar_run: SSLZooCLI, tmp_path: Path) -> None:
    folder = cifar_folder(tmp_path, per_class=3)
    data = ["--data", "ImageFolderDataModule", "--data.train_dir", str(folder / "train"),
            "--data.val_dir", str(folder / "test"), "--data.image_size", "32",
            "--data.num_workers", "0"]  # fmt: skip
    result = eval_run(["knn", "--ckpt", str(last_ckpt(cifar_run)), *data, *KNN_5])
    assert result["train_images"] == result["val_images"] == 2 * 3  # no subset_per_class


def test_eval_old_checkpoint_with_a_relative_root(
    cifar_run: SSLZooCLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints written before roots were made absolute hold the path as it was given."""
    ckpt = torch.load(last_ckpt(cifar_run), weights_only=True)
    ckpt["datamodule_hyper_parameters"]["root"] = "cifar"
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingDataError, match=r"root='cifar', a path relative .* --data\.root"):
        eval_run(["knn", "--ckpt", str(old), *KNN_5])
    monkeypatch.chdir(Path(cifar_run.trainer.default_root_dir).parents[1])  # where it started
    assert eval_run(["knn", "--ckpt", str(old), *KNN_5])["train_images"] == 20


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
        kwargs = dict(spec["kwargs"])
        if kwargs.pop("ffn_layer", "mlp") == "swiglu":
            kwargs["mlp_layer"] = timm.layers.SwiGLUPacked
        model = timm.create_model(spec["name"], **kwargs)
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


@pytest.mark.parametrize("run", ["timm_run", "cifar_run"])
def test_export_spec_reproduces_the_eval_transform(
    run: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cli = request.getfixturevalue(run)
    main(["export", "--ckpt", str(last_ckpt(cli)), "--out", str(tmp_path)])
    spec = json.loads((tmp_path / "backbone.json").read_text())
    # as the export docstring says
    preprocess = T.Compose([
        T.Resize(spec["resize"], interpolation=T.InterpolationMode(spec["interpolation"])),
        T.CenterCrop(spec["image_size"]),
        T.ToTensor(),
        T.Normalize(spec["mean"], spec["std"]),
    ])  # fmt: skip
    pixels = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = cli.datamodule.eval_transform()(image)
    assert expected.shape[-1] == spec["image_size"]
    assert torch.allclose(preprocess(image), expected)


def test_report_draws_one_line_per_run(timm_run: SSLZooCLI, tmp_path: Path) -> None:
    other = fit(tmp_path / "second", "--seed_everything", "1")
    runs = [timm_run.trainer.default_root_dir, other.trainer.default_root_dir]
    fig = make_figure(runs)
    assert all(len(ax.lines) == 2 for ax in fig.axes)
    main(["report", *runs, "--out", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_export_where_the_runs_images_are_not(cifar_run: SSLZooCLI, tmp_path: Path) -> None:
    """An image-folder run exported on a machine without its folders: the checkpoint's
    arguments still give the input spec."""
    ckpt = torch.load(last_ckpt(cifar_run), weights_only=True)
    gone = str(tmp_path / "gone")
    ckpt["datamodule_hyper_parameters"] = {
        "_class_path": "sslzoo.datamodules.ImageFolderDataModule",
        "train_dir": gone, "val_dir": gone, "image_size": 224, "eval_resize_ratio": 256 / 224,
        "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2),
    }  # fmt: skip
    torch.save(ckpt, tmp_path / "folder.ckpt")
    spec = export_backbone(tmp_path / "folder.ckpt", tmp_path / "out")
    assert (spec["image_size"], spec["resize"], spec["interpolation"]) == (224, 256, "bicubic")
    assert spec["mean"] == [0.5, 0.4, 0.3] and spec["std"] == [0.2, 0.2, 0.2]


def test_a_run_of_the_users_own_method_exports_with_import_module(
    timm_run: SSLZooCLI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A method of the user's own, outside the package: the checkpoint may not import its
    module, the user may (``--import_module``)."""
    (tmp_path / "mine.py").write_text(
        "from sslzoo.methods import SimCLR\n\n\nclass MySimCLR(SimCLR):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = torch.load(last_ckpt(timm_run), weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "mine.MySimCLR"
    torch.save(ckpt, tmp_path / "mine.ckpt")
    export = ["export", "--ckpt", str(tmp_path / "mine.ckpt"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main(export)
    assert "pass --import_module mine" in capsys.readouterr().err
    main([*export, "--import_module", "mine"])
    spec = json.loads((tmp_path / "out" / "backbone.json").read_text())
    assert spec["method"] == "MySimCLR"
