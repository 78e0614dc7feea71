"""Shared fixtures: the real CIFAR-10 archive (required: missing data fails, never skips),
tiny backbones, and quiet trainers."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from sslzoo.augment.recipes import MultiCropViews

if TYPE_CHECKING:
    from sslzoo.cli import SSLZooCLI

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = Path(
    os.environ.get("SSLZOO_CIFAR10", REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz")
)

# A ResNet small enough for CPU tests: one BasicBlock per stage, widths 16-128.
TINY_RESNET = {
    "backbone": "timm/resnet18",
    "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16},
    "cifar_stem": True,
}

# Small heads of the two-view methods, for TINY_RESNET (16-8 projections).
TINY_HEADS: dict[str, dict[str, Any]] = {
    "SimCLR": {"proj_hidden_dim": 16, "proj_out_dim": 8},
    "MoCoV3": {"moco_dim": 8, "moco_mlp_dim": 16},
    "BYOL": {"projector_hidden_dim": 16, "projector_out_dim": 8, "predictor_hidden_dim": 16},
    "SimSiam": {"dim": 16, "pred_dim": 8},
    "BarlowTwins": {"projector_dims": [16, 8]},
    "VICReg": {"expander_dims": [16, 8]},
}

# SwAV on TINY_RESNET with small heads and two crop sizes (2 x 16 px, 2 x 8 px).
SMALL_SWAV = {
    **TINY_RESNET,
    "hidden_mlp": 32,
    "feat_dim": 16,
    "nmb_prototypes": 24,
    "views": MultiCropViews(nmb_crops=(2, 2), size_crops=(16, 8)),
    "sync_batchnorm": False,
}

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the 2 cores: each computes on one thread,
    # and so do the processes it starts (two threads each would oversubscribe the cores)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """CIFAR-10 unpacked from ../shared/data once per session. Fails if the archive is missing."""
    from sslzoo.datamodules.images import extract_archive

    if not CIFAR_ARCHIVE.is_file():
        pytest.fail(
            f"CIFAR-10 archive not found at {CIFAR_ARCHIVE}; set SSLZOO_CIFAR10 to its path "
            "(the real-data tests need it and must not be skipped)"
        )
    return str(extract_archive(CIFAR_ARCHIVE, tmp_path_factory.mktemp("cache")))


CONFIG = REPO / "configs" / "quickstart" / "simclr.yaml"


def fit(root: Path, *overrides: str) -> SSLZooCLI:
    """Train the quickstart SimCLR config briefly under ``root``; ``overrides`` are CLI args."""
    from sslzoo.cli import SSLZooCLI

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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist's ``--dist loadgroup`` (``make test``) a file's tests share one worker,
    so its module fixtures are built once; a test marked ``xdist_group`` itself (those that
    share the session's trained SimCLR) joins that group, whatever its file."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> SSLZooCLI:
    """SimCLR on the digits (quickstart config), 2 epochs of 2 batches: one tiny trained
    checkpoint that the evaluation, export and report tests share."""
    return fit(tmp_path_factory.mktemp("timm_run"))


@pytest.fixture(scope="session")
def simclr_cifar(cifar_root: str, tmp_path_factory: pytest.TempPathFactory):
    """The real-data SimCLR case (``tests/configs/real_data/simclr.yaml``, seed 0) trained
    once a session (:class:`tests.real_data.TrainedCase`): the real-data test checks it,
    fine-tuning and Distillation start from it."""
    from tests.real_data import SIMCLR, train_and_compare

    return train_and_compare(SIMCLR, cifar_root, tmp_path_factory.mktemp("simclr_cifar"))


@pytest.fixture(scope="session")
def finetuned_cifar(cifar_root: str, simclr_cifar, tmp_path_factory: pytest.TempPathFactory):
    """:func:`tests.real_data.finetune_pair` of the real-data SimCLR case, seed 0, once a
    session: the fine-tuning test compares the two, self-training starts from the first."""
    from tests.real_data import finetune_pair

    out = tmp_path_factory.mktemp("finetuned_cifar")
    return finetune_pair(simclr_cifar.cli.model, cifar_root, 0, out)
