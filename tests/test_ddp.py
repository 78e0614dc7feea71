"""Cross-process correctness on CPU: 2 gloo ranks x batch 4 against 1 process x batch 8.

One spawned job (tests/ddp_helpers.py) runs, on each rank: :class:`SyncBatchNorm` on shares
of a batch, then Lightning ``ddp`` fits of SimCLR, MoCo v3, SwAV and DINO for 3 steps on
fixed views, with the kNN monitor and the online probe. The single-process references run
here.

Tolerances. Every difference between the runs is float32 reduction order: batch statistics
merged from two ranks, gradients summed as (g0 + g1) / 2 instead of in one pass, negatives
in another order. That is ~1e-7 relative per operation and stays small after one step
(measured: <= 5e-6 of the distance a tensor moved), but training on 8 images with
BatchNorm amplifies it about 20x per step: after 3 steps the worst tensor differs by 1.6e-3
of its movement (SimCLR's layer3 BN bias). Two single-process runs whose batches hold the
same images in another order differ by as much (max over tensors of |diff| / |tensor|:
1.55e-3 for that reordering and for the DDP run, measured while writing this test), so it is
not a DDP effect. Hence: first step within 1e-4 of the movement, final state within 1e-2 of
it, plus an absolute floor of 1e-6 RMS for tensors that training does not move (a bias
before BatchNorm, the running mean of zero-mean features). Removing the SyncBatchNorm
conversion, DINO's centre all-reduce or SwAV's Sinkhorn all-reduce (each tried while
writing this test) makes the losses differ far beyond ``LOSS_RTOL``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sslzoo.eval.features import extract_features
from sslzoo.nn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from tests import ddp_helpers as H
from tests.helpers import free_port

FIRST_STEP_RTOL = 1e-4
FINAL_RTOL = 1e-2
RMS_FLOOR = 1e-6
LOSS_RTOL = 1e-5  # measured <= 2e-6 relative at step 3
# Barlow Twins standardises each of 8 embedding dimensions over 8 images before the
# cross-correlation, which amplifies summation-order noise: its step-3 loss differed by 1.3e-4
# relative on one thread per process (2e-6 on two)
LOSS_RTOL_OF = {"barlowtwins": 5e-4}
LOSS_ATOL = 1e-6  # SimSiam's -cos starts near 0: float noise of 3e-7 is 4e-5 of it
# per method, tensors that must be among the compared ones and must have moved
KEY_TENSORS = {
    "simclr": ["projection_head.0.weight", "backbone.model.bn1.running_var"],
    "mocov3": ["momentum_backbone.model.conv1.weight", "momentum_projector.0.weight"],
    "swav": ["prototypes.weight", "projection_head.1.running_mean"],
    "dino": ["criterion.center", "teacher_head.mlp.0.weight",
             "head.last_layer.parametrizations.weight.original1"],
    "byol": ["target_backbone.model.conv1.weight", "predictor.0.weight",
             "target_projector.1.running_mean"],
    "simsiam": ["predictor.0.weight", "projector.7.running_var"],
    "ibot": ["criterion.center", "criterion.center2", "teacher_head.mlp.0.weight",
             "masked_embed"],
    "dinov2": ["mask_token", "ibot_head.last_layer.parametrizations.weight.original1",
               "teacher_ibot_head.last_layer.parametrizations.weight.original1"],
    "mae": ["decoder_pred.weight", "mask_token", "backbone.model.blocks.0.attn.qkv.weight"],
    "barlowtwins": ["projector.0.weight", "projector.1.bias", "backbone.model.bn1.running_var"],
    "vicreg": ["expander.0.weight", "expander.1.bias", "backbone.model.bn1.running_var"],
    "distillation": ["projection.weight", "backbone.model.bn1.running_var"],
}  # fmt: skip


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the 2 ranks recorded."""
    return H.run_ddp_job(tmp_path_factory.mktemp("ddp"), free_port())


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    """The 1-process runs with the global batch."""
    return {name: H.fit(name, 1) for name in H.METHODS}


def assert_close_to_reference(
    ours: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    init: dict[str, torch.Tensor],
    rtol: float,
) -> None:
    """Every float tensor within ``rtol`` x its movement from ``init`` (+ the RMS floor);
    integer buffers equal."""
    assert ours.keys() == ref.keys()
    for key, r in ref.items():
        if not r.is_floating_point():
            assert torch.equal(ours[key], r), key
            continue
        err = (ours[key] - r).norm()
        moved = (r - init[key]).norm()
        assert err <= rtol * moved + RMS_FLOOR * r.numel() ** 0.5, (key, err, moved)


