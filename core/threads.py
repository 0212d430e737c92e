"""How many threads llama.cpp uses, chosen for a CPU that may be shared.

llama.cpp's CPU backend meets at an OpenMP barrier after every operation of the graph, hundreds
of times per generated token. When another process holds one of the cores, the thread that is
waited for is not running and its partners spin: decoding on every core of a 2-core machine ran
3.3x slower beside one busy process (``benchmarks/llama_contention.py``), and 50x beside the
pipeline's own training. Decoding a token is bound by memory and barriers, not arithmetic:
SmolLM2-135M decodes as fast on one thread as on two. So decoding gets half the CPUs the
process may use (llama.cpp's own default, about one per physical core), at least one, and
prompt processing, a large matrix product, gets them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import UserError

THREADS_ENV = "GRIT_LLAMA_THREADS"


@dataclass(frozen=True)
class LlamaThreads:
    decode: int          # llama.cpp's n_threads: one token at a time
    batch: int           # n_threads_batch: the prompt, many tokens at once


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or ``taskset``'s
    limit), not every core the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):      # not Linux
        return os.cpu_count() or 1


def llama_threads(environ: Mapping[str, str] = os.environ) -> LlamaThreads:
    """``$GRIT_LLAMA_THREADS`` for both when set (for example each of several workers on one
    machine taking its share), else half the usable CPUs to decode and all of them for prompts."""
    configured = environ.get(THREADS_ENV, "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise UserError(f"{THREADS_ENV}={configured!r}: expected a whole number of threads, at least 1")
        return LlamaThreads(int(configured), int(configured))
    cpus = usable_cpus()
    return LlamaThreads(max(1, cpus // 2), cpus)
