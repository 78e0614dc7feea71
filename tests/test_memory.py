"""benchmarks/memory.py: the DINO ViT-B/16 counts against the architecture written out, and
FSDP's per-rank share against DDP's divided by the world size."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType

import pytest

from tests.conftest import REPO


def load_benchmark() -> ModuleType:
    name = "benchmarks_memory"
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


memory = load_benchmark()


def vit_b16_params() -> int:
    """timm ViT-B/16 without classifier: patch embedding, class token, 197 positions, 12 blocks
    (2 LayerNorms, qkv, projection, 2-layer MLP of width 3072), final LayerNorm."""
    d, mlp = 768, 3072
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    return (3 * 16 * 16 * d + d) + d + 197 * d + 12 * block + 2 * d


def dino_head_params(out_dim: int = 65536) -> tuple[int, int]:
    """(all, frozen) parameters of the official DINOHead: Linear 768-2048-2048-256 with biases,
    then the weight-normalised last layer: v (out_dim x 256) and g (out_dim, frozen)."""
    mlp = (768 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 256 + 256)
    return mlp + out_dim * 256 + out_dim, out_dim


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, int], object]:
    return {(r.strategy, r.world): r for w in (1, 2, 4, 8) for r in memory.count(w)}


def test_ddp_counts_are_the_models_numel(rows: dict) -> None:
    head, frozen = dino_head_params()
    student = vit_b16_params() + head
    model = memory.build_dino()
    assert sum(p.numel() for p in model.parameters()) == 2 * student  # student + teacher
    ddp = rows[("DDP", 1)]
    assert ddp.params == 4 * 2 * student
    assert ddp.grads == 4 * (student - frozen)  # the teacher and g get no gradient
    assert ddp.optimizer == 2 * ddp.grads  # AdamW's two moments
    for world in (2, 4, 8):
        assert rows[("DDP", world)] == memory.Row("DDP", world, *memory.state_bytes(model), 0)
        assert rows[("DDP", world)].total == ddp.total  # replicated: no saving


def test_fsdp_per_rank_is_ddp_over_world_size(rows: dict) -> None:
    model = memory.build_dino()
    shapes = [p.shape for p in model.parameters()]
    trainable = [p.shape for p in model.parameters() if p.requires_grad]
    assert rows[("FSDP", 1)].total == rows[("DDP", 1)].total
    for world in (2, 4, 8):
        fsdp, ddp = rows[("FSDP", world)], rows[("DDP", world)]
        # rank 0 holds ceil(rows / world) rows of every tensor: at least an even share, and at
        # most one extra row per tensor
        for got, full, tensors in (
            (fsdp.params, ddp.params, shapes),
            (fsdp.grads, ddp.grads, trainable),
            (fsdp.optimizer, ddp.optimizer, trainable),
        ):
            per_tensor = 2 if got is fsdp.optimizer else 1
            slack = 4 * per_tensor * sum(math.prod(s[1:]) for s in tensors)
            assert full / world <= got <= full / world + slack


def test_largest_unit_is_the_head(rows: dict) -> None:
    head, _ = dino_head_params()
    for world in (1, 2, 4, 8):
        assert rows[("FSDP", world)].largest_unit == 4 * head


def test_table_has_a_row_per_strategy_and_world(rows: dict) -> None:
    table = memory.markdown(list(rows.values())).splitlines()
    assert len(table) == 2 + 8
    assert all(line.count("|") == 8 for line in table)