# ------------------------------------------------------------------------ SyncBatchNorm


def test_torch_sync_batchnorm_refuses_cpu(ranks: list[dict[str, Any]]) -> None:
    """The premise of sslzoo's SyncBatchNorm: torch's refuses CPU tensors under gloo."""
    for r in ranks:
        assert "GPU" in r["torch_sync_bn_error"]


@pytest.mark.parametrize("case", list(H.SYNC_BN_CASES))
def test_sync_batchnorm_matches_full_batch(ranks: list[dict[str, Any]], case: str) -> None:
    """Per-rank shares of a batch (unequal, or one rank empty) through SyncBatchNorm give the
    outputs, input gradients, summed weight/bias gradients and running statistics of one
    plain BatchNorm on the whole batch, over two training steps and one evaluation step."""
    x, upstream, weight, bias = H.sync_bn_inputs(case)
    bn_class = nn.BatchNorm2d if x.dim() == 4 else nn.BatchNorm1d
    bn = bn_class(x.shape[1], momentum=None if case == "2d" else 0.1)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    ref = H.run_batchnorm(bn, x, upstream)
    sizes = H.SYNC_BN_CASES[case]
    for rank, r in enumerate(ranks):
        got = r["sync_bn"][case]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        for key in ("out", "out2", "out_eval", "x_grad"):
            # float32, one reduction in another order: ~1e-6 on values of order 1
            torch.testing.assert_close(got[key], ref[key][lo:hi], rtol=1e-5, atol=1e-5)
        for key in ("weight_grad", "bias_grad", "running_mean", "running_var"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5)
        assert got["num_batches_tracked"] == ref["num_batches_tracked"] == 2


def test_swav_syncs_batchnorm_within_groups_of_consecutive_ranks(
    ranks: list[dict[str, Any]],
) -> None:
    """SwAV's ``syncbn_process_group_size`` (apex's grouped SyncBN): with groups of one rank,
    each rank's BatchNorm equals a plain BatchNorm on its own share, not on the whole batch."""
    x, upstream, weight, bias = H.sync_bn_inputs("1d")
    sizes = H.SYNC_BN_CASES["1d"]
    for rank, r in enumerate(ranks):
        got = r["grouped_sync_bn"]
        assert got["group_size"] == 1
        assert "syncbn_process_group_size=0" in got["bad_size_error"]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        bn = nn.BatchNorm1d(x.shape[1])
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        ref = H.run_batchnorm(bn, x[lo:hi], upstream[lo:hi])
        for key in ("out", "out2", "out_eval", "x_grad", "running_mean", "running_var"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5)
        whole = H.run_batchnorm(nn.BatchNorm1d(x.shape[1]), x, upstream)
        assert not torch.allclose(ref["running_mean"], whole["running_mean"], atol=1e-3)


def test_sync_batchnorm_is_batchnorm_on_one_process() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3)
    ours, plain = SyncBatchNorm(4), nn.BatchNorm2d(4)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, plain.running_var, rtol=0, atol=0)


def test_convert_sync_batchnorm_keeps_weights_and_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    model[1].eval()
    bn = model[1]
    names = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    tensors = [getattr(bn, n) for n in names]
    cpu = convert_sync_batchnorm(model)
    assert isinstance(cpu[1], SyncBatchNorm) and isinstance(cpu[2][0], SyncBatchNorm)
    assert all(getattr(cpu[1], n) is t for n, t in zip(names, tensors, strict=True))
    assert not cpu[1].training and cpu[2][0].training
    assert convert_sync_batchnorm(cpu)[1] is cpu[1]  # already converted: left alone
    # on CUDA torch's own class is used (conversion itself needs no GPU)
    gpu = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(2)), device=torch.device("cuda"))
    assert type(gpu[0]) is nn.SyncBatchNorm


# ------------------------------------------------------------------------- the methods


