"""kNN against brute force; the probe never sends gradient into the backbone; the monitor's
number equals an offline kNN on the same features."""

from __future__ import annotations

import math

import pytest
import torch

from sslzoo.callbacks import KNNMonitor, OnlineProbe
from sslzoo.eval.collapse import rankme
from sslzoo.eval.features import extract_features
from sslzoo.eval.knn import knn_accuracy, knn_predict
from sslzoo.eval.probes import linear_probe_accuracy
from sslzoo.methods.simclr import SimCLR
from tests.conftest import TINY_RESNET
from tests.helpers import digits, quiet_trainer


def brute_force_knn(query, bank, labels, num_classes, k, t):
    scores = torch.zeros(len(query), num_classes)
    for i, q in enumerate(query):
        sims = [
            (float(q @ b) / (q.norm() * b.norm()).item(), int(label))
            for b, label in zip(bank, labels, strict=True)
        ]
        for sim, label in sorted(sims, key=lambda s: -s[0])[:k]:
            scores[i, label] += math.exp(sim / t)
    return scores


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_knn_matches_brute_force(chunk: int) -> None:
    torch.manual_seed(0)
    query, bank = torch.randn(7, 5), torch.randn(40, 5)
    labels = torch.randint(0, 4, (40,))
    ours = knn_predict(query, bank, labels, 4, k=6, temperature=0.1, chunk_size=chunk)
    ref = brute_force_knn(query, bank, labels, 4, 6, 0.1)
    assert torch.allclose(ours, ref, rtol=1e-4)


def test_linear_probe_separable_features() -> None:
    torch.manual_seed(0)
    centers = torch.randn(3, 8) * 4
    y_train, y_test = torch.randint(0, 3, (300,)), torch.randint(0, 3, (100,))
    x_train = centers[y_train] + torch.randn(300, 8) * 0.3
    x_test = centers[y_test] + torch.randn(100, 8) * 0.3
    assert linear_probe_accuracy(x_train, y_train, x_test, y_test, epochs=20) == 1.0


def test_probe_leaves_backbone_gradients_untouched() -> None:
    torch.manual_seed(0)
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False)
    probe = OnlineProbe(num_classes=10)
    features = model.backbone(torch.randn(8, 3, 16, 16))

    class Stub:  # the parts of LightningModule the probe touches
        device = torch.device("cpu")

        @staticmethod
        def log(*args, **kwargs):
            pass

    outputs = {"features": features.detach(), "labels": torch.randint(0, 10, (8,))}
    head_before = None
    for _ in range(3):
        probe.on_train_batch_end(None, Stub, outputs, None, 0)
        head_before = head_before or [p.clone() for p in probe.head.parameters()]
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(head_before, probe.head.parameters(), strict=True)
    )


def test_monitor_agrees_with_offline_knn() -> None:
    torch.manual_seed(0)
    model = SimCLR(**TINY_RESNET, proj_hidden_dim=16, proj_out_dim=8, sync_batchnorm=False)
    data = digits(batch_size=64, views=model.views)
    knn = KNNMonitor(k=10, temperature=0.1, extra_protocols=[(20, 0.07)])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[knn, OnlineProbe()])
    trainer.fit(model, datamodule=data)
    bank = extract_features(model.eval_backbone, data.knn_bank_dataloader())
    val = extract_features(model.eval_backbone, data.val_dataloader())
    for name, k, t in (("knn/val_top1", 10, 0.1), ("knn/val_top1_k20_t0.07", 20, 0.07)):
        offline = knn_accuracy(*bank, *val, k=k, temperature=t)
        assert float(trainer.callback_metrics[name]) == pytest.approx(offline, abs=1e-6)
    assert 0.0 <= float(trainer.callback_metrics["probe/val_top1"]) <= 1.0
    # the collapse monitor: RankMe of the bank's features, the same rows as offline
    logged = float(trainer.callback_metrics["monitor/rankme"])
    assert logged == pytest.approx(rankme(bank[0]), rel=1e-4)


@pytest.mark.parametrize("shard", [0, 1])
def test_bank_shards_run_as_many_forwards_as_rank_zero(monkeypatch, shard: int) -> None:
    """Under sharding (FSDP) every forward is a collective: a rank whose share of the bank
    needs fewer batches must still run as many forwards as rank 0, or training hangs."""
    from torch.utils.data import DataLoader, TensorDataset

    import sslzoo.callbacks.knn as knn

    monkeypatch.setattr(knn, "world_size", lambda: 2)
    monkeypatch.setattr(knn, "rank", lambda: shard)
    monkeypatch.setattr(knn, "gather_rows", lambda x: [x, x])  # stands in for all_gather
    bank = TensorDataset(torch.randn(9, 4), torch.zeros(9, dtype=torch.long))
    calls: list[int] = []

    class Model:
        device = torch.device("cpu")

        def extract_features(self, images: torch.Tensor) -> torch.Tensor:
            calls.append(len(images))
            return images

    KNNMonitor.build_bank(DataLoader(bank, batch_size=2), Model())
    # rank 0 holds samples 0, 2, 4, 6, 8 (3 batches), rank 1 holds 1, 3, 5, 7 (2 batches and
    # one dropped forward)
    assert len(calls) == 3
    own = len(range(shard, 9, 2))
    assert sum(calls[: math.ceil(own / 2)]) == own


def test_probe_initialisation_ignores_the_global_random_state() -> None:
    """The probe starts from weights of its own seed: runs that drew different random numbers
    before it (another test, another rank, a resumed run) start from the same probe."""

    class Module:
        device = torch.device("cpu")

    heads = []
    for global_seed, probe_seed in [(1, 0), (2, 0), (1, 5)]:
        torch.manual_seed(global_seed)
        heads.append(OnlineProbe(num_classes=3, seed=probe_seed)._ensure(Module(), 8))
    weights = [h[1].weight for h in heads]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
