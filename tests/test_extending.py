"""Extending sslzoo from outside the package, as README "Write your own method" shows: the
installed ``sslzoo`` command trains a subclass whose loss is swapped through ``self.criterion``
from a file in the working directory, evaluates its checkpoint, and a new method written on the
contract gets every views / optim field as a config key with its own defaults."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from examples.my_idea import DecoupledNTXent, DecoupledSimCLR, TinySiamese
from tests.conftest import REPO

SSLZOO = str(Path(sys.executable).with_name("sslzoo"))
TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
    "--data.num_workers", "0", "--data.batch_size", "16",
]  # fmt: skip


def test_decoupled_loss_is_its_formula() -> None:
    """-log(exp(s_ip / t) / sum over the negatives k != i, p of exp(s_ik / t)), averaged over
    both views' 2n rows, doubled to SimCLR's scale (a sum of two directions)."""
    torch.manual_seed(0)
    n, t = 4, 0.3
    z1, z2 = torch.randn(n, 5), torch.randn(n, 5)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        negatives = sum(torch.exp(z[i] @ z[k] / t) for k in range(2 * n) if k not in (i, p))
        total += float(-(z[i] @ z[p] / t) + torch.log(negatives))
    expected = 2 * total / (2 * n)
    assert float(DecoupledNTXent(t)(z1, z2)) == pytest.approx(expected, rel=1e-5)


def test_the_loss_hook_replaces_only_the_loss() -> None:
    torch.manual_seed(0)
    model = DecoupledSimCLR(backbone="timm/resnet18", cifar_stem=True, temperature=0.3)
    assert isinstance(model.criterion, DecoupledNTXent) and model.criterion.temperature == 0.3
    x = torch.randn(6, 3, 16, 16)
    labels = torch.zeros(6, dtype=torch.long)
    out = model.training_step(((x, x.flip(-1)), labels), 0)
    h = model.backbone(torch.cat([x, x.flip(-1)]))
    z1, z2 = model.projection_head(h).chunk(2)
    torch.testing.assert_close(out["loss"], DecoupledNTXent(0.3)(z1, z2))
    original = DecoupledSimCLR(backbone="timm/resnet18", cifar_stem=True, decoupled=False)
    assert type(original.criterion).__name__ == "NTXentLoss"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}  # nothing but the working directory to find it
    return subprocess.run(
        [SSLZOO, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_installed_command_trains_and_evaluates_a_method_from_the_working_directory(
    tmp_path: Path,
) -> None:
    shutil.copy(REPO / "examples" / "my_idea.py", tmp_path / "my_idea.py")
    config = str(REPO / "configs" / "quickstart" / "simclr.yaml")
    fit = run("fit", "--config", config, "--model", "my_idea.DecoupledSimCLR",
              "--trainer.default_root_dir", "runs/mine", *TINY, cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "runs" / "mine" / "version_0" / "checkpoints" / "last.ckpt"
    saved = yaml.safe_load((ckpt.parents[1] / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "my_idea.DecoupledSimCLR"
    assert saved["model"]["init_args"]["decoupled"] is True
    evaluated = run("eval", "knn", "--ckpt", str(ckpt), "--import_module", "my_idea",
                    cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "knn" in evaluated.stdout.lower()


def test_a_new_method_has_every_setting_as_a_config_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sslzoo.cli import main

    monkeypatch.chdir(REPO)
    config = str(REPO / "configs" / "quickstart" / "simclr.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--model", "examples.my_idea.TinySiamese",
              "--model.optim.lr", "0.2", "--model.views.solarize_prob", "[0.1, 0.0]",
              "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    defaults = TinySiamese()
    assert printed["optim"]["lr"] == 0.2
    assert printed["optim"]["weight_decay"] == 5e-4  # the quickstart config's
    assert printed["optim"]["exclude_bias_and_norm"] is False  # the method's own default
    assert printed["views"]["solarize_prob"] == [0.1, 0.0]
    assert printed["views"]["blur_prob"] == [0.0, 0.0]  # the quickstart config's
    assert set(printed["optim"]) == {f.name for f in dataclasses.fields(defaults.optim)}
    assert set(printed["views"]) == {f.name for f in dataclasses.fields(defaults.views)}
