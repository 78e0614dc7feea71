"""``make test`` runs the suite on two pytest-xdist workers with ``--dist loadgroup``: each
file's tests run on one worker (its module fixtures are built once), and the tests that share
the session's trained SimCLR run together wherever their files are (``tests/conftest.py``)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def worker() -> str:
    name = os.environ.get("PYTEST_XDIST_WORKER")
    if not name:
        pytest.skip("runs under make test's pytest-xdist workers")
    return name


def test_a_files_tests_carry_their_files_group(worker: str, request: pytest.FixtureRequest) -> None:
    assert request.node.nodeid.endswith("@tests.test_workers")


@pytest.mark.xdist_group("simclr_cifar")
def test_a_marked_test_keeps_its_own_group(worker: str, request: pytest.FixtureRequest) -> None:
    assert request.node.nodeid.endswith("@simclr_cifar")
