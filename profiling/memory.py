"""What a step holds in memory: :func:`peak_memory` is one arm's training peak, measured in a
process that holds that arm only (call it in a fresh process per arm): on CUDA
``torch.cuda.max_memory_allocated`` after its peak is reset, on CPU the process's peak RSS
(``VmHWM``) after the kernel's mark is reset through ``/proc/self/clear_refs``. The peak
includes what was loaded before (weights), as the reset starts it from the current use.
:func:`saved_activation_bytes` counts what autograd keeps for backward."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiling.timing import Step, synchronize


@dataclass(frozen=True)
class PeakMemory:
    """One arm's memory: in use when the peak was reset (after loading) and the training peak (MiB)."""

    after_load_mib: float
    peak_mib: float

    @property
    def added_mib(self) -> float:
        """What training added on top of the loaded model."""
        return self.peak_mib - self.after_load_mib


def proc_status_mib(field: str) -> float:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``: kB) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: str) -> float:
    """Reset the peak mark to the current use and return that use (MiB)."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark: loading peaks higher
    return proc_status_mib("VmRSS")


def read_peak(device: str) -> float:
    """The peak use (MiB) since :func:`reset_peak`."""
    synchronize(device)
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return proc_status_mib("VmHWM")


def peak_memory(step: Step, batches: Iterable[Any], device: str = "cpu") -> PeakMemory:
    """Reset the peak, run ``step`` on each batch, read the peak. Everything the process holds
    counts, so run one arm per fresh process."""
    after_load = reset_peak(device)
    for inputs in batches:
        step(inputs)
    return PeakMemory(after_load, read_peak(device))


def saved_activation_bytes(run: Callable[[], Any]) -> int:
    """Bytes of the activations autograd saves for backward while ``run()`` runs: every tensor a
    ``saved_tensors_hooks`` pack hook sees, once per storage (q, k and v saving the same input
    count it once; a view counts as its base), parameters left out (they exist anyway). On the
    ``meta`` device this measures a real model's shapes without memory or compute."""
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    kept: dict[int, Any] = {}       # id -> tensor, held so that no id is reused while counting

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if not isinstance(base, torch.nn.Parameter):
            kept[id(base)] = base
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(t.numel() * t.element_size() for t in kept.values())


