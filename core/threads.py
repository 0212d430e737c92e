"""Threads for llama.cpp and how idle OpenMP threads wait, chosen for a CPU that may be shared.

llama.cpp's CPU backend (built with OpenMP) meets at a barrier after every operation of the
graph, hundreds of times per generated token. OpenMP's default is to spin at a barrier for a long
while before sleeping; when another process holds one of the cores, the thread that is waited for
is not running, and its partners burn their time slices spinning: on 2 cores beside one busy
process, generation ran 50x slower instead of about 2x. A short spin keeps the speed of a quiet
machine and lets a waiting thread yield on a busy one (``benchmarks/llama_contention.py``).

The OpenMP runtime reads its settings when it is loaded, and torch loads the same ``libgomp``
that llama.cpp then uses, so :func:`configure_waiting` must run before torch is imported: the
``pipelines`` package calls it when it is imported, before any stage imports anything heavy.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from core.errors import UserError

THREADS_ENV = "GRIT_LLAMA_THREADS"
# GNU OpenMP's spin count before a waiting thread sleeps (its default is 300,000, several
# milliseconds: longer than the scheduler's time slice when the core is shared).
SPIN_COUNT = 10_000


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or ``taskset``'s
    limit), not every core the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):      # not Linux
        return os.cpu_count() or 1


def llama_threads(environ: MutableMapping[str, str] = os.environ) -> int:
    """llama.cpp's thread count: ``$GRIT_LLAMA_THREADS`` when set (for example each of several
    workers on one machine taking its share), else every CPU the process may use."""
    configured = environ.get(THREADS_ENV, "").strip()
    if not configured:
        return usable_cpus()
    if not configured.isdigit() or int(configured) < 1:
        raise UserError(f"{THREADS_ENV}={configured!r}: expected a whole number of threads, at least 1")
    return int(configured)


def configure_waiting(environ: MutableMapping[str, str] = os.environ) -> None:
    """A short OpenMP spin before sleeping, unless the user chose a wait policy or spin count."""
    if "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
