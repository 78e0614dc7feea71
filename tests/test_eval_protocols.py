"""Evaluation beyond kNN and linear: RankMe, label subsets, MLP probe, few-shot, per-group
accuracy on features with known answers; the ``sslzoo eval`` protocols and the ``eval all``
report on the shared tiny checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sslzoo.errors import ConfigError
from sslzoo.eval.cli import run as eval_run
from sslzoo.eval.collapse import rankme
from sslzoo.eval.fewshot import fewshot_accuracy
from sslzoo.eval.groups import group_accuracy, read_groups
from sslzoo.eval.labels import balanced_subset, carve_validation, read_indices, write_indices
from sslzoo.eval.probes import linear_probe_accuracy

# --- RankMe ------------------------------------------------------------------------------


def matrix_with_singular_values(values: list[float], rows: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator))
    return u @ torch.diag(torch.tensor(values)) @ v.T


def test_rankme_is_the_exponential_entropy_of_the_normalised_singular_values() -> None:
    values = [5.0, 3.0, 1.0, 0.5, 0.0, 0.0]
    z = matrix_with_singular_values(values)
    p = np.array(values) / sum(values) + 1e-7
    assert rankme(z) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_rankme_counts_equal_singular_values(rank: int) -> None:
    z = matrix_with_singular_values([2.0] * rank + [0.0] * (8 - rank))
    assert rankme(z) == pytest.approx(rank, rel=1e-4)


def test_rankme_drops_under_collapse() -> None:
    torch.manual_seed(0)
    spread = torch.randn(256, 32)
    collapsed = torch.randn(256, 1) @ torch.randn(1, 32) + 1e-3 * torch.randn(256, 32)
    assert rankme(spread) > 25 and rankme(collapsed) < 2


# --- label subsets -----------------------------------------------------------------------


def test_label_subsets_are_class_balanced_deterministic_and_reproducible(tmp_path: Path) -> None:
    labels = torch.arange(1000) % 10
    subset = balanced_subset(labels, fraction=0.1, seed=3)
    assert torch.bincount(labels[subset]).tolist() == [10] * 10
    assert torch.equal(subset, balanced_subset(labels, fraction=0.1, seed=3))
    assert not torch.equal(subset, balanced_subset(labels, fraction=0.1, seed=4))
    # a class's pick does not depend on the other classes
    kept = (labels < 9).nonzero().squeeze(1)
    nine = kept[balanced_subset(labels[kept], fraction=0.1, seed=3)]
    assert torch.equal(nine, subset[labels[subset] < 9])
    shots = balanced_subset(labels, per_class=5, seed=0, exclude=subset)
    assert not set(shots.tolist()) & set(subset.tolist())
    train, val = carve_validation(labels, subset, fraction=0.2, seed=0)
    assert sorted(train.tolist() + val.tolist()) == subset.tolist()
    assert torch.bincount(labels[val]).tolist() == [2] * 10
    write_indices(tmp_path / "idx.json", train=train, val=val, label_fraction=0.1)
    assert torch.equal(read_indices(tmp_path / "idx.json", "val"), val)
    with pytest.raises(ConfigError, match="fewer than"):
        balanced_subset(labels, per_class=101)


# --- probes, few-shot, groups ------------------------------------------------------------


def xor_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes no line separates: the sign of x0 * x1 (8 features, 6 of them noise)."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return x, (x[:, 0] * x[:, 1] > 0).long()


def test_mlp_probe_separates_what_a_linear_probe_cannot() -> None:
    (x, y), (xt, yt) = xor_features(1000, 0), xor_features(400, 1)
    linear = linear_probe_accuracy(x, y, xt, yt, epochs=20, lr=0.05)
    mlp = linear_probe_accuracy(x, y, xt, yt, epochs=20, lr=0.05, head="mlp")
    assert linear < 0.7 and mlp > 0.9


def test_fewshot_known_answers() -> None:
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 5
    y, yt = torch.arange(400) % 4, torch.arange(200) % 4
    x, xt = centers[y] + torch.randn(400, 16), centers[yt] + torch.randn(200, 16)
    separable = fewshot_accuracy(x, y, xt, yt, shots=[1, 5], draws=3)
    assert separable["1"]["mean"] == separable["5"]["mean"] == 1.0
    assert separable["5"]["std"] == 0.0
    noise = torch.randn(400, 16)  # features that say nothing of the label
    chance = fewshot_accuracy(noise, y, torch.randn(200, 16), yt, shots=[5], draws=4)["5"]
    accuracies = chance["accuracies"]
    assert len(accuracies) == 4 and len(set(accuracies)) > 1  # draws differ
    assert abs(chance["mean"] - 0.25) < 0.1
    assert chance["std"] == pytest.approx(float(np.std(accuracies, ddof=1)))


def test_group_accuracy_known_answers(tmp_path: Path) -> None:
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    predicted = torch.tensor([0, 0, 1, 0, 1, 0, 0, 1])  # right: 1 1 1 0 0 0 1 1
    groups_csv = tmp_path / "groups.csv"
    groups_csv.write_text("index,group\n0,a\n1,a\n2,a\n3,b\n4,b\n5,b\n6,c\n")  # 7 in none
    groups, names = read_groups(groups_csv, [str(i) for i in range(8)])
    assert names == ["a", "b", "c"] and groups.tolist() == [0, 0, 0, 1, 1, 1, 2, -1]
    result = group_accuracy(predicted, labels, groups, names)
    assert {n: g["accuracy"] for n, g in result["per_group"].items()} == {
        "a": 1.0, "b": 0.0, "c": 1.0
    }  # fmt: skip
    assert result["worst_group"] == "b" and result["gap"] == 1.0


def test_groups_file_by_path_and_its_errors(tmp_path: Path) -> None:
    images = [str(tmp_path / "val" / f"{i}.png") for i in range(3)]
    by_path = tmp_path / "paths.csv"
    by_path.write_text(f"image,group\nval/0.png,x\n{images[2]},y\n")
    groups, names = read_groups(by_path, images, root=tmp_path)
    assert groups.tolist() == [0, -1, 1] and names == ["x", "y"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,team\n0,x\n")
    with pytest.raises(ConfigError, match=r"bad\.csv: needs a 'group' column"):
        read_groups(bad, images)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("image,group\nval/9.png,x\n")
    with pytest.raises(ConfigError, match=r"9\.png"):
        read_groups(unknown, images, root=tmp_path)


# --- the command, on the shared tiny checkpoint --------------------------------------------


def ckpt_of(run) -> Path:
    return Path(run.trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def test_eval_linear_mlp_head_and_label_fraction(timm_run) -> None:
    ckpt = str(ckpt_of(timm_run))
    mlp = eval_run(["linear", "--ckpt", ckpt, "--head", "mlp", "--epochs", "5"])
    assert 0.2 < mlp["mlp_top1"] <= 1 and mlp["head"] == "mlp"
    few = eval_run(["linear", "--ckpt", ckpt, "--epochs", "5", "--label_fraction", "0.1"])
    assert few["train_images"] == 1347 and few["label_fraction"] == 0.1
    assert 0.09 * 1347 < few["labeled_images"] < 0.11 * 1347
    assert 0 < few["collapse"]["rankme"] <= 256


def test_eval_fewshot_and_groups_from_the_command(timm_run, tmp_path: Path) -> None:
    ckpt = str(ckpt_of(timm_run))
    groups = tmp_path / "groups.csv"
    groups.write_text(
        "index,group\n" + "".join(f"{i},{'even' if i % 2 else 'odd'}\n" for i in range(450))
    )
    knn = eval_run(
        ["knn", "--ckpt", ckpt, "--k", "[20]", "--temperature", "[0.1]", "--groups", str(groups)]
    )
    per_group = knn["groups"]["knn_k20_t0.1"]["per_group"]
    assert {g["images"] for g in per_group.values()} == {225}
    mean = sum(g["accuracy"] for g in per_group.values()) / 2
    assert mean == pytest.approx(knn["knn_top1_k20_t0.1"], abs=1e-6)  # equal-sized groups
    few = eval_run(["fewshot", "--ckpt", ckpt, "--shots", "[1,5]", "--draws", "2"])
    assert set(few["fewshot"]["shots"]) == {"1", "5"}
    assert 0.1 <= few["fewshot"]["shots"]["5"]["mean"] <= 1


def test_eval_all_writes_a_report(timm_run, tmp_path: Path) -> None:
    ckpt = str(ckpt_of(timm_run))
    out = tmp_path / "report"
    groups = tmp_path / "groups.csv"
    groups.write_text("index,group\n" + "".join(f"{i},g{i % 3}\n" for i in range(450)))
    report = eval_run(["all", "--ckpt", ckpt, "--out", str(out), "--groups", str(groups),
                       "--label_fractions", "[0.1]", "--probe_epochs", "2", "--shots", "[2]",
                       "--draws", "1", "--corruptions", "[gaussian_noise]", "--severities", "[5]",
                       "--epochs", "1", "--batch_size", "32", "--progress_bar", "false",
                       "--skip", "[mlp]"])  # fmt: skip
    assert set(report["backbones"]) == {"trained", "untrained"}
    saved = json.loads((out / "report.json").read_text())
    trained = saved["backbones"]["trained"]
    assert trained["linear"]["0.1"]["labeled_images"] < 0.11 * 1347
    assert trained["finetune"]["0.1"]["train_images"] == trained["linear"]["0.1"]["labeled_images"]
    noise = trained["robustness"]["accuracy"]["linear"]["gaussian_noise"]
    assert set(noise) == {"5"} and "frost" in trained["robustness"]["left_out"]
    text = (out / "report.md").read_text()
    for row in ("| kNN k20_t0.07 |", "2-shot", "RankMe", "fine-tuned, 10% labels",
                "| gaussian_noise |", "Accuracy per group", "| 2-shot | untrained |",
                "| linear, corrupted | trained |", "| fine-tuned 10% | trained |"):  # fmt: skip
        assert row in text
    for png in ("label_fractions.png", "robustness.png", "groups.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    indices = json.loads((out / "indices" / "linear_0.1_seed0.json").read_text())
    assert indices["label_fraction"] == 0.1
    assert (out / "finetune" / "untrained" / "finetune_indices_0.1.json").is_file()
    ranks = [saved["backbones"][k]["collapse"]["rankme"] for k in ("trained", "untrained")]
    assert ranks[0] != ranks[1]


def test_robustness_at_severity_zero_is_the_clean_accuracy(timm_run) -> None:
    """The corrupted path (images in [0, 1], normalised after corrupting) at severity 0 sees
    exactly the clean test images: the classifiers fitted on clean features score the same."""
    result = eval_run(["robustness", "--ckpt", str(ckpt_of(timm_run)), "--epochs", "2",
                       "--corruptions", "[contrast]", "--severities", "[0]"])  # fmt: skip
    for summary in result["robustness"]["summary"].values():
        assert summary["drop"] == pytest.approx(0.0, abs=1e-9)
        assert summary["clean"] > 0.3
