"""The benchmark command runs end to end at a toy budget and writes a well-formed table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_cpu_tier_toy_budget(cifar_root: str, tmp_path: Path) -> None:
    script = str(REPO / "benchmarks" / "cifar10.py")
    cmd = [sys.executable, script, "--tier", "cpu", "--data", cifar_root,
           "--methods", "simclr", "--epochs", "1", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    results = json.loads((tmp_path / "cifar10-cpu.json").read_text())
    assert len(results) == 1
    r = results[0]
    assert r["method"] == "SimCLR" and r["epochs"] == 1 and r["global_batch"] == 128
    assert r["views"] == "PIL"  # the SimCLR real-data config keeps lightly's transform
    for key in ("knn_top1_k200_t0.1", "knn_top1_k20_t0.07", "linear_top1"):
        assert 0.0 <= r[key] <= 1.0
    assert r["images_per_sec"] > 0 and r["peak_memory_gb"] > 0 and r["wall_minutes"] > 0
    assert set(r["versions"]) >= {"torch", "lightning", "timm", "lightly", "sslzoo"}
    table = (tmp_path / "cifar10-cpu.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| method"))
    row = next(line for line in table if line.startswith("| SimCLR"))
    assert header.count("|") == row.count("|") == 15
