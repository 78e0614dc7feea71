"""Parameter, gradient and optimizer-state memory per rank of DINO ViT-B/16, DDP vs FSDP.

The official recipe's model (student and EMA teacher, ViT-B/16 backbones, heads with
``out_dim`` 65536 and a weight-normalised last layer whose magnitude is frozen, AdamW) is built
on the meta device, so nothing is allocated and the count is instant. For FSDP the model is
sharded by sslzoo's own FSDP2 code (:func:`sslzoo.sharding.shard_method`) inside a fake process
group of each world size, and the bytes are read off rank 0's local shards (rank 0 holds the
largest ``torch.chunk`` piece of every tensor, so it is the peak rank).

Counted per rank, all fp32 (master weights, gradients and AdamW moments stay fp32 under bf16
compute): parameters (student and teacher), gradients (trainable student parameters), AdamW
``exp_avg`` and ``exp_avg_sq``. Not counted: AdamW's step counters (one scalar per tensor, on
the host), activations, communication buffers (DDP with ``gradient_as_bucket_view``, as in
``configs/trainer/ddp.yaml``, keeps gradients in its buckets), allocator overhead. FSDP also
holds gathered units for a moment: the column "largest unit" is the biggest unit's full fp32
parameters (half that with ``param_dtype: bf16``); with prefetching about two units are
gathered at once, and in backward one unit's full gradients before reduce-scatter.

    python benchmarks/memory.py                       # the table for world sizes 1, 2, 4, 8
    python benchmarks/memory.py --worlds 1 16 --out benchmarks/results/memory.md
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FP32 = 4  # bytes per element
ADAMW_MOMENTS = 2  # exp_avg, exp_avg_sq
GIB = 2**30


@dataclass(frozen=True)
class Row:
    """Bytes per rank of one (strategy, world size)."""

    strategy: str
    world: int
    params: int
    grads: int
    optimizer: int
    largest_unit: int  # full fp32 bytes of the largest FSDP unit; 0 under DDP

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def build_dino(backbone: str = "vit_base_patch16_224", out_dim: int = 65536) -> nn.Module:
    """DINO with the official recipe's model on the meta device."""
    from sslzoo.methods.dino import DINO

    with torch.device("meta"):
        return DINO(backbone=backbone, out_dim=out_dim)


def bytes_of(tensors: Sequence[torch.Tensor], local: bool = True) -> int:
    """fp32 bytes of ``tensors`` (their local shards if ``local``)."""
    from sslzoo.sharding import local_tensor

    return sum((local_tensor(t) if local else t).numel() for t in tensors) * FP32


def state_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(parameters, gradients, AdamW state) bytes this rank holds for ``model``."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grads = bytes_of(trainable)
    return bytes_of(params), grads, ADAMW_MOMENTS * grads


def unit_bytes(model: nn.Module) -> list[int]:
    """Full fp32 bytes of the parameters each FSDP unit gathers (its own, not its sub-units')."""
    from torch.distributed.fsdp import FSDPModule

    sizes = []
    for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
        inner = {
            id(p)
            for m in unit.modules()
            if m is not unit and isinstance(m, FSDPModule)
            for p in m.parameters()
        }
        own = [p for p in unit.parameters() if id(p) not in inner]
        sizes.append(bytes_of(own, local=False))  # a DTensor's numel() is its global numel
    return sizes


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[object]:
    """A process group of ``world`` ranks in this one process (seen as rank 0) whose
    collectives do nothing, and its 1-D device mesh: enough to shard on the meta device."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def count(world: int, backbone: str = "vit_base_patch16_224", out_dim: int = 65536) -> list[Row]:
    """The DDP and FSDP rows of one world size."""
    from sslzoo.sharding import shard_method

    ddp = Row("DDP", world, *state_bytes(build_dino(backbone, out_dim)), largest_unit=0)
    model = build_dino(backbone, out_dim)
    with fake_world(world) as mesh:
        shard_method(model, mesh)
        fsdp = Row("FSDP", world, *state_bytes(model), largest_unit=max(unit_bytes(model)))
    return [ddp, fsdp]


def markdown(rows: Sequence[Row]) -> str:
    """The Markdown table, GiB per rank."""
    head = ["world", "strategy", "params", "grads", "AdamW state", "total", "largest unit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gib = [f"{v / GIB:.3f}" for v in (r.params, r.grads, r.optimizer, r.total)]
        unit = f"{r.largest_unit / GIB:.3f}" if r.largest_unit else "-"
        lines.append(f"| {r.world} | {r.strategy} | " + " | ".join([*gib, unit]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    rows = [row for w in args.worlds for row in count(w, args.backbone, args.out_dim)]
    model = build_dino(args.backbone, args.out_dim)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = (
        f"DINO {args.backbone}, out_dim {args.out_dim}, AdamW: {n_params / 1e6:.2f} M parameters "
        f"(student + teacher), {n_train / 1e6:.2f} M trainable. GiB per rank, fp32.\n\n"
        + markdown(rows)
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
