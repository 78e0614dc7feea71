"""Every command in the README's code blocks, run here at a tiny budget, in the README's order
(the ``fit`` commands make the runs that ``eval``, ``export`` and ``report`` then read), so the
README cannot drift from the code.

A command that cannot run on this machine's CPU in seconds (a GPU preset, several processes or
nodes, a compile, a benchmark) is parsed instead: its configs must load and every key must exist.
Each such case says why. A new README command falls under these rules without a change here.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from sslzoo.cli import main
from tests.augment_helpers import cifar_folder
from tests.conftest import CIFAR_ARCHIVE, REPO

# appended to every `sslzoo fit` that runs: one short epoch, no worker processes
TINY_FIT = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "1",
    "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
    "--data.batch_size", "8",
    "--data.num_workers", "0",
]  # fmt: skip
TINY_CIFAR = ["--data.subset_per_class", "4"]  # 40 training and 40 test images
TINY_QUICKSTART = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                   "--trainer.enable_progress_bar", "false"]  # fmt: skip
# appended to every `sslzoo eval PROTOCOL` that runs: a few epochs, one corruption, one shot
TINY_EVAL = {
    "linear": ["--epochs", "2"],
    "fewshot": ["--shots", "[1]", "--draws", "2"],
    "robustness": ["--corruptions", "[gaussian_noise]", "--severities", "[3]", "--epochs", "2"],
    "finetune": ["--epochs", "1", "--batch_size", "8", "--progress_bar", "false"],
    "all": ["--probe_epochs", "2", "--shots", "[1]", "--draws", "1", "--label_fractions", "[0.5]",
            "--corruptions", "[gaussian_noise]", "--severities", "[3]", "--epochs", "1",
            "--batch_size", "8", "--progress_bar", "false"],
}  # fmt: skip
GPU_PRESETS = (
    "configs/trainer/ddp.yaml",
    "configs/trainer/fsdp.yaml",
    "configs/trainer/fsdp2.yaml",
    "configs/trainer/fsdp2_shard_grad_op.yaml",
)


def readme_commands() -> list[str]:
    """The commands of the README's ``bash`` blocks: continuation lines joined, comments cut."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def how(command: str) -> tuple[str, str]:
    """("run" | "parse" | "suite", why) for a README command."""
    if command == "make test":
        return "suite", "this test suite is what make test runs"
    if command.startswith("wget "):
        return "download", "released weights: no network here"
    named = [REPO / c for c in re.findall(r"--config (\S+)", command)]
    configs = "".join(c.read_text() for c in named if c.is_file())
    if "_pretrain.pth" in command + configs or "--model.teacher_weights runs/" in command:
        return "parse", "released weights (tests/test_pretrained.py loads files in their naming)"
    if command.startswith(("torchrun", "srun")):
        return "parse", "several nodes"
    if command.startswith("python benchmarks/"):
        return "parse", "a benchmark of minutes; its results are in benchmarks/results"
    if any(p in command for p in GPU_PRESETS) and "--trainer.accelerator cpu" not in command:
        return "parse", "a GPU preset (accelerator: gpu)"
    if "--trainer.devices 2" in command:
        return "parse", "two processes: tests/test_fsdp.py trains this preset on CPU processes"
    if "--data StreamingDataModule" in command:
        return "parse", "tests/test_streaming.py trains from shards through this command's path"
    if "CompileBackbone" in command:
        return "parse", "inductor compiles for minutes on a CPU: tests/test_speed_callbacks.py"
    return "run", ""


def arguments(command: str, cifar_root: str, folders: dict[str, str] | None = None) -> list[str]:
    """The command's words with the README's placeholders filled in (``folders``: ``NAME/...``
    paths below a placeholder folder)."""
    command = command.replace("$(which sslzoo)", "sslzoo").replace("$NODE_RANK", "0")
    for name, path in (folders or {}).items():
        command = re.sub(rf"(?<![\w/]){name}/", f"{path}/", command)
    words = shlex.split(command)
    fill = {
        "DIR": cifar_root,
        "RUN.ckpt": "runs/simclr_cifar10/version_0/checkpoints/last.ckpt",
        "...": cifar_root,
        "../shared/data/cifar10-jpg.tar.gz": str(CIFAR_ARCHIVE),
    }
    return [fill.get(w, w) for w in words]


def sslzoo_part(words: list[str]) -> list[str]:
    """The arguments after ``sslzoo`` / ``python -m sslzoo`` (also behind a launcher)."""
    assert "sslzoo" in words, f"no sslzoo command in {words}"
    return words[words.index("sslzoo") + 1 :]


class Parsed(Exception):
    """Raised in place of running a script, once its arguments parsed."""


def parse_script(words: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Run a benchmark script only up to its argument parser's return."""
    real = argparse.ArgumentParser.parse_args

    def parse_only(self: argparse.ArgumentParser, args: list[str] | None = None, ns=None):  # noqa: ANN001, ANN202
        raise Parsed(real(self, args, ns))

    with monkeypatch.context() as patch, pytest.raises(Parsed) as parsed:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        patch.setattr(sys, "argv", words[1:])
        runpy.run_path(words[1], run_name="__main__")
    return parsed.value.args[0]


def run_sslzoo(args: list[str]) -> None:
    """``sslzoo ARGS`` in this process; a help or print-config exit must be a clean one."""
    try:
        main(args)
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"sslzoo {' '.join(args)} exited with {exit_.code}"


def test_every_readme_command_runs(
    cifar_root: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    # the README's relative paths, from a fresh folder
    for name in ("configs", "benchmarks", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    # the groups file of `eval knn --groups`: the 40 test images of TINY_CIFAR by index
    (tmp_path / "groups.csv").write_text(
        "index,group\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(40))
    )
    # IMAGES: a small labeled ImageFolder (train/ and val/) to pack into SHARDS
    images = cifar_folder(tmp_path / "images", per_class=12)
    (images / "test").rename(images / "val")
    folders = {"IMAGES": str(images), "SHARDS": str(tmp_path / "shards")}
    commands = readme_commands()
    assert commands[:2] == ["make demo", "make test"], "the README starts with its two commands"
    seen = {"run": 0, "parse": 0}
    for command in commands:
        kind, why = how(command)
        if kind in ("suite", "download"):
            continue
        words = arguments(command, cifar_root, folders)
        if command == "make demo":  # sslzoo quickstart, at a tiny budget
            run_sslzoo(["quickstart", *TINY_QUICKSTART])
        elif words[0] == "python" and words[1].startswith("benchmarks/"):
            parse_script(words, monkeypatch)
        elif kind == "parse":
            run_sslzoo([*sslzoo_part(words), "--print_config"])
        else:
            args = sslzoo_part(words)
            if args[0] == "fit" and "--help" not in args and not any(".help" in a for a in args):
                args += TINY_FIT + (TINY_CIFAR if "configs/cifar10/" in command else [])
            if args[0] == "eval" and "--data.root" in args:  # another datamodule: subset it too
                args += TINY_CIFAR
            if args[0] == "eval" and "--help" not in args:
                args += TINY_EVAL.get(args[1], [])
            run_sslzoo(args)
        seen[kind] += 1
        capsys.readouterr()  # one command's output at a time
    assert (tmp_path / "runs" / "simclr_cifar10" / "version_1").is_dir()  # the rerun kept v0
    assert (tmp_path / "exported" / "backbone.json").is_file()
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert seen["run"] >= 10 and seen["parse"] >= 5, seen
