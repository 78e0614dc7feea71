"""The benchmark command runs end to end at a toy budget and writes a well-formed table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import REPO


def test_cpu_tier_toy_budget(cifar_root: str, tmp_path: Path) -> None:
    script = str(REPO / "benchmarks" / "cifar10.py")
    cmd = [sys.executable, script, "--tier", "cpu", "--data", cifar_root,
           "--methods", "simclr", "--epochs", "1", "--out", str(tmp_path),
           "--set", "data.subset_per_class=20"]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    results = json.loads((tmp_path / "cifar10-cpu.json").read_text())
    assert len(results) == 1
    r = results[0]
    assert r["method"] == "SimCLR" and r["epochs"] == 1 and r["global_batch"] == 128
    assert r["views"] == "device"  # the SimCLR real-data config's device_augment
    for key in ("knn_top1_k200_t0.1", "knn_top1_k20_t0.07", "linear_top1"):
        assert 0.0 <= r[key] <= 1.0
    assert r["images_per_sec"] > 0 and r["peak_memory_gb"] > 0 and r["wall_minutes"] > 0
    assert set(r["versions"]) >= {"torch", "lightning", "timm", "lightly", "sslzoo"}
    table = (tmp_path / "cifar10-cpu.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| method"))
    row = next(line for line in table if line.startswith("| SimCLR"))
    assert header.count("|") == row.count("|") == 15


def load_speedrun() -> ModuleType:
    spec = importlib.util.spec_from_file_location("speedrun", REPO / "benchmarks" / "speedrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speedrun_runs_the_simclr_config_and_reads_its_knn(cifar_root: str, tmp_path: Path) -> None:
    tiny = '{"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}'
    cmd = [sys.executable, str(REPO / "benchmarks" / "speedrun.py"), "--data", cifar_root,
           "--precision", "32-true", "--channels-last", "--out", str(tmp_path), "--",
           "--data.subset_per_class", "30", "--data.batch_size", "64", "--data.num_workers", "0",
           "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
           "--model.init_args.backbone", "timm/resnet18",
           "--model.init_args.backbone_kwargs", tiny]  # fmt: skip
    done = subprocess.run(cmd, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "speedrun-device-32-true-cl.json").read_text())
    assert r["finished"] and r["epochs"] == 2 and r["projected_minutes"] is None
    assert r["knn_last_epoch"] == 1 and 0.0 <= r["knn_best"] <= 1.0
    assert r["knn_last"] <= r["knn_best"]
    # 300 images in batches of 64 with the last one dropped: 4 steps an epoch
    assert r["steps_per_epoch"] == 4 and r["last_step"] == 7
    row = (tmp_path / "speedrun-device-32-true-cl.md").read_text().splitlines()[-1]
    assert row.startswith("| device-32-true-cl |") and f"{r['knn_last']:.4f} (1)" in row
    run_dir = tmp_path / "runs" / "speedrun-device-32-true-cl" / "version_0"
    config = (run_dir / "config.yaml").read_text()
    assert (tmp_path / "speedrun-device-32-true-cl.metrics.csv").read_text() == (
        run_dir / "metrics.csv"
    ).read_text()
    assert "sslzoo.callbacks.ChannelsLast" in config and "device_augment: true" in config


def test_speedrun_budget_stops_a_run_and_projects_its_pace(tmp_path: Path) -> None:
    speedrun = load_speedrun()
    seconds, finished = speedrun.run_with_budget(
        [sys.executable, "-c", "import time; time.sleep(120)"], budget_s=1.0
    )
    assert not finished and 1.0 <= seconds < 30
    assert speedrun.run_with_budget([sys.executable, "-c", "pass"], None)[1]
    # validation at the end of epoch 9 (step 49): 5 steps an epoch; stopped at step 59 of 1000
    (tmp_path / "metrics.csv").write_text(
        "epoch,knn/val_top1,perf/images_per_sec,step\n9,0.5,,49\n11,,1000.0,59\n"
    )
    run = speedrun.read_run(tmp_path)
    assert run["steps_per_epoch"] == 5 and run["last_step"] == 59
    assert speedrun.projected_minutes(3.0, run, epochs=200) == 3.0 * 1000 / 60
    assert speedrun.max_epochs(["--trainer.max_epochs", "7"]) == 7
    assert speedrun.max_epochs(["--trainer.max_epochs=8"]) == 8
    assert speedrun.max_epochs([]) == 200  # configs/cifar10/simclr.yaml
