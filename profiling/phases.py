"""Where a step's time goes, per arm: :func:`phase_profile` reads one ``torch.profiler`` session
of an arm's steps into the host's milliseconds in each phase of the step (``STEP_PHASES``), the
device's kernel time (in all, by kernel) and the kernel launches per step, each phase's span on
the device and its operator calls."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from profiling.timing import Collections, Step, counting_collections, synchronize

# What a training step does, in order: the step functions mark each phase (``phase(name)``), so a
# profile can say which of them GRIT makes slower. ``grit_before`` is GRIT's before_step (or
# LoRA's gradient clipping), ``grit_after`` GRIT's after_step (nothing for LoRA).
STEP_PHASES = ("forward", "backward", "grit_before", "optimizer", "grit_after", "zero_grad")
# The host calls that start work on the device, as the profiler names them.
KERNEL_LAUNCHES = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                             "cudaLaunchCooperativeKernel", "cudaGraphLaunch"})
PHASE_RANGE = "phase."


@dataclass(frozen=True)
class PhaseProfile:
    """One arm's steps as the profiler saw them, per step: the host's milliseconds in each phase
    (``STEP_PHASES``), the device's kernel milliseconds and the kernel launches, each phase's span
    on the device (from its first kernel's start to its last one's end, gaps included) and the
    kernel milliseconds by kernel name (the device figures are None on CPU). ``host_ms_slowest``:
    each phase's slowest single step on the host, where a rare step shows that a mean spreads
    out (GRIT's inverting step, one in ``update_freq``). ``host_ops``: the operator calls each
    phase makes per step (``operators_per_phase``), which a host-bound step pays for one by one
    and which, unlike a phase's milliseconds, do not move with the machine's noise."""

    host_ms: dict[str, float]
    device_ms: float | None
    kernel_launches: float | None
    steps: int
    device_span_ms: dict[str, float] | None = None
    kernel_ms: dict[str, float] | None = None
    host_ms_slowest: dict[str, float] | None = None
    collections: Collections | None = None      # the garbage collections in the profiled steps
    host_ops: dict[str, float] | None = None     # operator calls per step in each phase

    @property
    def host_ms_total(self) -> float:
        return sum(self.host_ms.values())


# A kernel's name in the report: demangled C++ templates run to hundreds of characters.
KERNEL_NAME_CHARS = 90


@dataclass(frozen=True)
class ProfiledEvents:
    """A profile's events, sorted by what they say: ``windows`` (name, start us, end us) of the
    phase ranges on the host, ``kernels`` (name, device us) of each kernel, ``spans`` (name,
    device us) of the phase ranges as the device saw them, ``host_calls`` the name of every host
    event and ``operator_starts`` the start (us) of every outermost operator call
    (``is_outermost_operator``)."""

    windows: list[tuple[str, float, float]]
    kernels: list[tuple[str, float]]
    spans: list[tuple[str, float]]
    host_calls: list[str]
    operator_starts: list[float] = field(default_factory=list)

    @property
    def ranges(self) -> list[tuple[str, float]]:
        """(name, host us) of the phase ranges: a host event's time is its window's length."""
        return [(name, end - start) for name, start, end in self.windows]


# An operator call as the profiler names it on the host.
OPERATOR_PREFIX = "aten::"


def is_outermost_operator(event: Any) -> bool:
    """Is ``event`` an operator called from outside any operator (``aten::linear``, not the
    ``aten::mm`` it calls)? One such call is one trip through the dispatcher that the host pays
    for whatever the operator does inside; the operators an operator calls are its own business."""
    if not event.name.startswith(OPERATOR_PREFIX):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(OPERATOR_PREFIX):
            return False
        parent = parent.cpu_parent
    return True


def sort_events(events: Iterable[Any]) -> ProfiledEvents:
    """Sort ``torch.profiler`` events (``FunctionEvent``). On CUDA the profiler mirrors each
    ``record_function`` range on the device as a user annotation, a device event as long as the
    range's kernels span: counted as a kernel, it adds each phase's span, gaps included, to the
    kernel time (torch's own tables leave annotations out the same way)."""
    from torch.autograd import DeviceType

    sorted_events = ProfiledEvents([], [], [], [])
    for event in events:
        on_host = event.device_type == DeviceType.CPU
        if on_host:
            sorted_events.host_calls.append(event.name)
            if event.name.startswith(PHASE_RANGE):
                sorted_events.windows.append((event.name, event.time_range.start, event.time_range.end))
            elif is_outermost_operator(event):
                sorted_events.operator_starts.append(event.time_range.start)
        elif getattr(event, "is_user_annotation", False):
            if event.name.startswith(PHASE_RANGE):
                sorted_events.spans.append((event.name, event.device_time_total))
        else:
            sorted_events.kernels.append((event.name, event.device_time_total))
    return sorted_events


def phase_of(name: str) -> str | None:
    """The phase (``STEP_PHASES``) a range named ``phase.<name>`` marks; None for any other name."""
    phase = name.removeprefix(PHASE_RANGE)
    return phase if name.startswith(PHASE_RANGE) and phase in STEP_PHASES else None


def phase_ranges(named: Iterable[tuple[str, float]]) -> Iterable[tuple[str, float]]:
    """(phase, milliseconds) of each range of a phase (``STEP_PHASES``) among (range name, microseconds)."""
    for name, us in named:
        if (phase := phase_of(name)) is not None:
            yield phase, us / 1000


def per_phase(named: Iterable[tuple[str, float]], steps: int) -> dict[str, float]:
    """Milliseconds per step of each phase (``STEP_PHASES``) from (range name, microseconds)."""
    phases = dict.fromkeys(STEP_PHASES, 0.0)
    for phase, ms in phase_ranges(named):
        phases[phase] += ms / steps
    return phases


def slowest_per_phase(named: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Milliseconds of each phase's (``STEP_PHASES``) slowest range, from (range name, microseconds)."""
    slowest = dict.fromkeys(STEP_PHASES, 0.0)
    for phase, ms in phase_ranges(named):
        slowest[phase] = max(slowest[phase], ms)
    return slowest


def operators_per_phase(windows: Iterable[tuple[str, float, float]], operator_starts: Iterable[float],
                        steps: int) -> dict[str, float]:
    """Operator calls per step of each phase (``STEP_PHASES``): those that start inside one of
    the phase's ranges (name, start, end), on whichever thread: on CUDA the autograd engine runs
    backward's operators on its own thread, outside the range's tree of events."""
    starts = sorted(operator_starts)
    counts = dict.fromkeys(STEP_PHASES, 0.0)
    for name, start, end in windows:
        if (phase := phase_of(name)) is not None:
            counts[phase] += (bisect.bisect_right(starts, end) - bisect.bisect_left(starts, start)) / steps
    return counts


def summarise_phases(events: ProfiledEvents, steps: int, on_device: bool) -> PhaseProfile:
    """A :class:`PhaseProfile` from the sorted events of a profile of ``steps`` steps; on CPU
    there is no device time to read."""
    host = per_phase(events.ranges, steps)
    slowest = slowest_per_phase(events.ranges)
    operators = operators_per_phase(events.windows, events.operator_starts, steps)
    if not on_device:
        return PhaseProfile(host, None, None, steps, host_ms_slowest=slowest, host_ops=operators)
    by_kernel: dict[str, float] = {}
    for name, us in events.kernels:
        short = name[:KERNEL_NAME_CHARS]
        by_kernel[short] = by_kernel.get(short, 0.0) + us / 1000 / steps
    launches = sum(name in KERNEL_LAUNCHES for name in events.host_calls) / steps
    return PhaseProfile(host, sum(us for _, us in events.kernels) / 1000 / steps, launches, steps,
                        per_phase(events.spans, steps), by_kernel, slowest, host_ops=operators)


def largest_first(differences: dict[str, float], top: int) -> list[tuple[str, float]]:
    """The ``top`` (name, difference) pairs of largest size, ties by name (a stable ranking)."""
    return sorted(differences.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:top]


def kernel_differences(lora: dict[str, float], grit: dict[str, float], top: int = 6) -> dict[str, float]:
    """GRIT's minus LoRA's milliseconds per step of the ``top`` kernels whose time differs most."""
    names = set(lora) | set(grit)
    return dict(largest_first({name: grit.get(name, 0.0) - lora.get(name, 0.0) for name in names}, top))


def phase_profile(step: Step, batches: Iterable[Any], device: str = "cpu") -> PhaseProfile:
    """Profile one arm's steps (its step function marks its phases with ``record_function``
    ranges named ``phase.<name>``); the device is synchronised before and after each step, so a
    phase's host time is its own, not the wait for an earlier step's kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    steps = 0
    collections = Collections()
    with counting_collections(collections), profile(activities=activities) as prof:
        for inputs in batches:
            synchronize(device)
            step(inputs)
            synchronize(device)
            steps += 1
    if not steps:
        raise ValueError("no step was profiled")
    # kernels are device events; an operation's own device time is theirs again, so only they count
    return replace(summarise_phases(sort_events(prof.events()), steps, on_device=device == "cuda"),
                   collections=collections)