@pytest.mark.parametrize("name", H.METHODS)
def test_ddp_matches_single_process(
    ranks: list[dict[str, Any]], single: dict[str, dict[str, Any]], name: str
) -> None:
    """2 ranks x 4 images train like 1 process x 8: same batches, losses, first-step and
    final weights and buffers (EMA teachers, BN statistics, DINO's centre, SwAV's prototypes),
    and SwAV's queue; both ranks hold the same state."""
    ref, r0, r1 = single[name], ranks[0][name], ranks[1][name]
    assert (ref["world_size"], r0["world_size"], r1["world_size"]) == (1, 2, 2)
    # every BatchNorm is the CPU SyncBatchNorm in the 2-rank run (the ViT methods have none)
    assert r0["sync_bn_layers"] == r0["batchnorm_layers"]
    vits = ("dino", "ibot", "mae", "dinov2")
    assert (r0["sync_bn_layers"] > 0) == (name not in vits) and ref["sync_bn_layers"] == 0
    # the two ranks' batches of each step are the single process's batch
    for step, batch in enumerate(ref["batches"]):
        union = torch.cat([r0["batches"][step], r1["batches"][step]]).sort().values
        torch.testing.assert_close(union, batch.sort().values, rtol=0, atol=0)
    # each rank's loss is its batch mean; their mean is the global batch mean
    losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"], strict=True)]
    rtol = LOSS_RTOL_OF.get(name, LOSS_RTOL)
    assert losses == pytest.approx(ref["losses"], rel=rtol, abs=LOSS_ATOL)
    assert len(losses) == H.STEPS
    if name == "distillation":  # the student moves towards the frozen teacher's features
        assert ref["losses"][-1] < ref["losses"][0]

    init = H.build_method(name).state_dict()
    assert_close_to_reference(r0["first_state"], ref["first_state"], init, FIRST_STEP_RTOL)
    assert_close_to_reference(r0["state"], ref["state"], init, FINAL_RTOL)
    for key in KEY_TENSORS[name]:
        moved = (ref["state"][key] - init[key]).norm()
        assert moved > 1e3 * RMS_FLOOR * init[key].numel() ** 0.5, key
    # DDP keeps the ranks identical: same averaged gradients, same all-reduced statistics
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key

    if name == "swav":
        # each rank queues its own embeddings, newest batch first: rank r holds the rows r,
        # r + 2, ... of each global batch in the single process's queue
        q0, q1, q = r0["queue"], r1["queue"], ref["queue"]
        crops, length, dim = q.shape
        local = H.GLOBAL_BATCH // H.WORLD
        merged = torch.stack([q0, q1]).view(2, crops, length // H.GLOBAL_BATCH, local, dim)
        merged = merged.permute(1, 2, 3, 0, 4).reshape(crops, length, dim)
        torch.testing.assert_close(merged, q, rtol=0, atol=1e-4)  # unit vectors; see header


# ----------------------------------------------------------------- kNN monitor and probe


def offline_bank(name: str, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation features of the whole bank, in order, from weights ``state``."""
    model = H.build_method(name)
    model.load_state_dict(state)
    data = H.ViewsDataModule(name, H.GLOBAL_BATCH)
    return extract_features(model.eval_backbone, data.knn_bank_dataloader())


@pytest.mark.parametrize("name", H.METHODS)
def test_knn_monitor_covers_whole_sets_on_every_rank(
    ranks: list[dict[str, Any]], single: dict[str, dict[str, Any]], name: str
) -> None:
    """Each rank's bank is the whole bank in order (its own share plus the other rank's);
    the counts cover the 13 validation images once (rank 1's padded repeat left out) and
    match the single process; both ranks log the same accuracy."""
    ref = single[name]
    for r in ranks:
        bank, labels = offline_bank(name, r[name]["state"])
        # the same weights: only batch composition differs (3 vs 10 images per call)
        torch.testing.assert_close(r[name]["bank"], bank, rtol=1e-5, atol=1e-5)
        assert torch.equal(r[name]["bank_labels"], labels)
        assert r[name]["knn_counts"] == ref["knn_counts"]
        assert r[name]["knn_counts"][1] == H.VAL_SIZE
        assert r[name]["metrics"]["knn/val_top1"] == ref["metrics"]["knn/val_top1"]


@pytest.mark.parametrize("name", H.METHODS)
def test_online_probe_is_identical_on_every_rank(
    ranks: list[dict[str, Any]], single: dict[str, dict[str, Any]], name: str
) -> None:
    """Both ranks' probes are the same tensors, close to the single process's probe trained
    on the same global batches; validation counts cover the whole set."""
    ref = single[name]
    heads = [r[name]["probe_head"] for r in ranks]
    for key, value in heads[0].items():
        assert torch.equal(value, heads[1][key]), key
        if value.is_floating_point():
            # features differ by the float noise of the header, probe trained 3 steps on them
            torch.testing.assert_close(value, ref["probe_head"][key], rtol=1e-3, atol=1e-4)
    for r in ranks:
        assert r[name]["probe_counts"] == ref["probe_counts"]
        assert r[name]["probe_counts"][1] == H.VAL_SIZE
