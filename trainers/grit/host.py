"""Reading device values on the host without waiting for the device.

On a GPU, reading a tensor on the host (``int(t)``, ``t.item()``, ``t.tolist()``) waits until the
device has run everything queued before it: the host stops feeding the device, and a small
model's step, bound by the host, pays for it. GRIT needs a few such values (a forward's token row
count, which factorisations failed), but never in the same instant it computes them. So it copies
them to pinned host memory as soon as they exist (an asynchronous copy and an event) and reads the
copy later, when the device is long past that point: a read that does not wait.

On CPU the copy is the tensor itself. Such host copies are recorded (``is_host_copy``) so that the
operation counter of the overhead gates (``profiling/operations.py``) does not count their reads
as synchronisations, as they are not on a GPU.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_HOST_COPIES: dict[int, weakref.ref] = {}      # id -> the copy (by identity: tensors compare by value)


def host_copy(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(a host copy of ``tensor`` made without waiting for the device, the event that marks it
    done): on CUDA a pinned buffer filled asynchronously; elsewhere the tensor itself and None."""
    if tensor.device.type != "cuda":
        copied, done = tensor, None
    else:
        copied = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        copied.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    key = id(copied)
    _HOST_COPIES[key] = weakref.ref(copied, lambda _ref, key=key: _HOST_COPIES.pop(key, None))
    return copied, done


def is_host_copy(tensor: Any) -> bool:
    ref = _HOST_COPIES.get(id(tensor))
    return ref is not None and ref() is tensor


def read_host_copy(copied: torch.Tensor, done: Any) -> list | int | float:
    """The values of a :func:`host_copy` (waits only for its own copy, long done when read later)."""
    if done is not None:
        done.synchronize()
    return copied.tolist()


class DeferredCount:
    """An integer the device computes now and the host reads later (:func:`host_copy`)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._copy, self._done = host_copy(tensor)
        self._value: int | None = None

    def __int__(self) -> int:
        if self._value is None:
            self._value = int(read_host_copy(self._copy, self._done))
        return self._value
