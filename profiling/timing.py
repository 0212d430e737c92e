"""Step times of two arms measured side by side: :func:`interleaved_step_times` runs both in
one process, steps interleaved (LoRA, GRIT, LoRA, ...) on the same batches, so the machine's
noise hits both alike; after the warm-up steps, the median step time of each arm and their
ratio, and the means (which count GRIT's inversions). On CUDA each step is bracketed by
``torch.cuda.synchronize`` so the time is the step's, not its launch's."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

Step = Callable[[Any], object]

ARMS = ("lora", "grit")


@dataclass
class Collections:
    """Python's garbage collections during some steps: how many of each generation (0, 1, 2; a
    collection of generation 2 walks every object the process holds, hundreds of thousands with
    torch and transformers loaded) and the seconds they took."""

    generations: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: float = 0.0

    def figures(self, steps: int) -> dict[str, Any]:
        """Per step: collections of each generation and milliseconds; the full collections in all."""
        return {"per_step": [n / steps for n in self.generations], "ms_per_step": 1000 * self.seconds / steps,
                "full": self.generations[2]}


@contextmanager
def counting_collections(tally: Collections):
    """Add the garbage collections that run inside the block to ``tally`` (``gc.callbacks``). A
    step that keeps more Python objects alive (GRIT's stash of u and the gradients at u, its
    hooks) sets off more collections, and each object that survives one is walked again by the
    later, rarer full ones: a cost no operation count shows, paid on the host."""
    started: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            tally.generations[info["generation"]] += 1
            started.append(time.perf_counter())
        elif started:
            tally.seconds += time.perf_counter() - started.pop()

    gc.callbacks.append(callback)
    try:
        yield tally
    finally:
        gc.callbacks.remove(callback)


@dataclass(frozen=True)
class StepTimes:
    """Median step times (seconds) of the two arms over ``steps`` timed steps, and their means:
    the median leaves out the rare steps that invert GRIT's factors (one in ``update_freq``), the
    mean over a whole number of inversion periods is what a user's run pays."""

    lora_s: float
    grit_s: float
    steps: int
    lora_mean_s: float
    grit_mean_s: float
    collections: dict[str, Collections] = field(default_factory=dict)    # arm -> in its timed steps

    @property
    def ratio(self) -> float:
        """GRIT / LoRA (medians)."""
        return self.grit_s / self.lora_s

    @property
    def mean_ratio(self) -> float:
        """GRIT / LoRA (means)."""
        return self.grit_mean_s / self.lora_mean_s


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved_step_times(lora: Step, grit: Step, batches: Iterable[Any], warmup: int = 2, device: str = "cpu",
                           prepare: Callable[[str], None] | None = None,
                           clock: Callable[[], float] = time.perf_counter) -> StepTimes:
    """Each batch of ``batches`` is given to the LoRA step, then to the GRIT step; the first
    ``warmup`` batches are not timed (allocator, kernels, the first inversion). ``prepare(arm)``
    runs before each step, outside the timed span (``arm`` is ``"lora"`` or ``"grit"``).
    ``clock``: seconds, read right before and after each step (a test passes its own). The
    garbage collections of each arm's timed steps are counted too (:func:`counting_collections`)."""
    arms = dict(zip(ARMS, (lora, grit), strict=True))
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    collections = {arm: Collections() for arm in ARMS}
    for k, inputs in enumerate(batches):
        for arm, step in arms.items():
            if prepare is not None:
                prepare(arm)
            synchronize(device)
            with counting_collections(collections[arm] if k >= warmup else Collections()):
                started = clock()
                step(inputs)
                synchronize(device)
                ended = clock()
            if k >= warmup:
                times[arm].append(ended - started)
    if not times["lora"]:
        raise ValueError(f"no step was timed: give more batches than the {warmup} warm-up steps")
    return StepTimes(statistics.median(times["lora"]), statistics.median(times["grit"]), len(times["lora"]),
                     statistics.fmean(times["lora"]), statistics.fmean(times["grit"]), collections)
