"""Where a step's time goes: a ``torch.profiler`` session's events read per phase of the step
(``profiling/phases.py``), on events made by hand."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from profiling.phases import is_outermost_operator, kernel_differences, sort_events, summarise_phases


def profiler_event(name: str, on_device: bool, us: float, annotation: bool = False, start: float = 0.0,
                   parent: Any = None):
    """What ``sort_events`` reads of a ``torch.profiler`` event (``FunctionEvent``)."""
    from torch.autograd import DeviceType

    device = DeviceType.CUDA if on_device else DeviceType.CPU
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                           cpu_time_total=0.0 if on_device else us, device_time_total=us if on_device else 0.0,
                           time_range=SimpleNamespace(start=start, end=start + us), cpu_parent=parent)


def test_a_profile_counts_each_phases_outermost_operator_calls_on_any_thread():
    """An operator an operator calls is not counted again (``aten::linear`` counts, its
    ``aten::mm`` does not); an operator outside the phase's range in the event tree (backward's
    operators on the autograd engine's thread, on CUDA) counts for the phase it started in; the
    count is per step."""
    forward = profiler_event("phase.forward", False, 100.0, start=0.0)
    linear = profiler_event("aten::linear", False, 50.0, start=10.0, parent=forward)
    nested = profiler_event("aten::mm", False, 40.0, start=15.0, parent=linear)
    deeper = profiler_event("aten::resolve_conj", False, 1.0, start=16.0, parent=nested)
    backward = profiler_event("phase.backward", False, 100.0, start=200.0)
    engine = profiler_event("autograd::engine::evaluate_function: MmBackward0", False, 30.0, start=210.0)
    on_engine_thread = profiler_event("aten::mm", False, 20.0, start=215.0, parent=engine)
    outside = profiler_event("aten::add_", False, 1.0, start=150.0)
    again = profiler_event("phase.forward", False, 100.0, start=400.0)
    events = [forward, linear, nested, deeper, backward, engine, on_engine_thread, outside, again,
              profiler_event("aten::relu", False, 5.0, start=450.0, parent=again),
              profiler_event("aten::add", False, 5.0, start=460.0, parent=again)]
    assert [is_outermost_operator(e) for e in (linear, nested, deeper, on_engine_thread, engine)] == \
        [True, False, False, True, False]
    summary = summarise_phases(sort_events(events), steps=2, on_device=False)
    assert summary.host_ops == {"forward": 1.5, "backward": 0.5, "grit_before": 0.0, "optimizer": 0.0,
                                "grit_after": 0.0, "zero_grad": 0.0}


def test_a_profile_is_summarised_per_step_and_phase():
    """Two profiled steps: each phase's host time is its host ranges' sum over the steps, per step;
    the device's time sums kernels only: the phases' ranges mirrored on the device (user
    annotations, which span their kernels) are spans, not kernels, which the first H100 profile
    counted as kernel time; a CPU profile claims no device figures."""
    events = [profiler_event(name, False, us) for name, us in (
        ("phase.forward", 3000.0), ("phase.backward", 5000.0), ("phase.forward", 1000.0),
        ("phase.grit_after", 400.0), ("aten::mm", 99.0), ("phase.unknown", 7.0))]
    events += [profiler_event(name, False, 1.0) for name in ["cudaLaunchKernel"] * 6 + ["cudaMemcpyAsync"]]
    events += [profiler_event("gemm", True, 100.0), profiler_event("gemm", True, 300.0),
               profiler_event("potrf", True, 200.0), profiler_event("phase.forward", True, 4000.0, annotation=True),
               profiler_event("phase.grit_before", True, 600.0, annotation=True)]
    on_gpu = summarise_phases(sort_events(events), steps=2, on_device=True)
    assert on_gpu.host_ms == {"forward": 2.0, "backward": 2.5, "grit_before": 0.0, "optimizer": 0.0,
                              "grit_after": 0.2, "zero_grad": 0.0}
    assert on_gpu.host_ms_total == 4.7 and on_gpu.device_ms == 0.3 and on_gpu.kernel_launches == 3
    # the slowest step of each phase, not the mean: forward's first step took 3 ms, its mean 2
    assert on_gpu.host_ms_slowest == {"forward": 3.0, "backward": 5.0, "grit_before": 0.0, "optimizer": 0.0,
                                      "grit_after": 0.4, "zero_grad": 0.0}
    assert on_gpu.kernel_ms == {"gemm": 0.2, "potrf": 0.1}
    assert on_gpu.device_span_ms == {"forward": 2.0, "backward": 0.0, "grit_before": 0.3, "optimizer": 0.0,
                                     "grit_after": 0.0, "zero_grad": 0.0}
    on_cpu = summarise_phases(sort_events(events[:7]), steps=2, on_device=False)
    assert on_cpu.host_ms == on_gpu.host_ms and on_cpu.device_ms is None and on_cpu.kernel_launches is None
    assert kernel_differences({"gemm": 0.2, "potrf": 0.1}, {"gemm": 0.25, "trsm": 0.5, "x": 0.0}, top=2) == \
        {"trsm": 0.5, "potrf": -0.1}
