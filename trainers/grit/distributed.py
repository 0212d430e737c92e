"""The one place where GRIT talks to other data-parallel ranks.

Every rank sees different tokens, so its factor statistics differ; inverting them locally would
give each replica a different preconditioner and silently different updates (DDP averages the
*raw* gradients, not the preconditioned ones). Summing the pending statistics across ranks
before they are folded in keeps every rank's factors, inverses and updates identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def allreduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` across ranks in place, in one collective (no-op on a single process)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(flat[offset: offset + n].reshape(tensor.shape).to(tensor.dtype))
        offset += n
