"""GRIT's overhead over plain LoRA, measured one way: the GPU check's ``overhead`` item
(``items.py``, CUDA) and ``benchmarks/grit_overhead.py`` (CPU) build their models and step
functions, and time and weigh them here.

- :func:`interleaved_step_times`: both arms in one process, steps interleaved (LoRA, GRIT, LoRA,
  ...) on the same batches, so the machine's noise hits both alike; after the warm-up steps, the
  median step time of each arm and their ratio, and the means (which count GRIT's inversions).
  On CUDA each step is bracketed by ``torch.cuda.synchronize`` so the time is the step's, not
  its launch's.
- :func:`peak_memory`: one arm's training peak, measured in a process that holds that arm only
  (call it in a fresh process per arm): on CUDA ``torch.cuda.max_memory_allocated`` after its
  peak is reset, on CPU the process's peak RSS (``VmHWM``) after the kernel's mark is reset
  through ``/proc/self/clear_refs``. The peak includes what was loaded before (weights), as the
  reset starts it from the current use.
- :func:`phase_profile`: where a step's time goes, per arm: the host's milliseconds in each
  phase of the step (``STEP_PHASES``), the device's kernel time (in all, by kernel) and the
  kernel launches per step, each phase's span on the device and its operator calls, read from
  one ``torch.profiler`` session per arm.

A step function takes one batch and runs one whole training step (forward, backward, the
optimizer, GRIT's work); what it returns is ignored.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

Step = Callable[[Any], object]

# The overhead item's model shapes: SmolLM2-135M's (a GPU step bound by the host) and
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3}
# a 1B-class Llama (Llama-3.2-1B's blocks, a step bound by compute).
LLAMA_1B_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "max_position_embeddings": 4096}
OVERHEAD_SHAPES = {"smollm2": SMOLLM2_SHAPE, "llama-1b": LLAMA_1B_SHAPE}
# (batch, length) a shape is timed at whatever the command line says: the 1B shape at 8k tokens
OVERHEAD_SIZES = {"llama-1b": (4, 2048)}
ARMS = ("lora", "grit")
# lora.adapter_dtype of both arms: PEFT's fp32 adapters, or the model's dtype (bf16 on a GPU)
ADAPTER_DTYPES = ("float32", "model")
# grit.capture of the GRIT arm: the engine's (fused on Unsloth, hooks on PEFT), or either on both
GRIT_CAPTURES = ("auto", "hooks", "fused")
# The LoRA arm's forward and backward: the engine's own, or GRIT's fused functions without GRIT
# (PEFT only), so that a GRIT arm through those functions is timed against the same arithmetic.
LORA_FUNCTIONS = ("engine", "fused")


@dataclass(frozen=True)
class Sizing:
    """How the overhead and profile items size and set up their arms: timed steps per arm, the
    batch (rows x tokens), ``lora.adapter_dtype`` of both arms, ``grit.capture`` of GRIT's and the
    LoRA arm's functions (``lora_functions``).
    One value from the command line (both the check's and an item's) to the model an item
    builds, in place of five arguments passed on by hand through every signature between."""

    steps: int = 10
    batch: int = 8
    length: int = 256
    adapter_dtype: str = "float32"
    grit_capture: str = "auto"
    lora_functions: str = "engine"

    def for_shape(self, shape: str) -> Sizing:
        """This sizing at ``shape``: its own batch where it has one (``OVERHEAD_SIZES``: the 1B
        shape at 8k tokens), the command line's otherwise."""
        if shape not in OVERHEAD_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(OVERHEAD_SHAPES)}")
        batch, length = OVERHEAD_SIZES.get(shape, (self.batch, self.length))
        return replace(self, batch=batch, length=length)

    def for_engine(self, engine: str) -> Sizing:
        """This sizing on ``engine``: the LoRA arm's functions are Unsloth's own fused kernels on
        Unsloth's, whatever ``lora_functions`` asks (it chooses between PEFT's forward and GRIT's
        fused functions on PEFT's), so a check run over both engines records what each ran."""
        return self if engine == "peft" else replace(self, lora_functions="engine")

    def argv(self) -> list[str]:
        """The options that give an item's process this sizing (:meth:`add_arguments`)."""
        return ["--steps", str(self.steps), "--batch", str(self.batch), "--length", str(self.length),
                "--adapter-dtype", self.adapter_dtype, "--grit-capture", self.grit_capture,
                "--lora-functions", self.lora_functions]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        default = Sizing()
        parser.add_argument("--steps", type=int, default=default.steps, help="timed steps per arm in the overhead item")
        parser.add_argument("--batch", type=int, default=default.batch)
        parser.add_argument("--length", type=int, default=default.length)
        parser.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default=default.adapter_dtype,
                            help="lora.adapter_dtype of both arms in the overhead and profile items (model: bf16 "
                                 "adapters)")
        parser.add_argument("--grit-capture", choices=GRIT_CAPTURES, default=default.grit_capture,
                            help="grit.capture of the GRIT arm in the overhead and profile items (auto: the engine's)")
        parser.add_argument("--lora-functions", choices=LORA_FUNCTIONS, default=default.lora_functions,
                            help="the LoRA arm's functions on the PEFT engine: PEFT's own (engine) or GRIT's fused "
                                 "functions without GRIT (fused), the baseline of --grit-capture fused")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sizing:
        return cls(steps=args.steps, batch=args.batch, length=args.length, adapter_dtype=args.adapter_dtype,
                   grit_capture=args.grit_capture, lora_functions=args.lora_functions)

    def figures(self) -> dict[str, Any]:
        """What an item's figures record of its sizing."""
        return {"adapter_dtype": self.adapter_dtype, "grit_capture": self.grit_capture,
                "lora_functions": self.lora_functions, "steps": self.steps,
                "batch": self.batch, "length": self.length}


DEFAULT_SIZING = Sizing()


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


@dataclass(frozen=True)
class PeakMemory:
    """One arm's memory: in use when the peak was reset (after loading) and the training peak (MiB)."""

    after_load_mib: float
    peak_mib: float

    @property
    def added_mib(self) -> float:
        """What training added on top of the loaded model."""
        return self.peak_mib - self.after_load_mib


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


LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_lora_llama(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                      r: int = 16, seed: int = 0):
    """A Llama of random weights with LoRA (r, alpha 2r) on its 7 projections of every block: a
    model's layout (how many LoRA modules, of which shapes) without its weights. SmolLM2-135M's
    layout at tiny width is ``random_lora_llama(30, 64, 128, 4, 2, 96)``: the real 210 modules,
    a step bound by the host like the real model's on a GPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                                target_modules=list(LLAMA_PROJECTIONS)))
