"""What a step asks of the host, counted rather than timed (counts do not move with the
machine's noise): the aten operations it dispatches, the host reads and copies from the host
among them (:func:`operation_counts`), and its Python-level calls (:func:`python_calls`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from profiling.timing import Step

# What reads a tensor on the host: each of these waits for the device (a host synchronisation).
HOST_READS = frozenset({"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"})
# Linear-algebra kernels that read their LAPACK / cuSOLVER status on the host after the call (a
# wait on a GPU) inside the kernel, where a dispatch mode sees only the operation itself; the
# check's own operation is counted where a composite dispatches it (torch.linalg.cholesky, inv).
STATUS_READS = frozenset({"_linalg_check_errors", "cholesky_inverse", "cholesky_solve", "_linalg_eigh"})


@dataclass(frozen=True)
class OperationCounts:
    """Aten operations one step dispatched, how many of them read a tensor on the host, and how
    many bring host data to the device (:func:`from_host`)."""

    operations: int
    host_reads: int
    host_copies: int = 0


class _Counted:
    """What :func:`counting_operations` has counted so far."""

    def __init__(self) -> None:
        self.operations = self.host_reads = self.host_copies = 0
        # tensors handed to operations in lists (``_foreach_*``, ``stack``): each costs the host
        # its own checks, so a list operation over 420 gradients is no single operation's cost
        self.listed_tensors = 0


def from_host(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether aten operation ``name`` brings host data to the device. On a GPU a copy from
    (pageable) host memory waits for the device as a read does: torch's sync debug mode flags it.
    On CPU nothing is copied, so a tensor made from Python data (``torch.tensor([...])``,
    ``lift_fresh``) counts too: a GRIT step makes one only to put it on the device."""
    if name == "lift_fresh":
        return True
    if name == "_to_copy" and args and kwargs.get("device") is not None:
        return args[0].device.type == "cpu" and str(kwargs["device"]).split(":")[0] != "cpu"
    if name == "copy_" and len(args) > 1:
        return getattr(args[1], "device", None) is not None and args[1].device.type == "cpu" \
            and args[0].device.type != "cpu"
    return False


@contextmanager
def counting_operations():
    """Count every aten operation dispatched inside the block (a ``TorchDispatchMode`` sees each
    one, backward included), the host reads and the copies from the host among them, and the
    tensors handed to them in lists."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from trainers.grit.host import is_host_copy

    counted = _Counted()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counted.operations += 1
            name = func.overloadpacket.__name__
            # a read of a host copy made without waiting (trainers/grit/host.py) is no sync on a GPU
            counted.host_reads += name in HOST_READS and not is_host_copy(args[0] if args else None)
            counted.host_reads += name in STATUS_READS
            counted.host_copies += from_host(name, args, kwargs or {})
            counted.listed_tensors += sum([isinstance(item, torch.Tensor) for arg in args
                                           if isinstance(arg, (list, tuple)) for item in arg])
            return func(*args, **(kwargs or {}))

    with Counting():
        yield counted


def operation_counts(step: Step, inputs: Any) -> OperationCounts:
    """Run ``step(inputs)`` once, counting the aten operations it dispatches, and the host reads
    and copies from the host among them (:func:`counting_operations`). On a GPU a small model's
    step is bound by the host: its cost is its operation count, and a host read or a copy from
    host memory stalls the launch queue, so these counts predict the GPU step where CPU seconds
    cannot."""
    with counting_operations() as counted:
        step(inputs)
    return OperationCounts(counted.operations, counted.host_reads, counted.host_copies)


def python_calls(run: Callable[[], Any]) -> int:
    """The Python-level calls ``run()`` makes: functions, methods and builtins (``sys.setprofile``
    events ``call`` and ``c_call``). On a GPU a step's host time is its Python as much as its
    operations: the H100's profile put most of GRIT's extra host time in code that launches
    little (docs/gpu.md), which an operation count does not see."""
    import sys

    calls = 0

    def count(_frame, event: str, _arg) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        run()
    finally:
        sys.setprofile(previous)
    return calls


