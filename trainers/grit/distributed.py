"""The one place where GRIT talks to other data-parallel ranks.

Every rank sees different tokens, so its factor statistics differ; inverting them locally would
give each replica a different preconditioner and silently different updates (DDP averages the
*raw* gradients, not the preconditioned ones). Summing the pending statistics across ranks
before they are folded in keeps every rank's factors, inverses and updates identical.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Data-parallel processes of this run: the process group's size once it exists, before that
    what the launcher announced (torchrun sets WORLD_SIZE); 1 without a launcher."""
    return dist.get_world_size() if _process_group() else int(os.environ.get("WORLD_SIZE", "1"))


def allreduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` across ranks in place, in one collective (no-op on a single process)."""
    if not tensors or not _process_group() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(flat[offset: offset + n].reshape(tensor.shape).to(tensor.dtype))
        offset += n
