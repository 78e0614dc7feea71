"""Imports run one way: methods use the floor (nn, losses, optim), callbacks, views and data;
none of those imports a method. Checked on the source, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

FLOOR = ("callbacks", "augment", "datamodules", "nn", "losses", "optim")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module or "")))
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("package", FLOOR)
def test_the_floor_never_imports_a_method(package: str) -> None:
    files = sorted((REPO / "sslzoo" / package).rglob("*.py"))
    assert files, package
    offenders = {
        str(f.relative_to(REPO)): sorted(
            m for m in imported_modules(f) if m.startswith("sslzoo.methods")
        )
        for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_check_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    source = REPO / "sslzoo" / "callbacks" / "layering_probe.py"
    # written inside the package so the relative import resolves as it would there
    source.write_text(
        "def f():\n    from ..methods import base\n    import sslzoo.methods.simclr\n"
    )
    try:
        assert {"sslzoo.methods.base", "sslzoo.methods.simclr"} <= imported_modules(source)
    finally:
        source.unlink()


@pytest.mark.parametrize("module", ["backbones", "pretrained", "errors", "seeding"])
def test_modules_the_base_class_reads_import_no_method_nor_checkpoint_loader(module: str) -> None:
    # sslzoo.checkpoints builds methods: reading weights from a checkpoint goes by its tensors
    found = imported_modules(REPO / "sslzoo" / f"{module}.py")
    assert {m for m in found if m.startswith(("sslzoo.methods", "sslzoo.checkpoints"))} == set()
