"""A checkpoint is data: ``sslzoo export`` and ``sslzoo eval`` build only the sslzoo method and
datamodule classes it names, and refuse anything else before importing or calling it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sslzoo.checkpoints import load_method, read_checkpoint
from sslzoo.cli import main
from sslzoo.errors import CheckpointError
from tests.conftest import REPO


def evil_checkpoint(folder: Path, marker: Path, **sections: Any) -> Path:
    """A file ``weights_only=True`` loads (plain values only) whose method hyper-parameters
    name ``os.system`` with a command creating ``marker``; ``sections`` replace or add parts."""
    path = folder / "evil.ckpt"
    hparams = {"_class_path": "os.system", "command": f"touch {marker}"}
    torch.save({"state_dict": {}, "hyper_parameters": hparams, **sections}, path)
    return path


def commands(ckpt: Path, out: Path) -> dict[str, list[str]]:
    return {
        "export": ["export", "--ckpt", str(ckpt), "--out", str(out)],
        "eval": ["eval", "knn", "--ckpt", str(ckpt), "--output", str(out)],
    }


@pytest.mark.parametrize("command", ["export", "eval"])
def test_command_refuses_a_class_outside_sslzoo(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker, out = tmp_path / "marker", tmp_path / "out"
    ckpt = evil_checkpoint(tmp_path, marker)
    with pytest.raises(SystemExit) as exit_:
        main(commands(ckpt, out)[command])
    assert exit_.value.code == 1
    message = capsys.readouterr().err
    assert message.startswith("error: ") and "Traceback" not in message
    assert "'os.system'" in message and str(ckpt) in message
    assert not marker.exists() and not out.exists()


def test_python_dash_m_refuses_a_class_outside_sslzoo(tmp_path: Path) -> None:
    marker, out = tmp_path / "marker", tmp_path / "out"
    ckpt = evil_checkpoint(tmp_path, marker)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # both commands at once: each spends its time importing torch and Lightning
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "sslzoo", *argv],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in commands(ckpt, out).items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, name
        assert "refusing to build 'os.system'" in stderr, stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize(
    "sections",
    [
        {"datamodule_hyper_parameters": {"_class_path": "os.system", "command": "true"}},
        # a subclass of the wrong base: a datamodule where the method belongs
        {"hyper_parameters": {"_class_path": "sslzoo.datamodules.DigitsDataModule"}},
        # a class inside an argument, which a parser given these values would build
        {
            "hyper_parameters": {
                "_class_path": "sslzoo.methods.SimCLR",
                "backbone_kwargs": {"act_layer": {"class_path": "os.system", "init_args": {}}},
            }
        },
    ],
    ids=["datamodule", "wrong-base", "nested"],
)
def test_read_checkpoint_refuses(sections: dict[str, Any], tmp_path: Path) -> None:
    ckpt = evil_checkpoint(tmp_path, tmp_path / "marker", **sections)
    with pytest.raises(CheckpointError, match="refusing to build") as info:
        read_checkpoint(ckpt)
    assert str(ckpt) in str(info.value)


def test_a_module_not_imported_is_not_imported(tmp_path: Path) -> None:
    # importing a module runs its code: only sslzoo's and already imported modules are looked in
    assert "this" not in sys.modules
    ckpt = evil_checkpoint(
        tmp_path, tmp_path / "marker", hyper_parameters={"_class_path": "this.s"}
    )
    with pytest.raises(CheckpointError, match="'this.s'"):
        load_method(ckpt)
    assert "this" not in sys.modules


class Pickled:
    """An object only a full unpickler can rebuild."""


def test_a_file_needing_the_full_unpickler_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "object": Pickled()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint sslzoo can read"):
        read_checkpoint(tmp_path / "pickled.ckpt")
