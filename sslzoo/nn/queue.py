"""A queue of recent embeddings per rank, kept across steps and checkpoints (SwAV's)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from sslzoo.distributed import rank, world_size


def filled_rows(queue: torch.Tensor) -> int:
    """Rows of a queue (slots x length x dim) up to its last row holding a non-zero value
    (one host read). The queue fills from the front with L2-normalised, so non-zero,
    embeddings: these are the rows pushed so far."""
    used = queue.ne(0).any(dim=2).any(dim=0)
    rows = torch.arange(1, used.numel() + 1, device=queue.device)
    return int((rows * used).max()) if used.numel() else 0


class EmbeddingQueue:
    """This rank's FIFO of the last embeddings of ``slots`` crops (slots x length x dim),
    newest first, for a queue of ``total_length`` over all ranks (first cut to a multiple of
    the global batch, as SwAV's ``queue_length``).

    It is a plain tensor, not a buffer, so DDP's buffer broadcast does not overwrite each
    rank's queue with rank 0's; :meth:`gather` collects every rank's for a checkpoint and
    :meth:`restore` splits them back (evenly over another world size). Its filled rows are
    counted on the host, so a training step never reads the queue back to see whether it is
    full.
    """

    def __init__(self, slots: int, total_length: int, dim: int) -> None:
        self.slots, self.total_length, self.dim = slots, total_length, dim
        self.tensor: torch.Tensor | None = None
        self.rows = 0

    def prepare(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The queue for batches of ``batch_size`` on every rank: created empty, or resized
        after a restore under another batch or world size (keeping the newest entries)."""
        world = world_size()
        global_batch = batch_size * world
        length = (self.total_length - self.total_length % global_batch) // world
        if length == 0:
            raise ValueError(
                f"queue_length {self.total_length} is shorter than the global batch {global_batch}"
            )
        if self.tensor is None or self.tensor.shape[1] != length:
            queue = torch.zeros(self.slots, length, self.dim, device=device)
            rows = 0
            if self.tensor is not None:
                n = min(length, self.tensor.shape[1])
                queue[:, :n] = self.tensor[:, :n]
                rows = min(self.rows, n)
            self.tensor, self.rows = queue, rows
        self.tensor = self.tensor.to(device)
        return self.tensor

    @property
    def full(self) -> bool:
        """Whether every row holds an embedding (officially: its last row is not zero)."""
        return self.tensor is not None and self.rows >= self.tensor.shape[1]

    @torch.no_grad()
    def push(self, embeddings: Sequence[torch.Tensor]) -> None:
        """Put one batch per slot at the front, dropping the oldest."""
        batch = embeddings[0].shape[0]
        for i, e in enumerate(embeddings):
            self.tensor[i, batch:] = self.tensor[i, :-batch].clone()
            self.tensor[i, :batch] = e
        self.rows = min(self.rows + batch, self.tensor.shape[1])

    def gather(self, device: torch.device) -> torch.Tensor:
        """Every rank's queue (world x slots x length x dim), on the host."""
        queues = [self.tensor]
        if world_size() > 1:
            local = self.tensor.to(device).contiguous()
            queues = [torch.empty_like(local) for _ in range(world_size())]
            dist.all_gather(queues, local)
        return torch.stack(queues).cpu()

    def restore(self, queues: torch.Tensor | None) -> None:
        """Take this rank's queue from :meth:`gather`'s output; under another world size the
        saved queues are concatenated and split evenly over the ranks."""
        if queues is None:
            self.tensor, self.rows = None, 0
            return
        if queues.shape[0] == world_size():
            self.tensor = queues[rank()].clone()
        else:
            merged = torch.cat(list(queues), dim=1)
            self.tensor = merged.tensor_split(world_size(), dim=1)[rank()].clone()
        self.rows = filled_rows(self.tensor)
